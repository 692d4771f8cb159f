"""The project installs what it needs, and only what it should."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    return req.replace(" ", "").lower().replace("_", "-")


def test_environment_yml_and_pyproject_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = {_norm(r) for r in pip_section if not r.startswith("-e")}
    assert conda_pins == wanted
    assert "-e ." in pip_section


def test_installing_does_not_shadow_other_clip_dino_or_demo_packages(tmp_path):
    # From outside the checkout, our applications must not be importable as `clip` / `dino` / `demo`
    # (OpenAI's `clip` package, for one, must keep working), while the library is.
    names = ("repa_ssl", "clip", "dino", "demo")
    probe = ("import importlib.util as u, json; "
             f"print(json.dumps([getattr(u.find_spec(n), 'origin', None) for n in {names!r}]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    repa, *apps = json.loads(out.stdout)
    assert repa is not None and repa.startswith(str(ROOT))
    for origin in apps:
        assert origin is None or not origin.startswith(str(ROOT))


def test_the_default_run_leaves_out_the_slurm_tier(tmp_path):
    # The Slurm tests install packages and start daemons (scripts/local_slurm.sh): only `-m slurm`
    # (./scripts/test.sh --slurm) selects them; conftest.py refuses a test that starts Slurm unmarked.
    (tmp_path / "test_tiers.py").write_text("import pytest\n\n\n@pytest.mark.slurm\ndef test_on_slurm():\n    pass\n"
                                            "\n\ndef test_here():\n    pass\n")

    def selected(*flags: str) -> list[str]:
        cmd = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
               "--collect-only", "-q", "-p", "no:cacheprovider", *flags, str(tmp_path)]
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True).stdout
        return [line.split("::")[-1] for line in out.splitlines() if "::" in line]

    assert selected() == ["test_here"]
    assert selected("-m", "slurm") == ["test_on_slurm"]
