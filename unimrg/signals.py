"""Who owns a stop signal: the preemption signals, and process lifetimes tied to their parents.

    python -m pytest tests/integration/test_preemption.py -q

SLURM (requeue, preemption, scancel, time limit) signals *every* process of a job step, data-loader
workers included; so does torchrun when it stops its ranks (``killpg``). Only a rank's main process
may act on them: it finishes the optimizer step, all ranks checkpoint, and they exit with
``PREEMPTED_EXIT_CODE``. A worker that dies of the signal instead makes torch's SIGCHLD handler fail
the rank before it saves, so workers ignore these signals and die with their rank instead.
"""

from __future__ import annotations

import ctypes
import os
import signal

PREEMPTED_EXIT_CODE = 3   # a rank that checkpointed on a signal and wants to be requeued

# Handled identically by the trainer: finish the step, checkpoint, exit with PREEMPTED_EXIT_CODE.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits (PR_SET_PDEATHSIG).

    ``parent``: the pid the parent should have; if it is already gone (this process was re-parented
    before the call), raise ``sig`` now. Returns False where prctl is unavailable (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def data_worker_init(previous, worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders (wraps energon's, ``previous``): the rank's main process
    owns shutdown, so the preemption signals are ignored here (this replaces torch's worker SIGTERM
    handler, which exits); the worker dies with its rank instead (SIGKILL when the rank exits)."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)
    if previous is not None:
        previous(worker_id)
