"""The benchmark suite runs end to end on the tiny model (no timing assertions: machines are noisy)."""
import json

import pytest
import torch

from repa_ssl.bench import latency_breakdown
from repa_ssl.bench.__main__ import main
from conftest import tiny_vit


def test_benchmark_writes_json_markdown_and_plots(tmp_path):
    out = main(["--models", "tiny", "--thetas", "0.5", "0.75", "--repeats", "2", "--train-repeats", "1",
                "--train-batch-size", "4", "--batch-size", "2", "--output-dir", str(tmp_path)])
    (res,) = out["results"]
    assert set(res["rows"]) == {"vanilla", "train θ=0.5", "fused θ=0.5", "train θ=0.75", "fused θ=0.75"}
    rows = res["rows"]
    # fused towers have fewer parameters and MACs than their train form, more idle -> fewer still
    assert rows["fused θ=0.75"]["params_m"] < rows["fused θ=0.5"]["params_m"] < rows["train θ=0.5"]["params_m"]
    assert rows["fused θ=0.75"]["gmacs"] < rows["train θ=0.75"]["gmacs"]
    assert rows["vanilla"]["speedup"] == 1.0 and all(r["images_per_s"] > 0 for r in rows.values())
    assert set(res["train_step_s"]) == {"vanilla", "train θ=0.5", "train θ=0.75"}
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["key"] == "tiny"
    md = (tmp_path / "results.md").read_text()
    assert "| tiny test ViT (64 px) | fused θ=0.75 |" in md and "Latency share" in md
    for png in ("latency_breakdown.png", "speedup_vs_theta.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_breakdown_components_add_up_to_the_total(images):
    b = latency_breakdown(tiny_vit(), images, repeats=1)
    assert {"patch_embed", "attention", "ffn", "other", "total"} <= set(b)
    parts = b["patch_embed"] + b["attention"] + b["ffn"] + b["other"]
    assert parts == pytest.approx(b["total"], rel=1e-6) and b["ffn"] > 0 and b["attention"] > 0


def test_unknown_benchmark_model_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--models", "vit_xxl", "--output-dir", str(tmp_path)])


def test_fused_ffn_layout_comparison_checks_every_layout_is_exact():
    from repa_ssl.bench.layouts import main as layouts_main

    times = layouts_main(["--dim", "32", "--tokens", "64", "--repeats", "2"])
    assert set(times) == {"separate", "separate+addmm", "one GEMM", "identity apart"}
    assert all(t > 0 for t in times.values())
