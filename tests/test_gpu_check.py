"""``scripts/gpu_check.sh`` / ``python -m repa_ssl.gpu_check``: its arguments, and what it does without CUDA."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from repa_ssl import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_script_help_exits_0_and_names_every_option():
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m repa_ssl.gpu_check" in proc.stdout and "--cpu-smoke" in proc.stdout


@pytest.mark.parametrize("argv,message", [
    (["--dino-iterations", "0"], "must be a positive integer"),
    (["--bench-models", "vit_b16", "nope"], "unknown --bench-models nope"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(argv + ["--output-dir", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_without_cuda_it_says_so_checks_the_configurations_and_exits_0(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda_available"] is False and "CUDA is unavailable" in report["note"]
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("configurations", "ok")]
    assert "CUDA is unavailable" in (tmp_path / "gpu_check.md").read_text()
    assert not (tmp_path / "runs").exists()  # no training without a GPU


def test_cpu_smoke_runs_every_stage(tmp_path):
    """The stages a GPU runs, with the tiny models on the CPU: DINO and its fused export, k-NN, CLIP with its export
    and zero-shot, the synchronised BatchNorm on a one-process gloo group and the benchmark all finish."""
    assert gpu_check.main(["--cpu-smoke", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert all(s["status"] == "ok" for s in stages.values()), [s["error"] for s in stages.values()]
    assert len(stages) == 8 and "repa_ssl.bench" in stages
    depth = stages["depth merging, batch-1 latency"]["figures"]  # deep vs merged, vanilla and RePa
    assert {"vanilla ms", "vanilla merged 2→1 ms", "RePa θ=0.75 fused ms", "RePa θ=0.75 fused+merged 2→1 ms",
            "vanilla merged 2→1 speed-up", "RePa θ=0.75 fused+merged 2→1 speed-up"} <= depth.keys()
    assert stages["DINO fp32 + fused export"]["figures"]["fusion_max_rel_err"] < 1e-4
    assert stages["synchronised BatchNorm, world size 1"]["figures"]["batchnorms"] == "SyncChannelIdleBatchNorm"
    assert 0 <= stages["CLIP --use-bn-sync + export + zero-shot"]["figures"]["zeroshot_top1"] <= 100
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| tiny test ViT (64 px) | fused θ=0.75 |" in md and "| 1 | RePa θ=0.75 fused+merged 2→1 | 1 |" in md
