"""The fault-injection test hook's grammar and the fail-fast config checks (no ranks started).

    python -m pytest tests/unit/test_faults.py -q
"""

from __future__ import annotations

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
                                            ("train.max_skipped_steps=-1", "train.max_skipped_steps")])
def test_bad_fail_fast_fields_are_rejected_by_validate(override, field):
    cfg = load_config(recipe_path("openuni", "tiny"), [override], model="openuni")
    with pytest.raises(ConfigError, match=field):
        validate(cfg, dp_size=2)
