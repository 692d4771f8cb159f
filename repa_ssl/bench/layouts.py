"""Which layout of the fused FFN is fastest? ``python -m repa_ssl.bench.layouts``.

All layouts compute the same function (checked against ``ReparamChannelIdleMlp``):

* ``separate`` (the shipped one): ``linear(x) + fc_out(act(fc_in(x)))`` (identity folded into
  ``linear``), ``fc_out`` as its own GEMM and an elementwise add.
* ``separate+addmm_``: the same with the active path accumulated into the linear path's output in
  place (``addmm_``, one GEMM with beta=1).
* ``separate+addmm``: the add fused into ``fc_out``'s GEMM out of place (a copy of the linear half).
* ``one GEMM``: ``[W_a; W̃]`` in a single GEMM, then ``addmm`` into the linear half.
* ``identity apart``: ``x + (W̃ - I) x + ...``, the shortcut as an explicit add.
"""
from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from ..layers import ChannelIdleMlp
from ..speed import measure_throughput

_logger = logging.getLogger("repa_ssl.bench.layouts")


def layouts(fused) -> dict:
    w, b = fused.linear.weight, fused.linear.bias
    wa, ba, wo = fused.fc_in.weight, fused.fc_in.bias, fused.fc_out.weight
    k, act = wa.shape[0], fused.act
    w_cat, b_cat = torch.cat([wa, w]), torch.cat([ba, b])
    w_apart = w - torch.eye(w.shape[0])

    def one_gemm(x):
        h = F.linear(x, w_cat, b_cat)
        return torch.addmm(h[:, k:], act(h[:, :k]), wo.t())

    return {
        "separate": fused,
        "separate+addmm_": lambda x: F.linear(x, w, b).addmm_(act(F.linear(x, wa, ba)), wo.t()),
        "separate+addmm": lambda x: torch.addmm(F.linear(x, w, b), act(F.linear(x, wa, ba)), wo.t()),
        "one GEMM": one_gemm,
        "identity apart": lambda x: x + F.linear(x, w_apart, b) + F.linear(act(F.linear(x, wa, ba)), wo),
    }


@torch.inference_mode()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser("python -m repa_ssl.bench.layouts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768, help="embedding width C (768: ViT-B)")
    p.add_argument("--tokens", type=int, default=8 * 197, help="tokens per call (batch 8 at 224 px, patch 16)")
    p.add_argument("--idle-ratio", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fused = ChannelIdleMlp(args.dim, 4 * args.dim, idle_ratio=args.idle_ratio).eval().fuse()
    x = torch.randn(args.tokens, args.dim)
    ref = fused(x)
    candidates = layouts(fused)
    for name, fn in candidates.items():
        err = ((fn(x) - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-5:
            raise AssertionError(f"layout {name!r} is not exact: relative error {err:.2e}")
    speed = measure_throughput({n: (lambda f=f: f(x)) for n, f in candidates.items()}, args.tokens, args.repeats,
                               baseline="separate")
    lines = [f"Fused FFN layouts, C={args.dim}, θ={args.idle_ratio}, {args.tokens} tokens, {args.threads} threads",
             "| layout | ms per call | time relative to shipped (median of paired rounds) |", "|---|---|---|"]
    lines += [f"| {n} | {1e3 * s['median_s']:.2f} | {1 / s['speedup']:.2f}x |" for n, s in speed.items()]
    _logger.info("\n%s", "\n".join(lines))
    return {n: s["median_s"] for n, s in speed.items()}


if __name__ == "__main__":
    main()
