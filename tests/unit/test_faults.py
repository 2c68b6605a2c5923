"""The fault-injection test hook's grammar and the fail-fast config checks (no ranks started).

    python -m pytest tests/unit/test_faults.py -q
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from unimrg.config import ConfigError, load_config, recipe_path, validate
from unimrg.faults import FaultSpecError, parse_fault


def test_fault_grammar():
    assert parse_fault("") is None
    f = parse_fault("raise@5:rank1")
    assert (f.kind, f.rank) == ("raise", 1) and f.hits(5, 1) and not f.hits(5, 0) and not f.hits(6, 1)
    f = parse_fault("nan@3-:depth")
    assert f.task == "depth" and not f.hits(2, 0) and f.hits(3, 0) and f.hits(300, 1)
    f = parse_fault("hang@2,7")
    assert f.hits(7, 0) and not f.hits(3, 0)
    for bad in ("boom@3", "raise", "raise@x", "raise@0", "raise@3:depth", "nan@3:depth:seg"):
        with pytest.raises(FaultSpecError, match="train.debug_fault"):
            parse_fault(bad)


@pytest.mark.parametrize("override,field", [("train.debug_fault=nan@", "train.debug_fault"),
                                            ("train.debug_fault=nan@3:vqa", "is not in objective.tasks"),
                                            ("train.hang_timeout_s=-1", "train.hang_timeout_s"),
                                            ("train.startup_timeout_s=-1", "train.startup_timeout_s"),
                                            ("train.max_skipped_steps=-1", "train.max_skipped_steps")])
def test_bad_fail_fast_fields_are_rejected_by_validate(override, field):
    cfg = load_config(recipe_path("openuni", "tiny"), [override], model="openuni")
    with pytest.raises(ConfigError, match=field):
        validate(cfg, dp_size=2)


WATCHDOG = """
import sys, time
from unimrg.trainer import Watchdog
w = Watchdog(1.0, 7, startup_s=4.0)
w.progress("start-up: starting the data loaders", startup=True)
time.sleep(2.5)                       # past hang_timeout_s, within the start-up allowance
print("alive after start-up", flush=True)
w.progress("forward of step 3 (task und)")
time.sleep(10)
print("not ended", flush=True)
"""


def test_watchdog_gives_start_up_its_own_allowance_then_ends_a_stuck_step():
    """A slow start-up (first batch, first collectives) is not a hang; a step stuck past
    train.hang_timeout_s ends the process naming rank, phase and the setting (a real thread, a real exit)."""
    res = subprocess.run([sys.executable, "-c", WATCHDOG], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "alive after start-up" in res.stdout and "not ended" not in res.stdout
    assert re.search(r"rank 7: error: stuck in forward of step 3 \(task und\) for \d+ s \(train.hang_timeout_s=1\); "
                     "exiting", res.stderr), res.stderr
