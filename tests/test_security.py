"""No code from a checkpoint or any other file ever runs: nothing read from a file (checkpoint args, sidecars,
params.txt) becomes a command, a URL scheme or a path the program opens; ``pipe:``/URL shards run only when the
user types them with --allow-remote-shards. Output directories are never deleted unasked.

Each attack is carried out for real (a marker file the payload would create, a ``local-dir:`` model folder
that would load); the grep tests keep the source free of the usual ways in.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

import clip.train
from clip.export import verification_images
import repa_ssl
from dino import export as dino_export
from dino import train as dino_train
from repa_ssl.checkpoint import CheckpointError, load_checkpoint, load_fused_tower, save_checkpoint, save_sidecar
from repa_ssl.dino_checkpoint import load_dino_backbone
from repa_ssl.eval import fuse_and_verify, load_tower
from repa_ssl.factory import UnknownModelError

from clip_helpers import TRAIN_FLAGS, write_test_shards
from conftest import tiny_vit
from dino_helpers import TINY, make_images
from eval_fixtures import clip_fused_export, clip_model, clip_train_checkpoint, dino_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("repa_ssl", "dino", "clip", "demo", "scripts") for p in (ROOT / d).rglob("*.py"))


class _Exploit:
    """Unpickling this runs ``Path.touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _System:
    """Unpickling this runs a shell command through ``os.system``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def calls(path: Path) -> list[tuple[str, ast.Call]]:
    """(dotted name, node) of every call in ``path``: ``eval``, ``torch.load``, ``shutil.rmtree`` ..."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func, parts = node.func, []
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            parts.append(func.id if isinstance(func, ast.Name) else "<expression>")  # x().eval() is not eval
            out.append((".".join(reversed(parts)), node))
    return out


PLANTED = {  # what ruff's S rules (pyproject.toml, run by .ci/run) refuse in the sources
    "eval(text)": "S307", "exec(text)": "S102", "pickle.loads(data)": "S301", "marshal.loads(data)": "S302",
    "yaml.load(text)": "S506", "subprocess.run(text, shell=True)": "S602", "os.system(text)": "S605",
}


def test_ruff_refuses_eval_exec_unpickling_and_shells(tmp_path):
    source = tmp_path / "planted.py"
    source.write_text("import marshal, os, pickle, subprocess, yaml\n\n\ndef f(text, data):\n"
                      + "".join(f"    {line}\n" for line in PLANTED))
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--config", str(ROOT / "pyproject.toml"),
                          "--no-cache", "--output-format", "json", str(source)], capture_output=True, text=True)
    found = {(d["location"]["row"], d["code"]) for d in json.loads(out.stdout)}
    assert {(row, code) for row, code in enumerate(PLANTED.values(), start=5)} <= found


def test_sources_never_compile_or_import_code():
    # Not a ruff rule: the builtins that turn text into code or a module name into an import.
    assert len(SOURCES) > 30
    found = [f"{p.relative_to(ROOT)}:{n.lineno} {name}" for p in SOURCES for name, n in calls(p)
             if name in ("compile", "__import__")]
    assert not found


def test_torch_load_only_in_the_checkpoint_module_and_only_weights_only():
    loads = [(p, n) for p in SOURCES for name, n in calls(p) if name == "torch.load"]
    assert [p.relative_to(ROOT).as_posix() for p, _ in loads] == ["repa_ssl/checkpoint.py"]
    (_, node), = loads
    assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)


def function_lines(path: Path, function: str) -> range:
    """The lines of ``def function`` in ``path``."""
    node, = (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == function)
    return range(node.lineno, node.end_lineno + 1)


def test_sources_never_delete_directories():
    # The one reviewed exception: clip.train removes the run folder that its own failed start made, and only
    # when it holds nothing but upstream's start files (tests/test_clip_failed_start.py), so the command can be rerun.
    allowed = function_lines(ROOT / "clip" / "train.py", "_remove_failed_start")
    found = [f"{p.relative_to(ROOT)}:{n.lineno} {name}" for p in SOURCES for name, n in calls(p)
             if name.split(".")[-1] in ("rmtree", "rmdir", "removedirs")
             and not (p == ROOT / "clip" / "train.py" and n.lineno in allowed)]
    assert not found


def test_dino_refuses_a_checkpoint_with_pickled_code_and_keeps_the_output_dir(tmp_path):
    images, out, marker = make_images(tmp_path / "images"), tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    torch.save({"student": {}, "payload": _Exploit(marker)}, out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match="nothing was executed"):
        dino_train.main(TINY + ["--data-path", str(images), "--output-dir", str(out)])
    assert not marker.exists()
    assert (out / "notes.txt").read_text() == "the user's own file" and (out / "checkpoint.pth").is_file()


