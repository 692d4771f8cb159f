"""Latency share of patch embedding, attention and FFN (the paper's Figure 3), via forward hooks."""
from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch import nn

__all__ = ["latency_breakdown", "component_modules"]

# Attribute names of the pieces of a transformer block in timm, RePa and OpenCLIP blocks.
_ATTENTION_PARTS = ("norm1", "ln_1", "attn")
_FFN_PARTS = ("norm2", "ln_2", "mlp")
_PATCH_EMBED = ("patch_embed", "conv1")


def component_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Map 'patch_embed' / 'attention' / 'ffn' to the modules whose time they own."""
    parts: dict[str, list[nn.Module]] = defaultdict(list)
    for name, module in model.named_modules():
        if hasattr(module, "attn") and hasattr(module, "mlp"):
            parts["attention"] += [getattr(module, n) for n in _ATTENTION_PARTS if hasattr(module, n)]
            parts["ffn"] += [getattr(module, n) for n in _FFN_PARTS if hasattr(module, n)]
        elif name.split(".")[-1] in _PATCH_EMBED and not parts["patch_embed"]:
            parts["patch_embed"].append(module)
    if not parts["attention"]:
        raise ValueError(f"no transformer blocks (modules with .attn and .mlp) found in {type(model).__name__}")
    return dict(parts)


@torch.inference_mode()
def latency_breakdown(model: nn.Module, x: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Median seconds per forward spent in each component; 'other' is the rest (norms, head, adds)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []
    for component, modules in component_modules(model).items():
        for m in modules:
            def pre(mod, args, _id=id(m)):
                sync()
                starts[_id] = time.perf_counter()

            def post(mod, args, out, _id=id(m), _c=component):
                sync()
                spent[_c] += time.perf_counter() - starts.pop(_id)

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    runs = []
    try:
        model(x)  # warm-up
        for _ in range(repeats):
            spent.clear()
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            total = time.perf_counter() - t0
            runs.append(dict(spent, total=total, other=max(0.0, total - sum(spent.values()))))
    finally:
        for h in handles:
            h.remove()
    runs.sort(key=lambda r: r["total"])
    return runs[len(runs) // 2]
