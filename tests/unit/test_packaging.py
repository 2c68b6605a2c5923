"""A non-editable install finds the recipes and ZeRO configs (package data): build the wheel from a copy
of the sources, check its contents, and run the launcher's resolution (``--dry-run``) from the unpacked
wheel in a folder outside the checkout.

    python -m pytest -q tests/unit/test_packaging.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    # A copy, so the build's build/ and *.egg-info never land in the checkout.
    shutil.copy2(REPO / "setup.py", src / "setup.py")
    for d in ("unimrg", "launch", "ds_configs"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return next(out.glob("unimrg-*.whl"))


def test_wheel_ships_every_recipe_and_ds_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"launch/recipes/{p.name}" for p in (REPO / "launch" / "recipes").glob("*.yaml")}
    configs = {f"unimrg/ds_configs/{p.name}" for p in (REPO / "ds_configs").glob("*.json")}
    assert recipes and recipes <= names, sorted(recipes - names)
    assert configs and configs <= names, sorted(configs - names)
    assert "launch/train.py" in names


def test_installed_copy_resolves_recipes_and_ds_configs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    # What engine.ds_config_path resolves (without importing DeepSpeed here).
    probe = ("import unimrg, unimrg.config as c; cfg = c.load_config(c.recipe_path('harmon', 'tiny'), [], "
             "model='harmon'); print(unimrg.__file__); print(c.RECIPES); print(c.repo_path(cfg.train.ds_config))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    module, recipes, ds = res.stdout.split()
    assert all(Path(p).is_relative_to(site) for p in (module, recipes, ds)), res.stdout
    assert Path(ds).is_file() and Path(ds).name == "zero2_tiny.json"
    res = subprocess.run([sys.executable, "-m", "launch.submit", "--model", "showo", "--recipe", "tiny",
                          "--dry-run"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "dry run: config, batch arithmetic, paths and run folder are valid" in res.stdout
