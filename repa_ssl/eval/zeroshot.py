"""Zero-shot classification with a CLIP model whose image tower is fused (OpenCLIP protocol).

    python -m repa_ssl.eval.zeroshot logs/run/checkpoints/epoch_32.pt /datasets/imagenet/val \\
        --model RePa-ViT-B-16 --output-dir outputs/zeroshot

OpenCLIP's ImageNet class names and prompt templates (``open_clip.zero_shot_metadata``);
class embeddings are the normalised means over templates; top-1 and top-5.

Labels come from the folder NAMES, never from their sorted order: each synset folder
(``n01440764`` ...) is mapped to its true ImageNet-1k index with timm's synset list, so any
subset of the 1000 folders is labelled right. Accuracy is reported over the 1000-way
classifier and, for a subset, separately over the subset's classes. Any other folder works
with ``--classnames FILE``: JSON ``{"folder": "class name"}`` or text lines ``folder class name``
(the layout of ImageNet's ``LOC_synset_mapping.txt``).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..data import RobustImageFolder
from ..distributed import shutdown
from .cli import add_common_args, fuse_on_first_batch, prepare_tower, setup
from .data import eval_transform, make_loader
from .features import clip_image, extract_features
from .results import topk_correct, write_results

_logger = logging.getLogger("repa_ssl.eval.zeroshot")

__all__ = ["LabelSpace", "imagenet_class_indices", "label_space", "load_templates", "zero_shot_accuracy", "main"]

Template = Union[str, Callable[[str], str]]


def imagenet_class_indices(folders: Sequence[str]) -> list[int]:
    """The true ImageNet-1k class index of each synset folder name (not its position among the folders)."""
    from timm.data import ImageNetInfo

    index = {synset: i for i, synset in enumerate(ImageNetInfo("imagenet-1k").label_names())}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(
            f"{len(unknown)} class folders are not ImageNet-1k synset ids (e.g. {unknown[:3]}): name them like "
            "n01440764, or pass --classnames FILE mapping each folder to its class name.")
    return [index[f] for f in folders]


def read_classnames(path: Union[str, Path], folders: Sequence[str]) -> list[str]:
    """Class name of each folder from JSON ``{folder: name}`` or text lines ``folder name``."""
    path = Path(path)
    if path.suffix == ".json":
        mapping = json.loads(path.read_text())
    else:
        mapping = dict(line.strip().split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise ValueError(f"{path} names no class for folders {missing[:5]}; add a line '<folder> <class name>'.")
    return [mapping[f] for f in folders]


def load_templates(spec: str) -> list[Template]:
    """``openai`` (80 prompts), ``simple`` (2) or a text file with one template per line, ``{}`` for the name."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if spec == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    lines = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    if not lines or any("{}" not in line for line in lines):
        raise ValueError(f"{spec}: every template line needs '{{}}' where the class name goes "
                         "(e.g. 'a photo of a {}.').")
    return [lambda c, t=t: t.replace("{}", c) for t in lines]


@dataclass
class LabelSpace:
    """The classifier's classes and how the dataset's folders map onto them."""

    classnames: list[str]  # one per classifier column
    folder_to_class: dict[int, int]  # ImageFolder target -> classifier column
    subset: Optional[list[int]]  # classifier columns of the folders, when they cover only part of it


def label_space(folders: Sequence[str], classnames_file: Optional[Union[str, Path]] = None) -> LabelSpace:
    if classnames_file:
        return LabelSpace(read_classnames(classnames_file, folders), {i: i for i in range(len(folders))}, None)
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    columns = imagenet_class_indices(folders)
    subset = columns if len(set(columns)) < len(IMAGENET_CLASSNAMES) else None
    return LabelSpace(list(IMAGENET_CLASSNAMES), dict(enumerate(columns)), subset)


def _topk_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    top1, top5 = topk_correct(logits, targets)
    n = max(len(targets), 1)
    return dict(top1=100.0 * top1 / n, top5=100.0 * top5 / n)


def zero_shot_accuracy(features: torch.Tensor, targets: torch.Tensor, classifier: torch.Tensor,
                       subset: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Top-1/top-5 (%) over every classifier column and, given ``subset``, over those columns only.

    ``features`` (N, D) and ``classifier`` (D, C) are L2-normalised; ``targets`` are classifier columns.
    """
    logits = features @ classifier
    out: dict[str, Any] = {"all_classes": _topk_accuracy(logits, targets), "subset_classes": None}
    if subset is not None:
        position = torch.full((classifier.shape[1],), -1, dtype=torch.long)
        position[torch.as_tensor(subset)] = torch.arange(len(subset))
        out["subset_classes"] = _topk_accuracy(logits[:, list(subset)], position[targets])
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser("python -m repa_ssl.eval.zeroshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("data", help="validation folder: synset sub-folders (n01440764/ ...) or any folders + --classnames")
    p.add_argument("--classnames", default=None, help="class name per folder (JSON or 'folder name' lines)")
    p.add_argument("--templates", default="openai", help="openai | simple | a file of templates with {}")
    p.add_argument("--classes-per-batch", type=int, default=10, help="class names per text-encoder batch")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    import open_clip

    args = parse_args(argv)
    env = setup(args)
    tower = prepare_tower(args, env, clip=True)
    if args.image_size or args.resize_size:
        transform = eval_transform(tower.image_size, tower.mean, tower.std, args.resize_size)
    else:  # the model's own OpenCLIP preprocessing
        from open_clip.transform import PreprocessCfg, image_transform_v2

        transform = image_transform_v2(PreprocessCfg(**tower.model.visual.preprocess_cfg), is_train=False)
    folders = RobustImageFolder(args.data).classes
    labels = label_space(folders, args.classnames)
    dataset = RobustImageFolder(args.data, transform=transform, target_transform=labels.folder_to_class.__getitem__)
    loader = make_loader(dataset, args.batch_size, args.num_workers, env)
    fn, costs = fuse_on_first_batch(tower, loader, env, args, clip_image)
    templates = load_templates(args.templates)
    _logger.info("building the %d-class classifier from %d templates", len(labels.classnames), len(templates))
    classifier = open_clip.build_zero_shot_classifier(
        tower.model, open_clip.get_tokenizer(tower.name), labels.classnames, templates,
        num_classes_per_batch=args.classes_per_batch, device=env.device, use_tqdm=env.is_main)
    feats = extract_features(fn, loader, env, desc="image features")
    results = None
    if env.is_main:
        acc = zero_shot_accuracy(feats.features, feats.labels, classifier.float().cpu(), labels.subset)
        results = dict(evaluation="zero-shot", tower=tower.summary(), costs=costs, data=str(args.data),
                       num_images=len(feats.labels), num_folders=len(folders), num_classes=len(labels.classnames),
                       templates=args.templates, num_templates=len(templates), num_skipped=feats.num_skipped,
                       accuracy=acc, args=vars(args))
        rows = [[f"all {len(labels.classnames)} classes", acc["all_classes"]["top1"], acc["all_classes"]["top5"]]]
        if acc["subset_classes"] is not None:
            rows.append([f"the {len(folders)} folders' classes", acc["subset_classes"]["top1"],
                         acc["subset_classes"]["top5"]])
        write_results(args.output_dir, "zeroshot_results", f"Zero-shot, {tower.name}, {Path(args.data).name}",
                      results, ["classes", "top-1 (%)", "top-5 (%)"], rows)
    shutdown()
    return results


if __name__ == "__main__":
    main()
