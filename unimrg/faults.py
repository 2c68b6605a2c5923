"""TEST HOOK: deliberate faults (``train.debug_fault``) so the fail-fast paths can be tested for real.

    python launch/submit.py --model openuni --recipe tiny --cluster local train.debug_fault=raise@5:rank1

Never set in a real run. Grammar: ``KIND@STEPS[:TASK][:rankR]`` — KIND is ``raise`` (RuntimeError
right after the step's first forward), ``hang`` (the rank sleeps there forever: the watchdog's case)
or ``nan`` (the task's loss times NaN, so its gradients are NaN too, as in a real divergence); STEPS
is ``5``, ``3,7`` or ``3-`` (every step from 3); TASK (``nan`` only) defaults to every task; without
``:rankR`` every rank is hit. Steps count from 1, as logged.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("raise", "hang", "nan")


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    steps: frozenset[int]
    from_step: int          # 0 = only `steps`; N = also every step ≥ N
    task: str = ""
    rank: int = -1          # -1 = every rank

    def hits(self, step: int, rank: int) -> bool:
        return (self.rank in (-1, rank)) and (step in self.steps or 0 < self.from_step <= step)


def parse_fault(spec: str) -> Fault | None:
    """``train.debug_fault`` → a Fault (None if empty); FaultSpecError names what is wrong."""
    if not spec:
        return None
    usage = (f"train.debug_fault={spec!r}: expected KIND@STEPS[:TASK][:rankR] with KIND one of {KINDS} "
             "and STEPS like 5, 3,7 or 3- (a test hook; leave it empty in real runs)")
    kind, sep, rest = spec.partition("@")
    if kind not in KINDS or not sep:
        raise FaultSpecError(usage)
    steps_text, *extra = rest.split(":")
    task, rank = "", -1
    for part in extra:
        if part.startswith("rank") and part[4:].isdigit():
            rank = int(part[4:])
        elif part and kind == "nan" and not task:
            task = part
        else:
            raise FaultSpecError(usage)
    steps, from_step = set(), 0
    try:
        for item in steps_text.split(","):
            if item.endswith("-"):
                from_step = int(item[:-1])
            else:
                steps.add(int(item))
    except ValueError:
        raise FaultSpecError(usage) from None
    if any(s < 1 for s in steps) or from_step < 0 or (from_step == 0 and not steps):
        raise FaultSpecError(usage)
    return Fault(kind, frozenset(steps), from_step, task, rank)
