"""The benchmark suite runs end to end on the tiny model (no timing assertions: machines are noisy)."""
import json

import pytest
import torch

import repa_ssl
from repa_ssl.bench import latency_breakdown
from repa_ssl.bench.__main__ import main
from repa_ssl.bench.ceiling import ceiling_runner
from repa_ssl.bench.memory import saved_activation_bytes
from repa_ssl.speed import measure_throughput
from conftest import tiny_vit


def test_benchmark_writes_json_markdown_and_plots(tmp_path):
    out = main(["--models", "tiny", "--thetas", "0.5", "0.75", "--repeats", "2", "--train-repeats", "1",
                "--train-batch-size", "4", "--batch-size", "2", "--output-dir", str(tmp_path)])
    (res,) = out["results"]
    assert set(res["rows"]) == {"vanilla", "train θ=0.5", "fused θ=0.5", "train θ=0.75", "fused θ=0.75",
                                "ceiling θ=0.5", "ceiling θ=0.75"}
    rows = res["rows"]
    # fused towers have fewer parameters and MACs than their train form, more idle -> fewer still
    assert rows["fused θ=0.75"]["params_m"] < rows["fused θ=0.5"]["params_m"] < rows["train θ=0.5"]["params_m"]
    assert rows["fused θ=0.75"]["gmacs"] < rows["train θ=0.75"]["gmacs"]
    assert rows["vanilla"]["speedup"] == 1.0 and all(r["images_per_s"] > 0 for r in rows.values())
    assert all(r["speedup_iqr"][0] <= r["speedup"] <= r["speedup_iqr"][1] for r in rows.values())
    assert set(res["train_step_s"]) == {"vanilla", "train θ=0.5", "train θ=0.75"}
    assert res["train_step_s"]["vanilla"]["ratio"] == 1.0
    memory = {n: row["memory_ratio"] for n, row in res["train_step_s"].items()}
    assert memory["vanilla"] == 1.0 and memory["train θ=0.75"] < memory["train θ=0.5"] < 1.0  # the lean kernel
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["key"] == "tiny"
    md = (tmp_path / "results.md").read_text()
    assert "| tiny test ViT (64 px) | fused θ=0.75 |" in md and "Latency share" in md
    assert "train memory vs vanilla" in md
    for png in ("latency_breakdown.png", "speedup_vs_theta.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_saved_activation_bytes_counts_each_saved_storage_once_without_weights():
    """Linear saves its input (the weight is excluded), ReLU its output; a view of a saved tensor adds nothing."""
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU())
    x = torch.randn(4, 10)
    assert saved_activation_bytes(model, x) == 4 * (4 * 10 + 4 * 20)

    def halves_multiplied(t):  # mul saves both operands: views of the ReLU output, already counted
        h = model(t)
        return h[:, :10] * h[:, 10:]
    assert saved_activation_bytes(model, x, forward=halves_multiplied) == 4 * (4 * 10 + 4 * 20)


def test_breakdown_puts_the_time_of_each_part_in_its_component(images, monkeypatch):
    """On a clock that only the patch embedding (1 s), each attention (10 s), each FFN (100 s) and the final
    norm (1000 s) advance, every second lands in its own component."""
    now = [0.0]
    monkeypatch.setattr("repa_ssl.bench.breakdown.time.perf_counter", lambda: now[0])

    def costing(seconds, forward):
        def timed(*args, **kwargs):
            now[0] += seconds
            return forward(*args, **kwargs)
        return timed

    model = tiny_vit()
    parts = [(model.patch_embed, 1.0), (model.norm, 1000.0)]
    parts += [(p, s) for block in model.blocks for p, s in ((block.attn, 10.0), (block.mlp, 100.0))]
    for module, seconds in parts:
        module.forward = costing(seconds, module.forward)
    assert len(model.blocks) == 2
    assert latency_breakdown(model, images, repeats=3) == dict(patch_embed=1.0, attention=20.0, ffn=200.0,
                                                               other=1000.0, total=1221.0)


def test_unknown_benchmark_model_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--models", "vit_xxl", "--output-dir", str(tmp_path)])


def test_fused_ffn_layouts_compute_the_fused_ffn_and_a_wrong_one_is_refused(monkeypatch):
    from repa_ssl.bench import layouts

    fused = repa_ssl.ChannelIdleMlp(32, 128, idle_ratio=0.75).eval().fuse()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    candidates = layouts.layouts(fused)
    assert set(candidates) == {"separate", "separate+addmm_", "separate+addmm", "one GEMM", "identity apart"}
    with torch.no_grad():
        for fn in candidates.values():
            torch.testing.assert_close(fn(x), fused(x), rtol=1e-5, atol=1e-5)
    assert layouts.main(["--dim", "32", "--tokens", "64", "--repeats", "2"]).keys() == candidates.keys()

    shipped = layouts.layouts
    monkeypatch.setattr(layouts, "layouts", lambda f: dict(shipped(f), **{"one GEMM": lambda x: f(x) * 1.001}))
    with pytest.raises(AssertionError, match="'one GEMM' is not exact"):
        layouts.main(["--dim", "32", "--tokens", "64", "--repeats", "2"])


