"""Which checkpoint a resume takes: never one that was being written when the job died."""

import pytest

from unimrg.trainer import COMPLETE, find_checkpoint


def make(ckpt_dir, step, complete=True):
    folder = ckpt_dir / f"step_{step:07d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / COMPLETE).write_text("2\n")
    return folder


def test_latest_names_a_complete_checkpoint(tmp_path):
    make(tmp_path, 10)
    twenty = make(tmp_path, 20)
    (tmp_path / "latest").write_text(twenty.name)
    assert find_checkpoint(tmp_path, "latest") == twenty


def test_half_written_checkpoint_is_never_taken(tmp_path):
    ten = make(tmp_path, 10)
    make(tmp_path, 20, complete=False)             # the job died while writing step 20
    (tmp_path / "latest").write_text("step_0000020")  # even if `latest` already pointed at it
    assert find_checkpoint(tmp_path, "latest") == ten
    (tmp_path / "latest").unlink()
    assert find_checkpoint(tmp_path, "latest") == ten


def test_fresh_runs_and_explicit_paths(tmp_path):
    assert find_checkpoint(tmp_path / "none", "latest") is None   # first start of a requeue-able job
    make(tmp_path, 10)
    assert find_checkpoint(tmp_path, "") is None                  # resume not asked for
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(make(tmp_path, 20, complete=False)))