def test_clip_resume_refuses_a_checkpoint_with_pickled_code(tmp_path):
    checkpoints, marker = tmp_path / "logs" / "tiny" / "checkpoints", tmp_path / "pwned"
    checkpoints.mkdir(parents=True)
    torch.save({"epoch": 1, "state_dict": {}, "payload": _Exploit(marker)}, checkpoints / "epoch_1.pt")
    flags = TRAIN_FLAGS + ["--train-data", write_test_shards(tmp_path / "laion"), "--train-num-samples", "16",
                           "--epochs", "2", "--logs", str(tmp_path / "logs"), "--name", "tiny", "--resume", "latest"]
    with pytest.raises(CheckpointError, match="nothing was executed"):
        clip.train.main(flags)
    assert not marker.exists() and (checkpoints / "epoch_1.pt").is_file()


def test_clip_remote_checkpoints_are_loaded_weights_only_too(tmp_path):
    """``--resume``/``--pretrained`` URLs go through fsspec as upstream's, but never unpickle code."""
    import open_clip_train.main as train_main

    from clip import patches

    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "payload": _Exploit(marker)}, tmp_path / "epoch_1.pt")
    patches.apply()
    with pytest.raises(CheckpointError, match="nothing was executed"):
        train_main.pt_load(f"file://{tmp_path / 'epoch_1.pt'}", map_location="cpu")
    assert not marker.exists()


# --- Values read from files never become commands, URL schemes or paths -----------------------------------


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    """A finished one-epoch DINO run: (its images, its checkpoint.pth)."""
    root = tmp_path_factory.mktemp("dino")
    images, out = make_images(root / "images"), root / "run"
    dino_train.main(TINY + ["--epochs", "1", "--data-path", str(images), "--output-dir", str(out), "--no-export",
                            "--saveckp-freq", "0"])
    return images, out / "checkpoint.pth"


def shell_shards(tmp_path: Path, marker: Path) -> str:
    """A ``pipe:`` shard spec that runs ``touch marker`` and then delivers a real shard, so that the
    attack would succeed unnoticed."""
    good = write_test_shards(tmp_path / "laion").replace("{00000..00001}", "00000")
    assert Path(good).is_file()
    return f"pipe:touch {marker}; cat {good}"


def plant(checkpoint: Path, dest: Path, **args) -> Path:
    """A copy of a real DINO checkpoint (it passes ``weights_only=True``) with ``args`` changed."""
    ckpt = load_checkpoint(checkpoint)
    ckpt["args"].update(args)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(ckpt, dest)


def test_dino_export_never_runs_a_shard_command_stored_in_the_checkpoint(dino_run, tmp_path):
    images, checkpoint = dino_run
    marker = tmp_path / "pwned"
    evil = plant(checkpoint, tmp_path / "evil" / "checkpoint.pth", data_source="wds",
                 data_path=shell_shards(tmp_path, marker))
    with pytest.raises(ValueError, match="--data-path"):  # the stored path is shown, never opened
        dino_export.main(["--checkpoint", str(evil)])
    assert not marker.exists()
    path = dino_export.main(["--checkpoint", str(evil), "--data-path", str(images), "--data-source", "folder"])
    assert not marker.exists() and load_fused_tower(path)[1]["fusion"]["ok"]


def test_dino_train_never_runs_a_shard_command_from_a_planted_checkpoint(dino_run, tmp_path):
    """A finished run's checkpoint.pth planted in --output-dir: the end-of-run export uses the typed data."""
    images, checkpoint = dino_run
    out, marker = tmp_path / "run", tmp_path / "pwned"
    plant(checkpoint, out / "checkpoint.pth", data_source="wds", data_path=shell_shards(tmp_path, marker))
    dino_train.main(TINY + ["--epochs", "1", "--data-path", str(images), "--output-dir", str(out)])
    assert not marker.exists()
    assert json.loads((out / "teacher_fused.json").read_text())["fusion"]["ok"]


@pytest.fixture
def trap(tmp_path) -> Path:
    """A folder that timm's and open_clip's ``local-dir:`` names would load a model from."""
    folder = tmp_path / "trap"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_repa_vit", "num_classes": 0}))
    clip_config = {"model_cfg": open_clip.get_model_config("RePa-ViT-Test")}
    (folder / "open_clip_config.json").write_text(json.dumps(clip_config))
    return folder


