"""``--help`` on every command prints its help under its own name and exits 0, doing nothing else."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["dino.train", "dino.export", "dino.launch", "dino.bench", "clip.train", "clip.export", "clip.launch",
           "clip.bench", "demo", "repa_ssl.bench", "repa_ssl.bench.ddp", "repa_ssl.bench.layouts",
           "repa_ssl.bench.depth",
           "repa_ssl.data.write_shards", "repa_ssl.eval.knn", "repa_ssl.eval.linear", "repa_ssl.eval.zeroshot",
           "repa_ssl.export", "repa_ssl.gpu_check", "demo.supervised_depth"]
SHELL_ONLY = ["test.sh", "local_slurm.sh", "setup_env.sh", "run_eval.sh"]  # their help needs no Python
EVAL_SCRIPTS = {"knn_eval.sh": "repa_ssl.eval.knn", "linear_eval.sh": "repa_ssl.eval.linear",
                "zeroshot_eval.sh": "repa_ssl.eval.zeroshot"}


@pytest.mark.parametrize("name", MODULES)
def test_python_commands(name, capsys):
    is_package = importlib.util.find_spec(name).submodule_search_locations is not None
    module = importlib.import_module(f"{name}.__main__" if is_package else name)  # what `python -m` runs
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    if name == "clip.train":  # upstream's parser names it after sys.argv[0]; our part of the help comes first
        assert f"python -m {name} " in out and "--train-data" in out
    else:
        assert re.search(rf"^usage: (python -m )?{re.escape(name)} ", out, re.M), out[:300]


@pytest.mark.parametrize("script", SHELL_ONLY)
def test_shell_scripts(script):
    proc = subprocess.run([str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and f"{script}" in proc.stdout


def test_eval_scripts(tmp_path):
    # A stand-in .venv whose python prints how it was called (the modules' help is tested above) and
    # whose install stamp is current, so that setup_env.sh installs nothing.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".repa_ssl_installed").write_text(hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest())
    env = {**os.environ, "REPA_SSL_VENV": str(venv)}
    for script, module in EVAL_SCRIPTS.items():
        proc = subprocess.run([str(ROOT / "scripts" / script), "--help"], env=env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert f"scripts/{script} CHECKPOINT" in proc.stdout  # the script's own usage, then every option
        assert proc.stdout.endswith(f"python -m {module} --help\n")
