"""``torchrun -m repa_ssl.bench.ddp`` times the DDP training step with two gloo processes and counts what the
synchronised BatchNorms send (no timing assertions: machines are noisy)."""
import json
import os
import subprocess
import sys

from repa_ssl.models import TEST_VIT_ARGS

from dino_helpers import ROOT


def test_two_processes_write_ratios_and_all_reduced_elements(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "repa_ssl.bench.ddp", "--model", "tiny", "--rounds", "1", "--batch-size", "4",
           "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "results.json").read_text())
    assert out["machine"]["world_size"] == 2 and out["machine"]["backend"] == "gloo"
    assert out["machine"]["threads"] == 1
    rows = out["rows"]
    assert set(rows) == {"vanilla", "RePa θ=0.5", "RePa θ=0.75"}
    assert rows["vanilla"]["ratio"] == 1.0 and all(r["ratio"] > 0 and r["seconds"] > 0 for r in rows.values())
    assert rows["vanilla"]["all_reduced_elements"]["total"] == 0  # LayerNorms only
    # each block's two FFN BatchNorms (width C and 4C) send 2C + 1 + 8C + 1 forward and 2C + 8C backward,
    # torch's SyncBatchNorm figure: the statistics are taken over both processes
    c, depth = TEST_VIT_ARGS["embed_dim"], TEST_VIT_ARGS["depth"]
    for theta in (0.5, 0.75):
        sent = rows[f"RePa θ={theta}"]["all_reduced_elements"]
        assert (sent["forward"], sent["backward"]) == (depth * (10 * c + 2), depth * 10 * c)
        assert sent["total"] == sent["torch_sync_batchnorm"] and sent["synchronised_batchnorms"] == 2 * depth
    assert "| RePa θ=0.75 |" in (tmp_path / "results.md").read_text()
