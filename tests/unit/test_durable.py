"""unimrg/durable.py: atomic durable writes, the write probe and the messages for failed writes.

    python -m pytest tests/unit/test_durable.py -q
"""

from __future__ import annotations

import errno
import os

import pytest

from unimrg import durable


def test_write_durably_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "latest"
    target.write_text("step_0000010")
    durable.write_durably(target, "step_0000020")
    assert target.read_text() == "step_0000020"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_fsync_tree_flushes_nested_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.pt").write_bytes(b"x")
    durable.fsync_tree(tmp_path)   # opens every file and folder: fails on anything unreadable


def test_check_writable_probes_the_nearest_existing_parent(tmp_path):
    durable.check_writable(tmp_path / "not" / "yet")   # will be created in tmp_path: fine
    assert not (tmp_path / "not").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(durable.RunFolderError, match=r"run folder .*file \(to create .*file/run in it\) is not "
                                                      r"writable: Not a directory\. Make it writable"):
        durable.check_writable(tmp_path / "file" / "run")


def test_messages_name_the_path_the_cause_and_the_fix(tmp_path):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    msg = durable.describe_write_error(full, tmp_path / "partial.step_0000010", tmp_path, str(tmp_path / "step_0000005"))
    assert msg.startswith(f"no space left on device while writing checkpoint {tmp_path / 'partial.step_0000010'}")
    assert f"the last complete checkpoint is {tmp_path / 'step_0000005'}; resume from it with run.resume=latest" in msg
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS))
    msg = durable.describe_write_error(ro, tmp_path / "x", tmp_path, None)
    assert f"{tmp_path} is not writable" in msg and "remount it read-write" in msg
    assert "no complete checkpoint was written yet" in msg
