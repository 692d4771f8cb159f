"""The main job on the embedded default data: train form -> fused form, checked and timed.

Calibrates a RePa ViT's BatchNorm statistics on real images (scikit-learn's digits),
fuses it, verifies the fused model against the train form on held-out digits, and
compares parameters, GMACs and CPU throughput with the vanilla timm ViT of the same size.

    python -m repa_ssl.demo --model repa_vit_small_patch16_224 --output-dir outputs/demo
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

import timm
import torch
from tqdm import tqdm

import repa_ssl
from repa_ssl.data import load_digits_images
from repa_ssl.speed import measure_throughput

_logger = logging.getLogger("repa_ssl.demo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="repa_vit_small_patch16_224", help="RePa timm model name")
    p.add_argument("--baseline", default=None, help="vanilla timm model (default: the model name without 'repa_')")
    p.add_argument("--idle-ratio", type=float, default=0.75)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib-batches", type=int, default=8, help="train-mode passes that set BatchNorm statistics")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output-dir", default="outputs/demo")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, num_classes=0, idle_ratio=args.idle_ratio)
    size = model.pretrained_cfg["input_size"][-1]
    baseline_name = args.baseline or args.model.replace("repa_", "")
    baseline = (timm.create_model(baseline_name, num_classes=0, img_size=size).eval()
                if timm.is_model(baseline_name) else None)

    train_x, _ = load_digits_images(size, "train")
    val_x, _ = load_digits_images(size, "val")
    # Running statistics from real images, so the fusion check is on non-trivial BatchNorms.
    model.train()
    with torch.no_grad():
        for i in tqdm(range(args.calib_batches), desc="BatchNorm calibration"):
            model(train_x[i * args.batch_size:(i + 1) * args.batch_size])
    model.eval()
    fused = repa_ssl.fuse_model(model)
    report = repa_ssl.verify_fusion(model, fused, val_x[: args.batch_size]).check()
    _logger.info("fused vs train form on %d held-out digits: max abs %.2e, max rel %.2e",
                 report.num_samples, report.max_abs_err, report.max_rel_err)

    towers = {"train form (eval)": model, "fused": fused}
    if baseline is not None:
        towers = {f"vanilla {baseline_name}": baseline, **towers}
    x = val_x[: args.batch_size]
    speed = measure_throughput({n: (lambda m=m: m(x)) for n, m in towers.items()}, args.batch_size, args.repeats)
    rows = []
    for name, m in towers.items():
        rows.append(dict(model=name, params_m=repa_ssl.count_params(m) / 1e6,
                         gmacs=repa_ssl.count_gmacs(m, (3, size, size)), **speed[name]))
    ref_speed = rows[0]["images_per_s"]
    lines = [f"| model | params (M) | GMACs | images/s | speed-up |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s'] / ref_speed:.2f}x |")
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    table = "\n".join(lines)
    _logger.info("%s, theta=%s, batch %d, %dpx, %s\n%s", args.model, args.idle_ratio, args.batch_size, size,
                 machine, table)
    results = dict(model=args.model, idle_ratio=args.idle_ratio, batch_size=args.batch_size, image_size=size,
                   machine=machine, fusion=report.as_dict(), rows=rows)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(f"{args.model}, θ={args.idle_ratio}, batch {args.batch_size}, {machine}\n\n"
                                    f"{table}\n")
    _logger.info("wrote %s", out / "results.json")
    return results


if __name__ == "__main__":
    main()
