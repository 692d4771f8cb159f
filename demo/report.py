"""The demo's report: ``report.md`` with the tables, and PNG plots (loss curves, accuracies, speed)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from repa_ssl.bench.report import subplots
from repa_ssl.bench.report import to_markdown as bench_markdown
from repa_ssl.checkpoint import atomic_write
from repa_ssl.eval.results import markdown_table

_logger = logging.getLogger(__name__)

__all__ = ["summarize", "read_scalars", "write_report"]


def headline_k(ks: Any) -> int:
    """The k of the headline k-NN numbers: DINO's 20-NN when it was run, else the first k."""
    ks = list(ks)
    return 20 if 20 in ks else ks[0]


def dino_loss_curve(results: dict[str, Any]) -> dict[str, float]:
    """Where DINO's training loss started, bottomed out and ended, beside ln(out_dim)."""
    steps, values = read_scalars(Path(results["dino"]["run_dir"]) / "tb", "train/loss")
    low = min(range(len(values)), key=values.__getitem__)
    return dict(first=values[0], min=values[low], min_iteration=steps[low], last=values[-1],
                last_iteration=steps[-1], ln_out_dim=math.log(results["args"]["out_dim"]))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: top-1 % (k-NN at one k for every row, the linear probe's best epoch), DINO's loss."""
    dino, rnd, pix, clip = results["dino"]["eval"], results["random_init"], results["pixels"], results["clip"]
    zs = clip["zeroshot"].accuracy
    zs = zs["subset_classes"] or zs["all_classes"]
    k = headline_k(pix["knn"])
    return dict(
        knn_k=k,
        knn=dict(dino_fused=dino["knn"].accuracy[k]["top1"], random_init=rnd["knn"].accuracy[k]["top1"],
                 pixels=pix["knn"][k]["top1"]),
        linear=dict(dino_fused=dino["linear"]["best"]["top1"], random_init=rnd["linear"]["best"]["top1"],
                    pixels=pix["linear"]["best"]["top1"]),
        zeroshot=dict(top1=zs["top1"], top5=zs["top5"], chance=100.0 / len(results["data"]["classes"])),
        fusion_max_rel_err=max(r["max_rel_err"] for r in _fusion_rows(results).values() if r),
        dino_loss=dino_loss_curve(results),
    )


def _fusion_rows(results: dict[str, Any]) -> dict[str, Optional[dict[str, Any]]]:
    return {
        "DINO teacher, at export (train images)": results["dino"]["export"]["fusion"],
        "DINO teacher, in the k-NN evaluation (held-out images)": results["dino"]["eval"]["knn"].tower["fusion"],
        "random-init tower, in the k-NN evaluation (held-out images)": results["random_init"]["knn"].tower["fusion"],
        "CLIP image tower, at export (held-out images)": results["clip"]["export"].as_dict(),
        "CLIP image tower, in the zero-shot evaluation (held-out images)": results["clip"]["zeroshot"].tower["fusion"],
    }


def read_scalars(log_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one TensorBoard scalar from every event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_losses(results: dict[str, Any], path: Path) -> Path:
    curves = {"DINO (dino.train)": (Path(results["dino"]["run_dir"]) / "tb", "train/loss"),
              "CLIP (clip.train)": (Path(results["clip"]["run_dir"]) / "tensorboard", "train/loss")}
    fig, axes = subplots(1, 2, figsize=(10, 3.5))
    for ax, (title, (log_dir, tag)) in zip(axes, curves.items()):
        steps, values = read_scalars(log_dir, tag)
        ax.plot(steps, values)
        ax.set(title=title, xlabel="iteration", ylabel="loss")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy(summary: dict[str, Any], path: Path) -> Path:
    groups = {f"k-NN (k = {summary['knn_k']})": summary["knn"], "linear probe (best epoch)": summary["linear"]}
    names = {"dino_fused": "DINO (fused)", "random_init": "random init (fused)", "pixels": "raw pixels"}
    fig, ax = subplots(figsize=(8, 3.8))
    width = 0.25
    for i, (key, label) in enumerate(names.items()):
        xs = [g + (i - 1) * width for g in range(len(groups))]
        bars = ax.bar(xs, [groups[g][key] for g in groups], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    zs = ax.bar([len(groups)], [summary["zeroshot"]["top1"]], width, label="CLIP zero-shot (fused)", color="C3")
    ax.bar_label(zs, fmt="%.1f", fontsize=8)
    ax.axhline(summary["zeroshot"]["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(groups) + 1), [*groups, "zero-shot"])
    ax.set(ylabel="held-out top-1 (%)", ylim=(0, 105))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=5, frameon=False)
    return _save(fig, path)


def plot_speed(speed: dict[str, Any], path: Path) -> Path:
    res = speed["results"]
    fig, axes = subplots(1, len(res), figsize=(4.5 * len(res), 3.5), squeeze=False)
    for ax, r in zip(axes[0], res):
        names = list(r["rows"])
        bars = ax.bar(names, [r["rows"][n]["images_per_s"] for n in names], color=["C7", "C0", "C2"][:len(names)])
        ax.bar_label(bars, labels=[f"{r['rows'][n]['speedup']:.2f}x" for n in names], fontsize=8)
        ax.set(title=f"{r['label']} ({r['image_size']} px)", ylabel="images/s (CPU)")
    return _save(fig, path)


def _accuracy_table(results: dict[str, Any]) -> str:
    dino, rnd, pix = results["dino"]["eval"], results["random_init"], results["pixels"]
    ks = list(pix["knn"])
    rows = []
    for name, r in (("DINO teacher, fused", dino), ("random init, fused", rnd)):
        rows.append([name, *(r["knn"].accuracy[k]["top1"] for k in ks), r["linear"]["best"]["top1"],
                     r["linear"]["last"]["top1"], r["linear"]["feature_dim"]])
    rows.append([f"raw pixels ({pix['image_size']}×{pix['image_size']} grey)", *(pix["knn"][k]["top1"] for k in ks),
                 pix["linear"]["best"]["top1"], pix["linear"]["last"]["top1"], pix["feature_dim"]])
    header = ["features", *(f"k-NN k={k}" for k in ks), "linear (best epoch)", "linear (last epoch)",
              "linear feature dim"]
    return markdown_table(header, rows)


def _tower_table(results: dict[str, Any]) -> str:
    rows = []
    for name, r in (("DINO teacher", results["dino"]["eval"]["knn"]),
                    ("CLIP image tower", results["clip"]["zeroshot"])):
        c = r.costs
        rows.append([f"{name} ({r.tower['name']})", r.tower["params_train_m"], c["params_m"], c["gmacs"],
                     c["images_per_s"]])
    return markdown_table(["tower", "params train form (M)", "params fused (M)", "GMACs fused",
                           "images/s fused (eval batch)"], rows)


def _depth_table(results: dict[str, Any]) -> str:
    """k-NN top-1 of the deep DINO tower, its deep twin trained ``--depth-epochs`` more and the merged tower."""
    a, depth = results["args"], results["depth"]
    ks = list(results["pixels"]["knn"])
    towers = ((f"deep: the DINO tower ({a['dino_epochs']} epochs)", results["dino"]["eval"]["knn"]),
              (f"deep, {a['depth_epochs']} more epochs", depth["deep"]["eval"]["knn"]),
              (f"merged (K = {a['depth_branches']}: depth / {a['depth_branches']}), {a['depth_epochs']} more epochs "
               f"with the join over {a['join_fraction']:.0%} of them", depth["merged"]["eval"]["knn"]))
    rows = [[name, *(r.accuracy[k]["top1"] for k in ks), r.costs["params_m"], r.costs["gmacs"]] for name, r in towers]
    return markdown_table(["tower (fused)", *(f"k-NN k={k}" for k in ks), "params (M)", "GMACs"], rows)


SPEED_NOTE = (
    "CPU timings on a possibly shared machine: read the interquartile ranges. The demo tower is tiny: a forward "
    "takes a few milliseconds at batch 8, so a round in which another process takes the core moves the median of "
    "{rounds} rounds, and on a busy 2-core machine the demo tower's fused/vanilla ratio has read anywhere from "
    "1.1x to 3x. Timed alone it is steady: the fused FFN takes about half the vanilla FFN's time and the "
    "fused tower is about 1.4x as fast (docs/performance.md). "
    "`python -m repa_ssl.bench --models demo --thetas {theta} --repeats 20 --threads 1` times it with more rounds.")


def write_report(results: dict[str, Any], out: Path) -> Path:
    """``report.md`` plus ``loss_curves.png``, ``accuracy.png`` and ``speed.png`` in ``out``."""
    s, d = results["summary"], results["data"]
    plots = [plot_losses(results, out / "loss_curves.png"), plot_accuracy(s, out / "accuracy.png")]
    if results.get("speed"):
        plots.append(plot_speed(results["speed"], out / "speed.png"))
    zs = results["clip"]["zeroshot"]
    loss = s["dino_loss"]
    fusion_rows = [[name, f["max_abs_err"], f["max_rel_err"], f["num_samples"]]
                   for name, f in _fusion_rows(results).items() if f]
    a = results["args"]
    sections = [
        "# RePa-SSL demo",
        f"Data: `{d['root']}` ({len(d['classes'])} classes, {d['num_samples']} training images, {d['num_val']} "
        f"held-out images); DINO tower `{a['dino_arch']}` at θ = {a['idle_ratio']}, {a['dino_epochs']} epochs; "
        f"CLIP `{a['clip_model']}`, {a['clip_epochs']} epochs on `{d['shards']}`. Every accuracy is on the "
        "held-out images, with the fused tower.",
        "## Accuracy (top-1 %)",
        _accuracy_table(results),
        f"k-NN and linear probe on the towers' average-pooled output features, images resized to "
        f"{round(a['image_size'] * 256 / 224)} px and centre-cropped to {a['image_size']} (bicubic; the evaluations' "
        "default, DINO's 256/224 ratio): `scripts/knn_eval.sh` on the same checkpoint gives the same k-NN "
        f"numbers. `accuracy.png` shows k = {s['knn_k']} for every row and the linear probe's best epoch.",
        f"CLIP zero-shot (fused, {zs.num_templates} prompt templates, class names "
        f"{', '.join(d['classes'].values())}): top-1 **{s['zeroshot']['top1']:.1f} %**, top-5 "
        f"{s['zeroshot']['top5']:.1f} % (chance {s['zeroshot']['chance']:.0f} %).",
        "## DINO loss",
        f"The training loss starts at {loss['first']:.2f}, is lowest at iteration {loss['min_iteration']} "
        f"({loss['min']:.2f}) and ends at {loss['last']:.2f} (iteration {loss['last_iteration']}), near "
        f"ln(out_dim) = ln({a['out_dim']}) = {loss['ln_out_dim']:.2f}: the cross-entropy of a uniform prediction "
        "over the prototypes. A randomly initialised head maps every image to nearly the same outputs, so the "
        "sharpened teacher's first targets are confident but alike for all images. The centre (a running mean of "
        "the teacher's outputs) learns that common part within the first epochs and removes it; what is left, "
        "the part that differs between images, is small next to the teacher temperature, so the targets become "
        "nearly uniform and the loss climbs back to ln(out_dim). The features still learn (the k-NN and linear "
        "probe above beat the same tower untrained). `dino.train` computes the reference DINO loss, centring and "
        "temperatures (`tests/test_dino_loss.py`), so a DINO loss that rises on data this small is expected, not "
        "a failure.",
        "## Fused vs train form",
        markdown_table(["check", "max abs err", "max rel err", "images"], fusion_rows),
        "## Towers",
        _tower_table(results),
    ]
    if results.get("depth"):
        sections += ["## Depth reparameterization (k-NN top-1 %)", _depth_table(results),
                     "The merged tower starts from the DINO tower's checkpoint (`dino.train --init-from "
                     "--depth-branches`), joins its branches from s = 1 (the deep tower) to s = 0 and is merged, "
                     "one wide block per group, as it is fused; the deep twin trains as many epochs from the same "
                     "checkpoint, so the two differ by the conversion alone."]
    if results.get("speed"):
        sections += ["## Speed (repa_ssl.bench, inference, fused vs train form vs vanilla timm ViT)",
                     bench_markdown(results["speed"]) + "\n\n" + SPEED_NOTE.format(
                         rounds=a["bench_repeats"], theta=a["idle_ratio"])]
    sections += ["## Plots", "\n".join(f"![{p.stem}]({p.name})" for p in plots),
                 "## Time per step (s)",
                 markdown_table(["step", "seconds"], [[k, v] for k, v in results["seconds"].items()])]
    path = out / "report.md"
    with atomic_write(path) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n")
    return path