def test_model_names_read_from_files_never_name_a_path(tmp_path, trap, images):
    """A DINO checkpoint's arch, a fused export's sidecar and open_clip_train's params.txt name only
    registered models: timm and open_clip would build ``local-dir:<folder>`` from files found there."""
    dino_checkpoint(tmp_path / "checkpoint.pth")
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    ckpt["args"]["arch"] = f"local-dir:{trap}"
    save_checkpoint(ckpt, tmp_path / "checkpoint.pth")
    with pytest.raises(UnknownModelError, match="args\\['arch'\\]\\) names the model 'local-dir:"):
        load_tower(tmp_path / "checkpoint.pth")
    with pytest.raises(UnknownModelError, match="args\\['arch'\\] names the model 'local-dir:"):
        load_dino_backbone(ckpt)  # dino.export's reader

    fused = repa_ssl.fuse_model(tiny_vit(num_classes=0))
    export = repa_ssl.save_fused_tower(fused, tmp_path / "fused.safetensors", {"model_name": "test_repa_vit"})
    save_sidecar(export, {"model_name": f"local-dir:{trap}"})
    with pytest.raises(UnknownModelError, match="fused.json names the model 'local-dir:"):
        load_tower(export)

    clip = clip_train_checkpoint(tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt", clip_model())
    (tmp_path / "logs" / "run" / "params.txt").write_text(f"model: local-dir:{trap}\n")
    with pytest.raises(UnknownModelError, match="params.txt names the model 'local-dir:"):
        load_tower(clip)
    assert load_tower(clip, "RePa-ViT-Test").name == "RePa-ViT-Test"  # a name typed by the user is taken

    export = clip_fused_export(clip.parent / "fused.pt", clip_model(), images, clip)  # beside its source
    sidecar = json.loads(export.with_suffix(".json").read_text())
    save_sidecar(export, dict(sidecar, source_model=f"local-dir:{trap}"))
    tower = fuse_and_verify(load_tower(export, clip=True), images)  # the source is not re-opened as that model
    assert tower.fusion["verified_on"].startswith("at export")


def test_an_exports_sidecar_never_opens_a_checkpoint_outside_its_folder(tmp_path, images):
    """Evaluations re-check an export against the source checkpoint its sidecar names only when that
    file lies beside the export; a sidecar pointing elsewhere falls back to the check stored at export."""
    teacher = dino_checkpoint(tmp_path / "run" / "checkpoint.pth")["teacher"]
    fused = repa_ssl.fuse_model(teacher)
    report = repa_ssl.verify_fusion(teacher, fused, images).as_dict()
    for where, recorded in (("beside", "checkpoint.pth"), ("elsewhere", str(tmp_path / "run" / "checkpoint.pth")),
                            ("elsewhere", "../run/checkpoint.pth")):
        export = repa_ssl.save_fused_tower(fused, tmp_path / where / "teacher_fused.safetensors", dict(
            model_name="test_repa_vit", idle_ratios=teacher.idle_ratios, fusion=report, source_checkpoint=recorded))
        if where == "beside":
            shutil.copy(tmp_path / "run" / "checkpoint.pth", export.parent / "checkpoint.pth")
        tower = fuse_and_verify(load_tower(export), images)
        assert tower.fusion["verified_on"].startswith("at export") == (where == "elsewhere"), recorded


def test_refusing_a_pickled_checkpoint_names_what_it_would_have_called(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"payload": _System(f"touch {marker}")}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"GLOBAL posix\.system.*nothing was executed"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_remote_shard_specs_need_the_users_opt_in(tmp_path):
    """``pipe:`` runs a shell command: refused unless --allow-remote-shards, and run when it is given."""
    marker = tmp_path / "pwned"
    spec = shell_shards(tmp_path, marker)
    flags = TINY + ["--epochs", "1", "--data-source", "wds", "--data-path", spec, "--train-num-samples", "8",
                    "--output-dir", str(tmp_path / "run"), "--no-export"]
    with pytest.raises(ValueError, match="--allow-remote-shards"):
        dino_train.main(flags)
    with pytest.raises(ValueError, match="--allow-remote-shards"):
        verification_images(spec, 2, transform=lambda image: image)  # clip.export --images
    clip.train.check_train_data(spec)  # open_clip_train's own --train-data takes pipe: as typed; not run here
    assert not marker.exists()
    dino_train.main(flags + ["--allow-remote-shards"])
    assert marker.exists()  # the user's own command, as typed
