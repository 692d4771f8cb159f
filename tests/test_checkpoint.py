"""One checkpoint module: atomic writes, loading that never runs code, fused exports."""
import errno
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch

import repa_ssl
from repa_ssl import CheckpointError, StateDictFormError
from repa_ssl import checkpoint
from repa_ssl.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from conftest import randomize_batchnorms, tiny_vit

class _Exploit:
    """Unpickling this would create ``marker``: the load must refuse before any of it runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_save_and_load_roundtrip(tmp_path):
    state = {"model": tiny_vit().state_dict(), "epoch": 3, "args": {"lr": 0.1, "arch": "test"}}
    path = save_checkpoint(state, tmp_path / "ckpt.pth")
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["args"] == {"lr": 0.1, "arch": "test"}
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary left behind


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = save_checkpoint({"epoch": 1}, tmp_path / "ckpt.pth")
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 2, "bad": lambda: None}, path)  # lambdas cannot be pickled
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_atomic_write_removes_the_temporary_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_with_pickled_callable_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match="nothing was executed"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "ckpt.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


def test_fused_state_dict_into_train_form_says_to_use_inference_mode():
    fused = repa_ssl.fuse_model(tiny_vit())
    with pytest.raises(StateDictFormError, match="inference_mode=True"):
        timm.create_model("test_repa_vit").load_state_dict(fused.state_dict())


def test_train_state_dict_into_fused_model_says_to_fuse_first():
    with pytest.raises(StateDictFormError, match="fuse it"):
        timm.create_model("test_repa_vit", inference_mode=True).load_state_dict(tiny_vit().state_dict())


def test_fused_tower_exports_to_safetensors_and_loads_without_the_train_form(tmp_path, images):
    model = tiny_vit(num_classes=0)
    fused = repa_ssl.fuse_model(model)
    report = repa_ssl.verify_fusion(model, fused, images).check()
    path = repa_ssl.save_fused_tower(fused, tmp_path / "teacher.safetensors",
                                     dict(model_name="test_repa_vit", idle_ratios=model.idle_ratios,
                                          fusion=report.as_dict()))
    loaded, meta = repa_ssl.load_fused_tower(path)
    assert meta["fusion"]["ok"] and repa_ssl.is_fused(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(images), fused(images))
    with pytest.raises(CheckpointError, match="fuse_model"):
        repa_ssl.save_fused_tower(model, tmp_path / "x.safetensors", dict(model_name="test_repa_vit"))


def test_fused_clip_loads_through_open_clip_create_model(tmp_path, images):
    torch.manual_seed(0)
    clip = randomize_batchnorms(open_clip.create_model("RePa-ViT-Test")).eval()
    fused = repa_ssl.fuse_model(clip)
    path = save_checkpoint(fused.state_dict(), tmp_path / "fused_clip.pt")
    loaded = open_clip.create_model(repa_ssl.fused_model_name("RePa-ViT-Test"), pretrained=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), fused.encode_image(images))
        reference = clip.encode_image(images)
        assert (loaded.encode_image(images) - reference).abs().max() / reference.abs().max() <= 1e-5
    # and a train-form CLIP checkpoint cannot silently load into the fused config
    train_path = save_checkpoint(clip.state_dict(), tmp_path / "train_clip.pt")
    with pytest.raises(StateDictFormError):
        open_clip.create_model("RePa-ViT-Test-fused", pretrained=str(train_path))


def test_checkpoints_get_normal_file_permissions(tmp_path):
    # Shards and checkpoints are shared on clusters: not the 0600 of a temporary file.
    path = save_checkpoint({"epoch": 1}, tmp_path / "ckpt.pth")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _usual_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_fused_safetensors_get_normal_file_permissions(tmp_path):
    # safetensors writes a new file in place of the temporary one, dropping its permissions
    path = repa_ssl.save_fused_tower(repa_ssl.fuse_model(tiny_vit(num_classes=0)), tmp_path / "t.safetensors",
                                     dict(model_name="test_repa_vit"))
    assert path.stat().st_mode & 0o777 == _usual_mode()
    assert path.with_suffix(".json").stat().st_mode & 0o777 == _usual_mode()


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes free: a write past it fails as the kernel's does (ENOSPC)."""

    room = 4096

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1}, tmp_path / "ckpt.pth")
    monkeypatch.setattr(checkpoint, "open", lambda f, mode="r": _FullDisk(f, mode.replace("b", "")) if "w" in mode
                        else open(f, mode), raising=False)
    with pytest.raises(OSError, match="disk is full") as e:
        save_checkpoint({"epoch": 2, "w": torch.randn(10_000)}, path)
    assert str(path) in str(e.value) and "MiB free" in str(e.value) and "unexpected pos" not in str(e.value)
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_a_write_past_the_file_size_limit_is_a_clear_error(tmp_path):
    # the kernel refuses the write (EFBIG) as it would a full disk (ENOSPC); torch alone says "unexpected pos"
    script = f"""
import resource, signal, torch
from repa_ssl.checkpoint import save_checkpoint
save_checkpoint({{"epoch": 1}}, {str(tmp_path / "ckpt.pth")!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint({{"w": torch.zeros(100_000)}}, {str(tmp_path / "ckpt.pth")!r})
except OSError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert f"cannot write {tmp_path / 'ckpt.pth'}: the file would exceed" in out.stdout and "ulimit -f" in out.stdout
    assert load_checkpoint(tmp_path / "ckpt.pth") == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_temporaries_of_killed_writes_are_removed_by_the_next_save(tmp_path):
    host = socket.gethostname().split(".")[0]
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])  # another job writing the same file right now
    try:
        orphan = tmp_path / f".checkpoint.pth.{host}-{gone.pid}.k1ll3d_x.tmp"  # a write killed half-way
        writing = tmp_path / f".checkpoint.pth.{host}-{alive.pid}.wr1t1ng_.tmp"
        other = tmp_path / f".checkpoint.pth.bak.{host}-{gone.pid}.k1ll3d_x.tmp"  # another file's: not ours
        for p in (orphan, writing, other):
            p.write_bytes(b"torn")
        save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pth")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, writing.name, "checkpoint.pth"])
        os.utime(writing, (0, 0))  # ... unless it is older than a day (a write cannot take that long)
        save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pth")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, "checkpoint.pth"])
    finally:
        alive.kill()
        alive.wait()

def test_writes_never_set_the_process_umask(tmp_path, monkeypatch):
    # os.umask sets the mask to read it: another thread creating a file meanwhile would get mode 0666
    expected = _usual_mode()

    def no_umask(mask):
        raise AssertionError(f"os.umask({mask:#o}) called")

    monkeypatch.setattr(os, "umask", no_umask)
    path = save_checkpoint({"epoch": 1}, tmp_path / "ckpt.pth")
    assert path.stat().st_mode & 0o777 == expected


def test_a_load_error_that_is_not_the_files_fault_is_not_called_corrupt(tmp_path, monkeypatch):
    path = save_checkpoint({"w": torch.randn(10)}, tmp_path / "ckpt.pth")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory") as error:
        load_checkpoint(path)
    assert "corrupt" not in str(error.value)


def test_state_dicts_of_ddp_and_compiled_models_load_into_the_bare_model():
    model = tiny_vit()
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}  # torch.compile(DDP(model))
    timm.create_model("test_repa_vit").load_state_dict(checkpoint.unwrap_state_dict({"model": wrapped}))
