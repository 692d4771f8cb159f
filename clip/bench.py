"""Training throughput of RePa CLIPs vs the vanilla OpenCLIP model of the same size, side by side.

    python -m clip.bench                                  # tiny pair and B/16 pair on the CPU
    python -m clip.bench --pairs tiny --batch-size 32 --device cuda

One training step = forward of both towers, CLIP loss, backward, AdamW step (what open_clip_train does
per batch, without data loading). The models of a pair are timed round-robin (``repa_ssl.speed``), so
machine noise hits both alike; the ratio is the number to read. Also reported: image-embedding
inference of the RePa tower in train form, fused, and of the vanilla tower.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable

import open_clip
import torch
from open_clip.loss import ClipLoss
from torch import nn

import repa_ssl
from repa_ssl.models import TEST_VIT_ARGS
from repa_ssl.speed import measure_throughput

_logger = logging.getLogger(__name__)

PAIRS = {"tiny": ("RePa-ViT-Test", "ViT-Test (vanilla)"), "b16": ("RePa-ViT-B-16", "ViT-B-16")}


def _vanilla_test_clip() -> nn.Module:
    """The vanilla twin of RePa-ViT-Test: OpenCLIP's own ViT image tower of its size, the same text tower."""
    cfg = open_clip.get_model_config(PAIRS["tiny"][0])
    vision_cfg = dict(image_size=TEST_VIT_ARGS["img_size"], patch_size=TEST_VIT_ARGS["patch_size"],
                      width=TEST_VIT_ARGS["embed_dim"], layers=TEST_VIT_ARGS["depth"],
                      head_width=TEST_VIT_ARGS["embed_dim"] // TEST_VIT_ARGS["num_heads"])
    return open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=cfg["text_cfg"])


def _create(name: str) -> nn.Module:
    if name == PAIRS["tiny"][1]:
        return _vanilla_test_clip()
    return open_clip.create_model(name)


def _train_step(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> Callable[[], None]:
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_pair(repa_name: str, vanilla_name: str, batch_size: int, repeats: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    models = {repa_name: _create(repa_name).to(device).train(), vanilla_name: _create(vanilla_name).to(device).train()}
    size = models[repa_name].visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch_size, 3, size, size, device=device)
    texts = open_clip.get_tokenizer(repa_name)(["a photo of a cat"] * batch_size).to(device)
    train = measure_throughput({n: _train_step(m, images, texts) for n, m in models.items()},
                               batch_size, repeats=repeats, warmup=1, device=device, baseline=vanilla_name,
                               inference=False)
    fused = repa_ssl.fuse_model(models[repa_name])
    for m in models.values():
        m.eval()
    infer = measure_throughput({f"{repa_name} train form": lambda: models[repa_name].encode_image(images),
                                f"{repa_name} fused": lambda: fused.encode_image(images),
                                vanilla_name: lambda: models[vanilla_name].encode_image(images)},
                               batch_size, repeats=repeats, warmup=1, device=device, baseline=vanilla_name)
    return {
        "batch_size": batch_size,
        "image_tower_params_M": {n: repa_ssl.count_params(m.visual) / 1e6 for n, m in models.items()}
        | {f"{repa_name} fused": repa_ssl.count_params(fused.visual) / 1e6},
        "train_samples_per_s": {n: r["images_per_s"] for n, r in train.items()},
        "train_ratio_repa_over_vanilla": train[repa_name]["speedup"],  # median of paired per-round ratios
        "image_inference_per_s": {n: r["images_per_s"] for n, r in infer.items()},
    }


def to_markdown(results: dict) -> str:
    lines = ["| pair | batch | model | image tower params (M) | train samples/s | image inference img/s |",
             "|---|---|---|---|---|---|"]
    for pair, r in results.items():
        repa, vanilla = PAIRS[pair]
        rows = [(repa, f"{repa} train form"), (f"{repa} fused", f"{repa} fused"), (vanilla, vanilla)]
        for model, infer_key in rows:
            train = r["train_samples_per_s"].get(model)
            lines.append(f"| {pair} | {r['batch_size']} | {model} | {r['image_tower_params_M'][model]:.2f} | "
                         f"{'–' if train is None else f'{train:.2f}'} | {r['image_inference_per_s'][infer_key]:.1f} |")
        lines.append(f"| {pair} | | train ratio RePa / vanilla | | {r['train_ratio_repa_over_vanilla']:.2f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("python -m clip.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["tiny", "b16"])
    p.add_argument("--batch-size", type=int, nargs="+", default=[32, 8],
                   help="one per pair, or one for all (CPU default: 32 tiny, 8 B/16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    logging.getLogger("open_clip").setLevel(logging.ERROR)  # "no pretrained weights" for every model
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.batch_size * len(args.pairs) if len(args.batch_size) == 1 else args.batch_size
    if len(sizes) != len(args.pairs):
        p.error("--batch-size takes one value, or one per pair")
    device = torch.device(args.device)
    results = {pair: bench_pair(*PAIRS[pair], bs, args.repeats, device) for pair, bs in zip(args.pairs, sizes)}
    _logger.info("%s on %s (%d threads)\n%s", "training throughput", device, torch.get_num_threads(),
                 to_markdown(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
