"""``python -m demo``: pretrain, fuse, evaluate and time RePa ViTs on real images, then write a report.

    python -m demo --output-dir outputs/demo                      # digits (scikit-learn), ~3 min on 2 cores
    python -m demo --quick --output-dir /tmp/demo                 # shortened (the test suite's run)
    python -m demo --dino-epochs 100 --dino-arch repa_vit_small_patch16_224 --image-size 224   # scale up
    python -m demo --data my_images/ --image-size 64              # your ImageFolder (train/ and val/)
    python -m demo --data my_images/ --shards 'shards/{00000..00009}.tar' --train-num-samples 10000
    python -m demo --depth-branches 2 --output-dir outputs/demo   # + the DINO tower merged to half its depth

Steps (each an entry point you can also run alone): the images as files (``train/``, ``val/``
ImageFolder; webdataset shards with template captions) -> DINO (``dino.train``) -> fused teacher
(``dino.export``) -> k-NN and linear probe of the fused teacher, of a randomly initialised tower
and of raw pixels (``repa_ssl.eval``) -> CLIP (``clip.train``) -> fused CLIP (``clip.export``) ->
zero-shot on ``val/`` with the class names and a prompt ensemble -> speed (``repa_ssl.bench``) ->
``report.md``, PNG plots and ``results.json`` in ``--output-dir``. With ``--depth-branches K`` the DINO
tower is also converted to K branches per group of K blocks (``dino.train --init-from --depth-branches``),
joined over ``--join-fraction`` of ``--depth-epochs`` more DINO epochs, merged to depth D/K and evaluated
beside a deep tower trained as many more epochs (``dino.train --init-from``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from tqdm import tqdm

from repa_ssl.bench import BenchConfig, run_suite
from repa_ssl.checkpoint import atomic_write
from repa_ssl.cli import HelpFormatter, positive_int
from repa_ssl.data.write_shards import samples_from_folder, write_shards
from repa_ssl.distributed import init_distributed
from repa_ssl.eval import Tower, load_tower, zeroshot
from repa_ssl.eval.knn import KNNOptions, extract_knn_features, knn_on_features
from repa_ssl.eval.zeroshot import ZeroShotOptions, evaluate_zeroshot

from . import baselines, data, report

_logger = logging.getLogger("demo")

QUICK = dict(dino_epochs=2, clip_epochs=3, linear_epochs=30, bench_models=["demo"], bench_repeats=2)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m demo", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/demo"),
                   help="where the data, every run, the report, plots and results.json go")
    p.add_argument("--quick", action="store_true", help="shortened run (fewer epochs, tiny benchmark): ~2 minutes")
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="your ImageFolder root with train/ and val/ (default: scikit-learn's digits, written "
                        "to <output-dir>/data)")
    g.add_argument("--image-size", type=int, default=32,
                   help="size the digits are upscaled to; DINO's global crops and the evaluations' input size")
    g.add_argument("--shards", default=None,
                   help="your webdataset shards for CLIP (brace pattern with .jpg/.txt); default: written from "
                        "train/ with captions from templates")
    g.add_argument("--train-num-samples", type=int, default=None, help="samples in --shards (default: counted)")
    g.add_argument("--classnames", type=Path, default=None,
                   help="zero-shot class names, lines 'folder class name' (default: digit names / folder names)")
    g = p.add_argument_group("DINO")
    g.add_argument("--dino-arch", default="demo_repa_vit", help="timm RePa model (any repa_vit_*)")
    g.add_argument("--idle-ratio", type=float, default=0.75, help="θ of the DINO tower")
    g.add_argument("--dino-epochs", type=int, default=8, help="DINO pretraining epochs")
    g.add_argument("--dino-batch-size", type=int, default=64, help="images per DINO step")
    g.add_argument("--dino-lr", type=float, default=0.001, help="per 256 images, as dino.train")
    g.add_argument("--out-dim", type=int, default=1024, help="DINO head prototypes")
    g.add_argument("--teacher-temp", type=float, default=0.04, help="DINO teacher temperature")
    g.add_argument("--local-crops-number", type=int, default=4, help="small crops per image, besides the 2 global")
    g.add_argument("--depth-branches", type=positive_int, default=1,
                   help="K > 1: also convert the DINO tower to K branches per group of K blocks, join, merge to "
                        "depth / K and evaluate it beside the deep tower trained as long (1: off)")
    g.add_argument("--depth-epochs", type=int, default=4, help="DINO epochs of the conversion (and of the deep twin)")
    g.add_argument("--join-fraction", type=float, default=0.5,
                   help="share of --depth-epochs over which the branches join (s from 1 to 0)")
    g.add_argument("--dino-args", nargs=argparse.REMAINDER, default=[],
                   help="further dino.train flags, passed as they are (must come last)")
    g = p.add_argument_group("CLIP")
    g.add_argument("--clip-model", default="RePa-ViT-Demo", help="RePa OpenCLIP config (θ is part of the name)")
    g.add_argument("--clip-epochs", type=int, default=8, help="CLIP training epochs")
    g.add_argument("--clip-batch-size", type=int, default=64, help="image-caption pairs per CLIP step")
    g.add_argument("--clip-lr", type=float, default=1e-3, help="CLIP learning rate (AdamW, cosine)")
    g = p.add_argument_group("evaluation and speed")
    g.add_argument("--nb-knn", type=int, nargs="+", default=[10, 20], help="k of the k-NN classifiers")
    g.add_argument("--linear-epochs", type=int, default=100, help="linear probe epochs")
    g.add_argument("--linear-lr", type=float, default=1.0, help="per 256 images (SGD on cached features)")
    g.add_argument("--pixel-size", type=int, default=16, help="raw-pixel baseline: images resized to this, grey")
    g.add_argument("--bench-models", nargs="*", default=["demo", "vit_b16"],
                   help="repa_ssl.bench models ('demo': demo_repa_vit vs the vanilla timm ViT of its size); "
                        "no value: skip the benchmark")
    g.add_argument("--bench-repeats", type=int, default=3, help="timed repeats per benchmark measurement")
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads; with --workers 1 a 2-core machine computes on one core and decodes/"
                        "augments on the other (more threads oversubscribe it)")
    g.add_argument("--workers", type=int, default=1, help="data-loading processes for DINO and CLIP")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where everything runs")
    g.add_argument("--seed", type=int, default=0, help="seed of DINO, CLIP, the evaluations and the caption templates")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


class Stages:
    """A progress bar over the demo's steps, and how long each took."""

    def __init__(self, names: Sequence[str]) -> None:
        self.bar = tqdm(total=len(names), desc="demo", position=0, dynamic_ncols=True)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        _logger.info("== %s", name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def evaluate_tower(tower: Tower, args: argparse.Namespace, data_root: Path, out: Path, env) -> dict[str, Any]:
    """k-NN (``repa_ssl.eval.knn``: fuses the tower, checks the fusion) and a linear probe on its features.

    Images are resized to ``image_size`` × 256/224 and centre-cropped, the evaluations' default (DINO's
    protocol), so ``scripts/knn_eval.sh`` on the same checkpoint gives the same k-NN numbers. The linear
    probe trains ``repa_ssl.eval.linear``'s classifier on the same output features as the k-NN: the demo
    tower is average-pooled, so the DINO protocol's class tokens of the last blocks are not what it was
    trained to output.
    """
    tower.image_size = args.image_size
    options = KNNOptions(data_path=data_root, ks=args.nb_knn, batch_size=256, num_workers=0, seed=args.seed)
    train, val = extract_knn_features(tower, options, env)
    knn_result = knn_on_features(train, val, options, env.device)
    knn_result.write(out)
    return dict(knn=knn_result, linear=baselines.linear_probe(train, val, env, args.linear_epochs, args.linear_lr))


def run_dino(args: argparse.Namespace, train_dir: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """``dino.train`` with the demo's settings; ``overrides`` are ``DINOConfig`` fields (then ``--dino-args``)."""
    from dino import train as dino_train

    cfg = dino_train.DINOConfig(
        arch=args.dino_arch, idle_ratio=args.idle_ratio, data_source="folder", data_path=str(train_dir),
        output_dir=str(out), epochs=args.dino_epochs, warmup_epochs=max(1, args.dino_epochs // 10),
        batch_size_per_gpu=args.dino_batch_size, lr=args.dino_lr, out_dim=args.out_dim, head_hidden_dim=256,
        head_bottleneck_dim=64, teacher_temp=args.teacher_temp, warmup_teacher_temp=args.teacher_temp,
        momentum_teacher=0.99, drop_path_rate=0.0, local_crops_number=args.local_crops_number,
        global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5), global_crop_size=args.image_size,
        local_crop_size=args.image_size // 2, num_workers=args.workers, saveckp_freq=0, seed=args.seed,
        device=args.device)
    cfg = dataclasses.replace(cfg, **overrides)
    if args.dino_args:  # further dino.train flags, over the demo's settings
        parser = dino_train.get_args_parser()
        parser.set_defaults(**dataclasses.asdict(cfg))
        cfg = dino_train.DINOConfig(**vars(parser.parse_args(args.dino_args)))
    result = dino_train.train(cfg)
    export = json.loads(result.fused_export.with_suffix(".json").read_text())
    return dict(run=result, run_dir=str(out), export=export)


def run_depth(args: argparse.Namespace, data_root: Path, dino_dir: Path, out: Path, env) -> dict[str, Any]:
    """The DINO tower merged to depth / K after ``--depth-epochs`` of DINO with the join schedule, and its deep
    twin trained as many epochs from the same checkpoint, each exported fused and evaluated."""
    towers = {}
    for name, branches in (("merged", args.depth_branches), ("deep", 1)):
        run = run_dino(args, data_root / "train", out / name, init_from=str(dino_dir / "checkpoint.pth"),
                       depth_branches=branches, join_fraction=args.join_fraction, epochs=args.depth_epochs,
                       warmup_epochs=0)
        run["eval"] = evaluate_tower(load_tower(run["run"].fused_export), args, data_root, out / "eval" / name, env)
        towers[name] = run
    return towers


def run_clip(args: argparse.Namespace, shards: str, num_samples: int, out: Path) -> dict[str, Any]:
    from clip import train as clip_train

    cfg = clip_train.CLIPTrainConfig(
        model=args.clip_model, train_data=shards, logs=out, name="clip", train_num_samples=num_samples,
        epochs=args.clip_epochs, batch_size=args.clip_batch_size, lr=args.clip_lr, wd=0.1, warmup=20,
        workers=args.workers, device=args.device, precision="fp32", seed=args.seed, resume="latest",
        extra=("--dataset-type", "webdataset", "--report-to", "tensorboard", "--save-most-recent",
               "--save-frequency", "0", "--log-every-n-steps", "1"))
    result = clip_train.train(cfg)
    return dict(argv=cfg.argv(), checkpoint=str(result.checkpoint), run_dir=str(result.run_dir))


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # an in-process caller (the tests) keeps its own setting


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed(args.device)
    stages = Stages(["data", "DINO pretraining", "DINO evaluation", *(["depth"] if args.depth_branches > 1 else []),
                     "baselines", "CLIP pretraining", "CLIP zero-shot", "speed benchmark", "report"])
    results: dict[str, Any] = dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    start = time.perf_counter()

    with stages("data"):
        root = args.data or data.write_digits_folder(out / "data", args.image_size)
        folders = data.check_folder(root)
        names = zeroshot.load_classnames(args.classnames) if args.classnames else None
        classnames = data.write_classnames(out / "classnames.txt", folders, names)
        templates = data.write_templates(out / "templates.txt")
        if args.shards:
            shards, num_samples = args.shards, args.train_num_samples
            if num_samples is None:
                from repa_ssl.data import count_shard_samples, expand_shards

                num_samples = count_shard_samples(expand_shards(shards))
        else:
            samples = data.captioned_samples(root / "train", classnames, args.seed)
            written = write_shards(samples, out / "shards", overwrite=True)  # a rerun replaces its own shards
            shards, num_samples = data.shard_pattern(written), len(samples)
        results["data"] = dict(root=str(root), classes=classnames, shards=shards, num_samples=num_samples,
                               num_val=sum(1 for _ in samples_from_folder(root / "val")))

    with stages("DINO pretraining"):
        dino_dir = out / "dino"
        results["dino"] = run_dino(args, root / "train", dino_dir)

    with stages("DINO evaluation"):
        tower = load_tower(dino_dir / "checkpoint.pth")
        results["dino"]["eval"] = evaluate_tower(tower, args, root, out / "eval" / "dino", env)

    if args.depth_branches > 1:
        with stages("depth"):
            results["depth"] = run_depth(args, root, dino_dir, out / "depth", env)

    with stages("baselines"):
        random_path = baselines.save_random_tower(args.dino_arch, args.idle_ratio, out / "random_init.pth", args.seed)
        tower = load_tower(random_path, args.dino_arch, idle_ratio=args.idle_ratio)
        results["random_init"] = evaluate_tower(tower, args, root, out / "eval" / "random_init", env)
        results["pixels"] = baselines.pixel_baselines(root, args.pixel_size, env, args.nb_knn, args.linear_epochs,
                                                      args.linear_lr)

    with stages("CLIP pretraining"):
        from clip.export import export_fused_clip

        results["clip"] = run_clip(args, shards, num_samples, out / "clip")
        fused_clip = out / "clip_fused.pt"
        results["clip"]["export"] = export_fused_clip(results["clip"]["checkpoint"], args.clip_model, fused_clip,
                                                      root / "val")

    with stages("CLIP zero-shot"):
        options = ZeroShotOptions(data=root / "val", classnames=out / "classnames.txt", templates=str(templates),
                                  batch_size=256, num_workers=0, seed=args.seed)
        results["clip"]["zeroshot"] = evaluate_zeroshot(load_tower(fused_clip, clip=True), options, env)
        results["clip"]["zeroshot"].write(out / "eval" / "clip")

    with stages("speed benchmark"):
        cfg = BenchConfig(models=args.bench_models, thetas=[args.idle_ratio], batch_size=8,
                          repeats=args.bench_repeats, warmup=1, threads=args.threads, device=args.device, train=False,
                          breakdown=False, ceiling=False)
        results["speed"] = run_suite(cfg) if args.bench_models else None

    with stages("report"):
        results["seconds"] = dict(stages.seconds, total=time.perf_counter() - start)
        results["summary"] = report.summarize(results)
        with atomic_write(out / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=_jsonable))
        report.write_report(results, out)
    stages.close()
    _logger.info("report: %s (total %.0f s)", out / "report.md", time.perf_counter() - start)
    return results


def _jsonable(value: Any) -> Any:
    """results.json: the evaluations' and the fusion check's own JSON, dataclasses as dicts, paths as text."""
    for method in ("to_json", "as_dict"):
        if hasattr(value, method):
            return getattr(value, method)()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


if __name__ == "__main__":
    main()
