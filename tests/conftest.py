"""Shared fixtures: offline hub, the repo root, and generated scene data (once per session)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tiny recipes start from the cached tiny base (model.base: ${oc.env:UNIMRG_BASE,tiny}); tests run them from
# random init unless they ask for the base (tests/unit/test_pretrain.py), so no test pays for a base build.
os.environ.setdefault("UNIMRG_BASE", "none")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session", autouse=True)
def _base_cache(tmp_path_factory):
    """Any tiny base a test builds goes into its own temporary cache, never ~/.cache/unimrg."""
    old = os.environ.get("UNIMRG_CACHE")
    os.environ["UNIMRG_CACHE"] = str(tmp_path_factory.mktemp("unimrg-cache"))
    yield
    if old is None:
        os.environ.pop("UNIMRG_CACHE", None)
    else:
        os.environ["UNIMRG_CACHE"] = old


@pytest.fixture(scope="session")
def scene_root(tmp_path_factory) -> Path:
    """Four Energon datasets (und, pix, depth, seg) of 32 generated 56-px scenes."""
    root = tmp_path_factory.mktemp("scenes")
    from unimrg.data.scenes import write_scene_datasets
    write_scene_datasets(root, num_scenes=32, size=56, seed=0, shards=2)
    return root


def run_submit(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """``python launch/submit.py ARGS`` as a user would type it; output captured."""
    return subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