@pytest.mark.parametrize("theta", [0.5, 1.0])
def test_ceiling_does_every_multiply_add_of_the_fused_model(theta, images):
    """The ceiling drops norms, biases and residuals, never a matmul: same MACs, so it bounds the fused row."""
    fused = repa_ssl.fuse_model(tiny_vit(idle_ratio=theta, num_classes=0))
    size = tuple(images.shape[1:])
    run = ceiling_runner(fused, images[:1])  # runs the model once, to record what each block reads
    ceiling = repa_ssl.count_gmacs(fused, size, forward=lambda m, x: run())
    assert ceiling == repa_ssl.count_gmacs(fused, size) > 0
    with pytest.raises(TypeError, match="fuse the model first"):
        ceiling_runner(tiny_vit(), images)


def test_speedups_are_medians_of_per_round_ratios(monkeypatch):
    """The machine slows down 10x halfway; each round's ratio still says 'twice as fast'."""
    now, calls = [0.0], [0]

    def runner(cost: float):
        def run():
            slowdown = 1 if calls[0] < 6 else 10  # rounds 0-2 fast, 3-5 slow (2 runners per round)
            now[0] += cost * slowdown
            calls[0] += 1
        return run

    monkeypatch.setattr("repa_ssl.speed.time.perf_counter", lambda: now[0])
    out = measure_throughput({"base": runner(2.0), "fast": runner(1.0)}, batch_size=4, repeats=6, warmup=0,
                             progress=False, baseline="base")
    assert out["fast"]["speedup"] == 2.0 and out["fast"]["speedup_iqr"] == (2.0, 2.0)
    assert out["base"]["speedup"] == 1.0 and out["fast"]["seconds"] == [1.0] * 3 + [10.0] * 3
    with pytest.raises(KeyError, match="baseline"):
        measure_throughput({"a": runner(1.0)}, 1, baseline="b")


def test_training_steps_can_be_timed_with_autograd():
    w = torch.zeros(3, requires_grad=True)

    def step():
        (w * 2).sum().backward()

    measure_throughput({"step": step}, batch_size=1, repeats=1, warmup=0, progress=False, inference=False)
    assert w.grad is not None and w.grad.sum() > 0


def test_dino_and_clip_training_benchmarks_run_end_to_end(tmp_path):
    """Both application benchmarks time real training steps (autograd on) and report paired ratios."""
    from clip.bench import main as clip_bench
    from dino.bench import main as dino_bench

    report = dino_bench(["--arch", "test_repa_vit", "--baseline", "vit_tiny_patch16_224", "--global-crop-size", "64",
                         "--local-crop-size", "32", "--batch-size", "2", "--out-dim", "128", "--repeats", "1",
                         "--warmup", "0", "--output", str(tmp_path / "dino.json")])
    assert report["models"]["vit_tiny_patch16_224"]["speedup_vs_baseline"] == 1.0
    assert report["models"]["test_repa_vit"]["speedup_vs_baseline"] > 0
    assert json.loads((tmp_path / "dino.json").read_text())["models"].keys() == report["models"].keys()
    clip = clip_bench(["--pairs", "tiny", "--batch-size", "2", "--repeats", "1",
                       "--output", str(tmp_path / "clip.json")])
    assert clip["tiny"]["train_ratio_repa_over_vanilla"] > 0


def test_depth_benchmark_times_merged_against_deep_and_writes_its_report(tmp_path):
    """Vanilla merged, RePa fused and fused + merged against the deep vanilla model, per batch size, in one run."""
    from repa_ssl.bench import depth

    out = depth.main(["--model", "demo", "--branches", "2", "4", "--batch-sizes", "1", "2", "--repeats", "2",
                      "--output-dir", str(tmp_path)])
    names = ["vanilla", "vanilla merged 4→2", "vanilla merged 4→1", "RePa θ=0.75 fused", "RePa θ=0.75 fused+merged 4→2",
             "RePa θ=0.75 fused+merged 4→1"]
    assert list(out["batches"]) == ["1", "2"] and all(list(rows) == names for rows in out["batches"].values())
    rows, cost = out["batches"]["2"], out["complexity"]
    assert [rows[n]["layers"] for n in names] == [4, 2, 1, 4, 2, 1]
    assert rows["vanilla"]["speedup"] == 1.0 and rows["vanilla"]["vs_unmerged"] is None
    assert rows["RePa θ=0.75 fused"]["vs_unmerged"] is None and rows["vanilla merged 4→1"]["vs_unmerged"] > 0
    assert all(row["page_faults"] >= 0 for row in rows.values())
    assert cost["vanilla merged 4→1"]["gmacs"] == pytest.approx(cost["vanilla"]["gmacs"])  # merging keeps the MACs
    assert cost["RePa θ=0.75 fused+merged 4→1"]["gmacs"] < cost["RePa θ=0.75 fused"]["gmacs"] < cost["vanilla"]["gmacs"]
    assert json.loads((tmp_path / "results.json").read_text())["batches"]["1"].keys() == set(names)
    assert "| 2 | RePa θ=0.75 fused+merged 4→1 | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "depth_speedup.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="must divide the depth"):
        depth.main(["--model", "demo", "--branches", "3", "--output-dir", str(tmp_path)])
