"""Benchmark results as a Markdown table and PNG plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["to_markdown", "plot_breakdown", "plot_speedup", "subplots"]

_COMPONENTS = ("patch_embed", "attention", "ffn", "other")


def _ratio(value: float, iqr=None) -> str:
    if iqr is None or max(iqr) - min(iqr) < 0.005:
        return f"{value:.2f}x"
    return f"{value:.2f}x ({iqr[0]:.2f}–{iqr[1]:.2f})"


def to_markdown(out: dict) -> str:
    cfg, machine = out["config"], out["machine"]
    head = (f"Machine: {machine['processor']}, {machine['threads']} threads, {machine['device']}"
            f"{' (' + machine['gpu'] + ')' if 'gpu' in machine else ''}, torch {machine['torch']}. "
            f"Inference batch {cfg['batch_size']}, training batch {cfg['train_batch_size']}, "
            f"{'bf16 autocast' if cfg['amp'] else 'fp32'}{', torch.compile' if cfg['compile'] else ''}; "
            f"{cfg['repeats']} interleaved rounds ({cfg['train_repeats']} for training); speed-ups and step ratios "
            f"are medians of per-round ratios to vanilla, with their interquartile range. "
            f"A ceiling row times the fused model's bare GEMMs, attention and GELU (no norms, biases or "
            f"residuals): no exact fused layout can beat it.\n")
    head += ("Train memory: activation memory of a training forward at the training batch, relative to vanilla "
             "(CPU: bytes saved for backward; GPU: peak allocated during forward + backward).\n")
    lines = [head, "| model | variant | params (M) | GMACs | images/s | speed-up vs vanilla | train step vs vanilla "
                   "| train memory vs vanilla |", "|---|---|---|---|---|---|---|---|"]
    for res in out["results"]:
        steps = res.get("train_step_s", {})
        for name, row in res["rows"].items():
            step = steps.get(name)
            step_txt = f"{_ratio(step['ratio'], step.get('ratio_iqr'))} ({step['seconds']:.2f} s)" if step else "–"
            memory_txt = f"{step['memory_ratio']:.2f}x ({step['memory_mb']:.0f} MB)" if step else "–"
            lines.append(f"| {res['label']} ({res['image_size']} px) | {name} | {row['params_m']:.2f} | "
                         f"{row['gmacs']:.3g} | {row['images_per_s']:.1f} | "
                         f"{_ratio(row['speedup'], row.get('speedup_iqr'))} | {step_txt} | {memory_txt} |")
    if any("breakdown" in r for r in out["results"]):
        lines += ["", "Latency share (the paper's Figure 3):", "",
                  "| model | variant | " + " | ".join(_COMPONENTS) + " |", "|---|---|" + "---|" * len(_COMPONENTS)]
        for res in out["results"]:
            for name, b in res.get("breakdown", {}).items():
                shares = " | ".join(f"{100 * b.get(c, 0.0) / b['total']:.0f}%" for c in _COMPONENTS)
                lines.append(f"| {res['label']} | {name} | {shares} |")
    return "\n".join(lines) + "\n"


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """``pyplot.subplots`` for plots written to files: a bare ``Figure`` needs no backend switch (which
    would change a notebook's) and no ``close``. ``figsize`` goes to the figure, the rest to ``Figure.subplots``."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def plot_breakdown(out: dict, path: Path) -> Path:
    """Stacked bars: milliseconds per batch in each component, per model and variant."""
    results = [r for r in out["results"] if "breakdown" in r]
    fig, axes = subplots(1, len(results), figsize=(4.5 * len(results), 4.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        names = list(res["breakdown"])
        bottom = [0.0] * len(names)
        for comp in _COMPONENTS:
            vals = [1e3 * res["breakdown"][n].get(comp, 0.0) for n in names]
            ax.bar(names, vals, bottom=bottom, label=comp)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(res["label"])
        ax.set_ylabel(f"ms per batch of {out['config']['batch_size']}")
        ax.tick_params(axis="x", rotation=30)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(_COMPONENTS))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    return path


def plot_speedup(out: dict, path: Path) -> Path:
    """Inference speed-up over the vanilla model vs the idle ratio θ: one colour per model,
    solid for the fused form, dashed for its ceiling, dotted for the train form."""
    fig, ax = subplots(figsize=(7.5, 4.5))
    for i, res in enumerate(out["results"]):
        for form, style in (("fused", "-o"), ("ceiling", "--"), ("train", ":x")):
            pts = sorted((float(n.split("=")[1]), row["speedup"]) for n, row in res["rows"].items()
                         if n.startswith(form))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}",
                        label=f"{res['label']} {form}" if form != "train" else None)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("idle ratio θ")
    ax.set_ylabel("images/s relative to vanilla (median of paired rounds)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
