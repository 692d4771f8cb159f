"""No code from a checkpoint or from user input ever runs; output directories are never deleted unasked."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import clip.train
from dino import train as dino_train
from repa_ssl.checkpoint import CheckpointError

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
