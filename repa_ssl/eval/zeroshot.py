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
from typing import Any, Callable, ClassVar, Optional, Sequence, Union

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from timm.data import ImageNetInfo

from ..data import RobustImageFolder
from ..distributed import DistEnv
from .cli import add_common_args, common_options, prepare_tower, run_evaluation
from .data import eval_transform, make_loader
from .features import clip_image, extract_features
from .options import EvalOptions, EvalResult, default_env, fuse_on_first_batch
from .results import topk_correct
from .towers import Tower

_logger = logging.getLogger("repa_ssl.eval.zeroshot")

__all__ = ["ZeroShotOptions", "ZeroShotResult", "evaluate_zeroshot", "LabelSpace", "imagenet_class_indices",
           "label_space", "load_templates", "zero_shot_accuracy", "main"]

Template = Union[str, Callable[[str], str]]


def imagenet_class_indices(folders: Sequence[str]) -> list[int]:
    """The true ImageNet-1k class index of each synset folder name (not its position among the folders)."""
    index = {synset: i for i, synset in enumerate(ImageNetInfo("imagenet-1k").label_names())}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(
            f"{len(unknown)} class folders are not ImageNet-1k synset ids (e.g. {unknown[:3]}): name them like "
            "n01440764, or pass --classnames FILE mapping each folder to its class name.")
    return [index[f] for f in folders]


def load_classnames(path: Union[str, Path]) -> dict[str, str]:
    """``{folder: class name}`` from JSON ``{folder: name}`` or text lines ``folder name``."""
    path = Path(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    lines = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    for parts in lines:
        if len(parts) != 2:
            raise ValueError(f"{path}: line {parts[0]!r} names no class; write '<folder> <class name>'.")
    return {folder: name.strip() for folder, name in lines}


def read_classnames(path: Union[str, Path], folders: Sequence[str]) -> list[str]:
    """Class name of each folder, from :func:`load_classnames`."""
    mapping = load_classnames(path)
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise ValueError(f"{path} names no class for folders {missing[:5]}; add a line '<folder> <class name>'.")
    return [mapping[f] for f in folders]


def load_templates(spec: str) -> list[Template]:
    """``openai`` (80 prompts), ``simple`` (2) or a text file with one template per line, ``{}`` for the name."""
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


@dataclass(kw_only=True)
class ZeroShotOptions(EvalOptions):
    """The images, class names and prompts of a zero-shot evaluation."""

    data: str | Path  # validation folder: synset sub-folders (n01440764/ ...) or any folders + classnames
    classnames: Optional[str | Path] = None  # class name per folder (JSON or 'folder name' lines)
    templates: str = "openai"  # openai | simple | a file of templates with {}
    classes_per_batch: int = 10  # class names per text-encoder batch
    own_preprocessing: bool = True  # the model's OpenCLIP preprocessing, else eval_transform (resize_size)


@dataclass
class ZeroShotResult(EvalResult):
    """Top-1 / top-5 (%) over every classifier class and, for a subset of ImageNet, over the subset's."""

    data: str
    num_images: int
    num_folders: int
    num_classes: int
    templates: str
    num_templates: int
    accuracy: dict[str, Optional[dict[str, float]]]  # all_classes, subset_classes (None without a subset)

    evaluation: ClassVar[str] = "zero-shot"
    stem: ClassVar[str] = "zeroshot_results"

    def title(self) -> str:
        return f"Zero-shot, {self.tower['name']}, {Path(self.data).name}"

    def table(self) -> tuple[list[str], list[list[Any]]]:
        acc = self.accuracy
        rows = [[f"all {self.num_classes} classes", acc["all_classes"]["top1"], acc["all_classes"]["top5"]]]
        if acc["subset_classes"] is not None:
            rows.append([f"the {self.num_folders} folders' classes", acc["subset_classes"]["top1"],
                         acc["subset_classes"]["top5"]])
        return ["classes", "top-1 (%)", "top-5 (%)"], rows


def evaluate_zeroshot(tower: Tower, options: ZeroShotOptions, env: Optional[DistEnv] = None
                      ) -> Optional[ZeroShotResult]:
    """Fuse the CLIP ``tower``'s image tower (checked on the first batch) and classify ``options.data`` zero-shot.

    ``tower`` is a whole OpenCLIP model (``load_tower(..., clip=True)``). Under torchrun every process
    embeds its share of the images; the result comes back on rank 0 (None elsewhere).
    """
    env = default_env(tower, env)
    tower.model.to(env.device)
    if options.own_preprocessing:
        transform = image_transform_v2(PreprocessCfg(**tower.model.visual.preprocess_cfg), is_train=False)
    else:
        transform = eval_transform(tower.image_size, tower.mean, tower.std, options.resize_size)
    folders = RobustImageFolder(options.data).classes
    labels = label_space(folders, options.classnames)
    dataset = RobustImageFolder(options.data, transform=transform, target_transform=labels.folder_to_class.__getitem__)
    loader = make_loader(dataset, options.batch_size, options.num_workers, env)
    fn, costs = fuse_on_first_batch(tower, loader, env, options, clip_image)
    templates = load_templates(options.templates)
    _logger.info("building the %d-class classifier from %d templates", len(labels.classnames), len(templates))
    classifier = open_clip.build_zero_shot_classifier(
        tower.model, open_clip.get_tokenizer(tower.name), labels.classnames, templates,
        num_classes_per_batch=options.classes_per_batch, device=env.device, use_tqdm=env.is_main)
    feats = extract_features(fn, loader, env, desc="image features")
    if not env.is_main:
        return None
    acc = zero_shot_accuracy(feats.features, feats.labels, classifier.float().cpu(), labels.subset)
    return ZeroShotResult(tower=tower.summary(), costs=costs, num_skipped=feats.num_skipped, data=str(options.data),
                          num_images=len(feats.labels), num_folders=len(folders), num_classes=len(labels.classnames),
                          templates=options.templates, num_templates=len(templates), accuracy=acc)


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
    args = parse_args(argv)
    options = ZeroShotOptions(  # --image-size or --resize-size: the DINO protocol's eval_transform instead
        data=args.data, classnames=args.classnames, templates=args.templates, classes_per_batch=args.classes_per_batch,
        own_preprocessing=not (args.image_size or args.resize_size), **common_options(args))
    return run_evaluation(args, lambda env: evaluate_zeroshot(prepare_tower(args, env, clip=True), options, env))


if __name__ == "__main__":
    main()
