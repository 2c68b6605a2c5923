"""Checkpoints on a full disk, in read-only folders, and over an existing step: clear errors, nothing lost.

    python -m pytest tests/integration/test_checkpoint_durability.py -q

A full disk and a read-only folder are real: small tmpfs mounts (needs root; skipped where mount(8)
is not allowed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, run_submit

pytestmark = pytest.mark.slow

SHORT = ["data.num_workers=0", "train.export_final=false", "train.checkpoint_every=1"]


@pytest.fixture
def tmpfs() -> Iterator[Callable[..., Path]]:
    """``mount(path, size, read_only)``: a tmpfs at ``path``, unmounted after the test."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "1m", read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def submit(run_dir: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_submit(["--model", "openuni", "--recipe", "tiny", "--cluster", "local", "--run-dir", str(run_dir),
                       f"data.root={data}", *SHORT, *extra])


def test_read_only_run_folder_fails_the_dry_run_and_the_submission(tmp_path, scene_root, tmpfs):
    run = tmpfs(tmp_path / "ro", read_only=True) / "run"
    for extra in (["--dry-run"], []):
        r = submit(run, scene_root, *extra)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"run folder {run.parent} (to create {run} in it) is not writable: Read-only file system" in r.stderr
        assert "Traceback" not in r.stderr


def test_read_only_checkpoint_folder_stops_the_run_at_start(tmp_path, scene_root, tmpfs):
    run = tmp_path / "run"
    tmpfs(run / "checkpoints", read_only=True)
    r = submit(run, scene_root, "train.steps=1")
    assert r.returncode != 0
    assert f"checkpoint folder {run / 'checkpoints'} is not writable: Read-only file system" in r.stdout + r.stderr
    assert not (run / "metrics").exists()   # stopped before the first step


def test_full_disk_during_a_checkpoint_names_the_path_and_frees_the_partial_folder(tmp_path, scene_root, tmpfs):
    run = tmpfs(tmp_path / "run", size="1m")   # room for the run's files, not for a 3 MB checkpoint
    r = submit(run, scene_root, "train.steps=2")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"no space left on device while writing checkpoint {run / 'checkpoints' / 'partial.step_0000001'}" in out, out[-4000:]
    assert "no complete checkpoint was written yet" in out
    assert not (run / "checkpoints" / "latest").exists()
    assert not (run / "checkpoints" / "partial.step_0000001").exists()   # the space is given back


def test_an_existing_step_is_replaced_whole_never_written_into(tmp_path, scene_root):
    run = tmp_path / "run"
    r = submit(run, scene_root, "train.steps=1", "--prepare-only")   # the frozen config.yaml
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ckpt = run / "checkpoints"
    old = ckpt / "step_0000001"
    old.mkdir(parents=True)
    (old / "COMPLETE").write_text("2\n")
    (old / "stale_file_of_an_earlier_run.pt").write_text("old")
    (ckpt / "partial.step_0000002").mkdir()   # a save that crashed
    (ckpt / "partial.step_0000002" / "half_written.pt").write_text("x")
    # submit.py refuses a fresh launch into a folder with checkpoints (the run-folder contract); the ranks
    # themselves, started on the frozen config without run.resume (as a hand-made srun would), re-save step 1.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "launch" / "train.py"), "--config", str(run / "config.yaml")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (old / "stale_file_of_an_earlier_run.pt").exists()
    assert {p.name for p in old.iterdir()} >= {"COMPLETE", "unimrg_rank0.pt", "unimrg_rank1.pt"}
    assert (ckpt / "latest").read_text() == "step_0000001"
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith("zero_to")) == ["latest", "step_0000001"]
