"""Each fix for open_clip_train 3.3.0: upstream fails without it, works with it (clip/patches.py)."""
import ast
import importlib
import importlib.metadata as md
import inspect
import io
import logging
import re
import sys
import tomllib
from argparse import Namespace
from pathlib import Path

import open_clip
import open_clip_train
import open_clip_train.data as oc_data
import open_clip_train.zero_shot as oc_zero_shot
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

import repa_ssl
from clip import patches
from clip.train import batchnorm_sync_policy, is_repa_model
from clip_helpers import CORRUPT, write_test_shards
from conftest import randomize_batchnorms
from repa_ssl.layers.channel_idle_kernels import SyncChannelIdleBatchNorm
from repa_ssl.seeding import epoch_seed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fixes_installed():
    patches.apply()


def _dist_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _unconditional_imports(path: Path) -> set[str]:
    """Top-level modules a file imports at module level outside try/except (i.e. always)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_open_clip_train_imports_comes_from_a_declared_dependency():
    # open_clip_train imports pandas, fsspec, braceexpand but declares them only in its `training`
    # extra (which pins an old webdataset): we must declare them, or a clean install cannot train.
    ours = {_dist_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    upstream = {_dist_name(r) for r in md.requires("open_clip_torch") if "extra ==" not in r}
    providers = md.packages_distributions()
    package = Path(open_clip_train.__file__).parent
    imported = set().union(*(_unconditional_imports(p) for p in package.glob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {"open_clip", "open_clip_train"}
    undeclared = {m: providers.get(m) for m in third_party
                  if not {_dist_name(d) for d in providers.get(m, [m])} & (ours | upstream)}
    assert "pandas" in third_party and not undeclared


def test_end_of_shard_record_of_current_webdataset(tmp_path, monkeypatch):
    shard = write_test_shards(tmp_path, n=4, per_shard=4).replace("{00000..00000}", "00000")
    fixed = oc_data.group_by_keys_nothrow
    monkeypatch.setattr(oc_data, "group_by_keys_nothrow", inspect.unwrap(fixed))
    with pytest.raises(KeyError, match="fname"):
        list(oc_data.tarfile_to_samples_nothrow([{"url": shard}]))
    monkeypatch.setattr(oc_data, "group_by_keys_nothrow", fixed)
    samples = list(oc_data.tarfile_to_samples_nothrow([{"url": shard}]))
    assert [s["__key__"] for s in samples] == [f"00000{i:04d}" for i in range(4)]
    assert all({"jpg", "json"} <= s.keys() for s in samples)


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_of_a_cpu_model_with_device_ids(gloo_world_of_one):
    # open_clip_train.main: DistributedDataParallel(model, device_ids=[device]) with device = cpu
    import open_clip_train.main as train_main

    model, device = nn.Linear(4, 2), torch.device("cpu")
    upstream = torch.nn.parallel.DistributedDataParallel
    assert upstream is torch.nn.parallel.distributed.DistributedDataParallel  # the process keeps torch's DDP
    with pytest.raises(ValueError, match="device_ids"):
        upstream(model, device_ids=[device])
    ddp = train_main.torch.nn.parallel.DistributedDataParallel(model, device_ids=[device])  # what main calls
    assert isinstance(ddp, upstream)
    ddp(torch.randn(3, 4)).sum().backward()
    assert model.weight.grad is not None


def test_use_bn_sync_converts_a_repa_tower_with_its_fast_paths_kept():
    # open_clip_train.main under --use-bn-sync: model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    import open_clip_train.main as train_main

    model = open_clip.create_model("RePa-ViT-Test")
    converted = train_main.torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what main calls
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    # torch's SyncBatchNorm would switch the FFNs' fast paths off and crash on CPU; ours keeps both working
    assert norms and all(type(m) is SyncChannelIdleBatchNorm for m in norms)
    assert torch.nn.SyncBatchNorm is torch.nn.modules.batchnorm.SyncBatchNorm  # the process keeps torch's


def test_zero_shot_eval_loop_under_numpy2(monkeypatch):
    torch.manual_seed(0)
    classifier = torch.randn(8, 5)
    images, targets = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    model = lambda image: (image,)  # noqa: E731  (image features = the inputs)
    args = Namespace(device="cpu", precision="fp32", batch_size=6)
    logits = images @ classifier
    top1 = (logits.argmax(1) == targets).float().mean().item()
    top5 = (logits.topk(5, 1)[1] == targets[:, None]).any(1).float().mean().item()
    fixed = oc_zero_shot.accuracy
    monkeypatch.setattr(oc_zero_shot, "accuracy", inspect.unwrap(fixed))
    with pytest.raises(TypeError, match="0-dimensional"):
        oc_zero_shot.run(model, classifier, [(images, targets)], args)
    monkeypatch.setattr(oc_zero_shot, "accuracy", fixed)
    assert oc_zero_shot.run(model, classifier, [(images, targets)], args) == pytest.approx((top1, top5))


def test_skipped_samples_are_counted_across_dataloader_workers(tmp_path):
    # upstream's validation pipeline reads each shard exactly once (one per worker here), so the
    # counts are exact; the training pipeline uses the same select predicate and decode handler.
    args = Namespace(val_data=write_test_shards(tmp_path), val_num_samples=None, workers=2, batch_size=4)
    _, _, preprocess = open_clip.create_model_and_transforms("RePa-ViT-Test")
    tokenizer = open_clip.get_tokenizer("RePa-ViT-Test")
    before = patches.skip_counter.totals()
    loader = oc_data.get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer).dataloader
    assert sum(len(images) for images, _ in loader) == 14
    after = patches.skip_counter.totals()
    assert {k: after[k] - before[k] for k in after} == {"corrupt_image": 1, "no_caption": 1, "no_image": 0}


def test_each_replaced_name_is_what_upstreams_training_pipeline_calls(tmp_path, monkeypatch):
    """Replacing a module global misses a caller that bound it as a default argument at its ``def``
    (``tarfile_to_samples_nothrow(src, handler=log_and_continue)``): that fix would be a silent no-op."""
    shards = write_test_shards(tmp_path)
    (tmp_path / "shards" / "00002.tar").write_bytes(b"<html>404 Not Found</html>" * 40)  # a tar read error
    called: dict[str, list] = {}

    def spy(name, fixed):
        def spied(*args, **kwargs):
            called.setdefault(name, []).append(args)
            return fixed(*args, **kwargs)
        return spied

    names = ("log_and_continue", "filter_no_caption_or_no_image", "group_by_keys_nothrow", "tarfile_to_samples_nothrow")
    for name in names:
        assert getattr(getattr(oc_data, name), patches._PATCHED)
        monkeypatch.setattr(oc_data, name, spy(name, getattr(oc_data, name)))
    args = Namespace(train_data=shards.replace("00001}", "00002}"), train_num_samples=16, dataset_resampled=False,
                     train_data_upsampling_factors=None, seed=0, batch_size=4, workers=0, world_size=1)
    _, preprocess, _ = open_clip.create_model_and_transforms("RePa-ViT-Test")
    tokenizer = open_clip.get_tokenizer("RePa-ViT-Test")
    loader = oc_data.get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader
    assert sum(len(images) for images, _ in loader) == 16
    assert called.keys() == set(names)
    handled = [type(exn).__name__ for exn, in called["log_and_continue"]]
    assert "ReadError" in handled and "DecodingError" in handled  # the shard reader's and the decoder's


@pytest.mark.parametrize("workers", [0, 1])
def test_an_epochs_batches_and_augmentations_follow_from_the_seed_and_the_epoch(tmp_path, workers):
    """Upstream's sample shuffle is seeded by the clock and its augmentations by every epoch before: no run, and no
    resumed run, repeats. Now epoch 1 of a loader that ran epoch 0 (its persistent workers too) gives the batches
    of a loader built at epoch 1, as a resumed run builds it."""
    shards = write_test_shards(tmp_path)
    _, preprocess, _ = open_clip.create_model_and_transforms("RePa-ViT-Test")  # random crops: augmentations
    tokenizer = open_clip.get_tokenizer("RePa-ViT-Test")

    def loader(first_epoch: int, seed: int = 0):
        args = Namespace(train_data=shards, train_num_samples=12, dataset_resampled=False, seed=seed, batch_size=4,
                         train_data_upsampling_factors=None, workers=workers, world_size=1)
        return oc_data.get_wds_dataset(args, preprocess, is_train=True, epoch=first_epoch, tokenizer=tokenizer)

    def run_epoch(info, number: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        info.set_epoch(number)
        if workers:  # the training process's generators must not matter to the workers' augmentations
            torch.manual_seed(1000 + number)
        else:  # augmentations come from the training process: its epoch starts seeded (as train_one_epoch does)
            patches._seed_generators(epoch_seed(seed, 0, number))
        batches = list(info.dataloader)
        return torch.cat([images for images, _ in batches]), torch.cat([texts for _, texts in batches])

    resumed_images, resumed_texts = run_epoch(loader(1), 1)
    continued = loader(0)
    run_epoch(continued, 0)
    images, texts = run_epoch(continued, 1)
    assert torch.equal(texts, resumed_texts) and torch.equal(images, resumed_images)
    assert not torch.equal(run_epoch(loader(2), 2)[1], texts)  # another epoch, another order
    assert not torch.equal(run_epoch(loader(1, seed=1), 1, seed=1)[1], texts)  # another seed too


def test_each_epoch_starts_from_generators_seeded_by_the_seed_epoch_and_rank(monkeypatch):
    """The training process's generators (augmentations with --workers 0, dropout) at an epoch's start."""
    import open_clip_train.main as train_main

    seen = {}
    monkeypatch.setattr(train_main, "train_one_epoch",  # upstream's epoch, reduced to a draw
                        lambda model, data, loss, epoch, *rest, **kwargs: seen.update({epoch: torch.rand(3)}))
    patches.fix_reproducible_epochs()
    args = Namespace(seed=0, rank=0)
    for epoch, drawn_before in ((1, 5), (1, 0), (2, 0)):
        torch.rand(drawn_before)
        train_main.train_one_epoch(None, None, None, epoch, None, None, None, None, args)
        seen[(epoch, drawn_before)] = seen.pop(epoch)
    assert torch.equal(seen[(1, 5)], seen[(1, 0)]) and not torch.equal(seen[(1, 0)], seen[(2, 0)])


def test_fixes_that_wrap_one_name_are_all_installed_once():
    """``train_one_epoch`` carries two fixes (skip counts, reproducible epochs): a second must not be taken for
    the first and left out, and ``apply()`` again must not wrap anything twice."""
    import open_clip_train.main as train_main

    def chain() -> list[str]:
        fn, tags = train_main.train_one_epoch, []
        while fn is not None:
            tags.append(getattr(fn, patches._PATCHED, None))
            fn = getattr(fn, "__wrapped__", None)
        return tags

    before = chain()
    patches.apply()
    assert chain() == before
    assert {"fix_skip_and_count.<locals>.make", "fix_reproducible_epochs.<locals>.make_epoch"} <= set(before)
    assert len(before) == len(set(before))


def test_the_only_default_argument_binding_a_replaced_name_is_the_one_handled():
    """Where upstream binds a replaced name as a default argument (``def f(x, handler=log_and_continue)``) the
    replacement never reaches ``f``: every such place must be one a fix handles (``_read_shards``)."""
    import pkgutil

    import open_clip.timm_model

    packaged = pkgutil.iter_modules(open_clip_train.__path__)
    modules = [importlib.import_module(f"open_clip_train.{m.name}") for m in packaged] + [open_clip.timm_model]
    originals = {id(obj.__wrapped__): name for module in modules for name, obj in vars(module).items()
                 if getattr(obj, patches._PATCHED, False)}
    assert {"log_and_continue", "filter_no_caption_or_no_image", "pt_load", "freeze_batch_norm_2d"} <= {
        *originals.values()}
    bound = set()
    for module in modules:
        for name, fn in vars(module).items():
            fn = inspect.unwrap(fn) if callable(fn) else fn  # upstream's own function behind a fix
            kwdefaults = getattr(fn, "__kwdefaults__", None) or {}
            defaults = [*(getattr(fn, "__defaults__", None) or ()), *kwdefaults.values()]
            bound |= {(name, originals[id(d)]) for d in defaults if id(d) in originals}
    assert bound == {("tarfile_to_samples_nothrow", "log_and_continue")}


def test_upstream_logging_keeps_torch_quiet_and_leaves_no_handlers_behind(tmp_path):
    import open_clip_train.main as train_main

    root, torch_logger, upstream = logging.getLogger(), logging.getLogger("torch._dynamo"), train_main.setup_logging
    before = list(root.handlers)
    train_main.setup_logging(str(tmp_path / "upstream.log"), logging.INFO)  # what main does, unpatched
    added = [h for h in root.handlers if h not in before]
    assert torch_logger.level == logging.INFO and len(added) == 2  # compiler chatter; handlers left behind
    for handler in added:
        root.removeHandler(handler)
        handler.close()

    log_files: list[str] = []
    with patches.upstream_logging(["BatchNorm sync is off"], log_files):
        train_main.setup_logging(str(tmp_path / "out.log"), logging.INFO)
        assert torch_logger.level == logging.WARNING
    assert root.handlers == before and log_files == [str(tmp_path / "out.log")]
    assert "BatchNorm sync is off" in (tmp_path / "out.log").read_text()
    assert train_main.setup_logging is upstream


def test_apply_warns_under_another_open_clip_release(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="clip.patches")
    patches.apply()
    assert not caplog.records
    monkeypatch.setattr(patches.importlib.metadata, "version", lambda name: "3.4.0")
    patches.apply()
    assert "open_clip_torch 3.4.0 is installed, but clip.patches fixes open_clip_torch 3.3.0" in caplog.text


def test_skip_counter_classifies_what_it_drops():
    from webdataset.autodecode import DecodingError

    counter = patches.SkipCounter()
    assert patches._keep(counter, {"jpg": b"x", "txt": b"a cat"})
    assert not patches._keep(counter, {"jpg": b"x"})
    assert not patches._keep(counter, {"txt": b"a cat", "json": b"{}"})
    assert patches._handle(counter, DecodingError(key=f"{CORRUPT:09d}", url="00000.tar", k="jpg"))
    assert counter.since_last_report() == {"corrupt_image": 1, "no_caption": 1, "no_image": 1}
    assert counter.since_last_report() == {"corrupt_image": 0, "no_caption": 0, "no_image": 0}


def test_only_the_image_members_clip_reads_are_decoded():
    # upstream's rename takes jpg/png/jpeg/webp only: a broken .bmp beside a sample's .jpg must not drop it
    jpeg = io.BytesIO()
    Image.new("L", (8, 8), 100).save(jpeg, "JPEG")
    assert patches.decode_rgb("jpg", jpeg.getvalue()).mode == "RGB"
    assert patches.decode_rgb("bmp", b"not a bitmap") is None


def test_batchnorm_sync_on_for_repa_towers_on_several_processes_only():
    repa = ["--model", "RePa-ViT-Test"]
    argv, notes = batchnorm_sync_policy(repa, distributed=True)  # GPUs or CPUs: fix_sync_batchnorm runs on both
    assert "--use-bn-sync" in argv and "SyncBatchNorm is on" in notes[0]
    argv, notes = batchnorm_sync_policy(repa + ["--no-bn-sync"], distributed=True)
    assert argv == repa and "off" in notes[0]
    assert batchnorm_sync_policy(repa + ["--use-bn-sync"], distributed=True) == (repa + ["--use-bn-sync"], [])
    assert batchnorm_sync_policy(repa, distributed=False) == (repa, [])
    vanilla = ["--model", "ViT-B-32"]
    assert batchnorm_sync_policy(vanilla, distributed=True) == (vanilla, [])
    assert is_repa_model("RePa-ViT-B-16") and not is_repa_model("RePa-ViT-B-16-fused")


def test_sync_batchnorm_checkpoints_have_the_same_keys_and_fuse_alike(images):
    torch.manual_seed(0)
    model = randomize_batchnorms(open_clip.create_model("RePa-ViT-Test")).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == list(model.state_dict())
    fused = repa_ssl.fuse_model(synced)
    assert repa_ssl.verify_fusion(model, fused, images).max_rel_err < 1e-5


def _locked_training_step(images: torch.Tensor, text: torch.Tensor) -> tuple[nn.Module, dict, dict]:
    """``--lock-image --lock-image-freeze-bn-stats``: lock as open_clip_train.main does, one training step."""
    torch.manual_seed(0)
    model = randomize_batchnorms(open_clip.create_model("RePa-ViT-Test"))
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    model.train()
    before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    image_features, text_features, logit_scale = model(images, text)
    open_clip.ClipLoss()(image_features, text_features, logit_scale).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    return model, before, model.visual.state_dict()


def test_lock_image_freeze_bn_stats_freezes_the_towers_batchnorm1d(images, monkeypatch):
    text = torch.randint(0, 49408, (4, 16), generator=torch.Generator().manual_seed(2))
    fixed = open_clip.timm_model.freeze_batch_norm_2d
    monkeypatch.setattr(open_clip.timm_model, "freeze_batch_norm_2d", inspect.unwrap(fixed))
    _, before, after = _locked_training_step(images, text)
    key = "trunk.blocks.0.mlp.norm1.running_mean"
    assert not torch.equal(before[key], after[key])
    monkeypatch.setattr(open_clip.timm_model, "freeze_batch_norm_2d", fixed)

    model, before, after = _locked_training_step(images, text)
    assert all(isinstance(m, patches.FrozenBatchNorm1d) for m in model.visual.trunk.modules()
               if "BatchNorm" in type(m).__name__)
    assert list(after) == list(before) == list(open_clip.create_model("RePa-ViT-Test").visual.state_dict())
    trunk = [k for k in before if k.startswith("trunk.")]  # upstream locks the trunk; the projection trains
    assert all(torch.equal(before[k], after[k]) for k in trunk)  # running statistics and weights
    train_mode = model.visual(images)  # the locked tower normalises as at inference, in train mode too
    assert torch.allclose(train_mode, model.visual.eval()(images), atol=1e-6)
    unlocked = open_clip.create_model("RePa-ViT-Test").eval()
    unlocked.visual.load_state_dict(after)  # a locked run's checkpoint loads into (and fuses as) the train form
    assert torch.allclose(unlocked.visual(images), train_mode, atol=1e-6)


def _synset_folder(root: Path, synsets: list[str]) -> Path:
    from PIL import Image

    for i, synset in enumerate(synsets):
        (root / synset).mkdir(parents=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / synset / f"ILSVRC2012_val_{i:08d}.JPEG")
    return root


def test_imagenet_val_subset_is_labelled_by_synset(tmp_path, monkeypatch):
    from timm.data import ImageNetInfo
    from torchvision import transforms

    synsets = ImageNetInfo("imagenet-1k").label_names()
    args = Namespace(imagenet_val=str(_synset_folder(tmp_path / "val", [synsets[1], synsets[500], synsets[999]])),
                     batch_size=4, workers=0)
    preprocess = (None, transforms.ToTensor())

    def labels() -> list[int]:
        return next(iter(oc_data.get_imagenet(args, preprocess, "val").dataloader))[1].tolist()

    fixed = oc_data.datasets
    monkeypatch.setattr(oc_data, "datasets", inspect.unwrap(fixed))
    assert labels() == [0, 1, 2]  # positions among the three folders, not ImageNet classes
    monkeypatch.setattr(oc_data, "datasets", fixed)
    assert labels() == [1, 500, 999]  # the zero-shot classifier's columns

    args.imagenet_val = str(_synset_folder(tmp_path / "named", ["tench", "goldfish"]))
    with pytest.raises(ValueError, match="named: 2 class folders are not ImageNet-1k synset ids"):
        labels()


def test_training_hooks_see_the_built_model_and_every_step(tmp_path):
    """Upstream has no hook: the model once built (before its optimizer and resume), the step before it runs."""
    import open_clip_train.main as train_main

    import clip.train
    from clip_helpers import TRAIN_FLAGS

    upstream = train_main.create_model_and_transforms, train_main.train_one_epoch
    built, steps = [], []
    flags = TRAIN_FLAGS + ["--train-data", write_test_shards(tmp_path / "data"), "--train-num-samples", "16",
                           "--epochs", "1", "--logs", str(tmp_path / "logs"), "--name", "hooked"]
    with patches.training_hooks(built.append, lambda model, step, total: steps.append((model, step, total))):
        assert clip.train.main(flags) is None
    assert len(built) == 1 and isinstance(built[0], open_clip.CLIP)
    assert [(step, total) for _, step, total in steps] == [(i, 4) for i in range(4)]  # upstream's 4 steps
    assert all(model is built[0] for model, _, _ in steps)  # the model trained
    assert (train_main.create_model_and_transforms, train_main.train_one_epoch) == upstream  # restored on exit
