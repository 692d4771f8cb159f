"""No code from a checkpoint or from user input ever runs; output directories are never deleted unasked."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import clip.train
from dino import export as dino_export
from dino import train as dino_train
from repa_ssl.checkpoint import CheckpointError, load_checkpoint, load_fused_tower, save_checkpoint

from clip_helpers import TRAIN_FLAGS, write_test_shards
from dino_helpers import TINY, make_images

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("repa_ssl", "dino", "clip", "scripts") for p in (ROOT / d).rglob("*.py"))


class _Exploit:
    """Unpickling this runs ``Path.touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


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


def test_sources_never_eval_exec_or_unpickle():
    assert len(SOURCES) > 30
    found = [f"{p.relative_to(ROOT)}:{n.lineno} {name}" for p in SOURCES for name, n in calls(p)
             if name in ("eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "yaml.load")
             or name.endswith("subprocess.run") and any(k.arg == "shell" for k in n.keywords)]
    assert not found


def test_torch_load_only_in_the_checkpoint_module_and_only_weights_only():
    loads = [(p, n) for p in SOURCES for name, n in calls(p) if name == "torch.load"]
    assert [p.relative_to(ROOT).as_posix() for p, _ in loads] == ["repa_ssl/checkpoint.py"]
    (_, node), = loads
    assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)


def test_sources_never_delete_directories():
    found = [f"{p.relative_to(ROOT)}:{n.lineno} {name}" for p in SOURCES for name, n in calls(p)
             if name.split(".")[-1] in ("rmtree", "rmdir", "removedirs")]
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
