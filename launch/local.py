"""The local path of launch/submit.py: torchrun on this machine, under a launcher that owns its ranks.

    python launch/submit.py --model openuni --recipe tiny --cluster local --run-dir runs/demo

torchrun starts every rank in a session of its own, so neither Ctrl-C nor killing submit.py reached
them. Now the chain is tied together:

- Ctrl-C, SIGTERM or SIGHUP to submit.py: the ranks get SIGTERM, as on a SLURM preemption: they
  finish the optimizer step, checkpoint and exit with ``PREEMPTED_EXIT_CODE``, which submit.py returns
  (resume with ``--resume latest``). A second Ctrl-C kills them at once.
- submit.py killed outright (SIGKILL): torchrun gets SIGTERM from Linux (PR_SET_PDEATHSIG) and stops
  the ranks the same way (it SIGKILLs what is left after 30 s).
- torchrun killed outright: every rank gets SIGKILL (PR_SET_PDEATHSIG, set in launch/train.py), and
  each data-loader worker dies with its rank (unimrg/signals.py).

This file is also the torchrun wrapper submit.py runs (``python launch/local.py TORCHRUN-ARGS``): it
returns ``PREEMPTED_EXIT_CODE`` when the ranks stopped on a signal (torchrun itself says 1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from unimrg.signals import PREEMPTED_EXIT_CODE, die_with_parent  # noqa: E402

LAUNCHER_PID = "UNIMRG_LAUNCHER_PID"   # submit.py's pid, for the torchrun wrapper
RANK_PARENT_PID = "UNIMRG_RANK_PARENT_PID"   # the torchrun wrapper's pid, for launch/train.py


def run_local(config_path: Path, nproc: int, gpu: bool) -> int:
    """torchrun on this machine, one rank per GPU (or ``nproc`` CPU ranks over gloo); stops them on
    Ctrl-C / SIGTERM / SIGHUP (see the module docstring). Returns the ranks' exit code."""
    env = dict(os.environ)
    if not gpu:
        env.setdefault("OMP_NUM_THREADS", "1")
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    env[LAUNCHER_PID] = str(os.getpid())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), str(REPO / "launch" / "train.py"), "--config", str(config_path)]
    # Own session: a terminal's Ctrl-C reaches submit.py only, which asks the ranks to checkpoint
    # (torchrun would forward SIGINT, and a KeyboardInterrupt saves nothing).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stops = []

    def stop(signum, frame) -> None:
        stops.append(signum)
        ranks = children(proc.pid)
        if len(stops) == 1:
            print(f"\nsubmit.py: {signal.Signals(signum).name}: the ranks finish their step, checkpoint and stop "
                  "(Ctrl-C again: kill them now)", file=sys.stderr, flush=True)
            for pid in ranks or [proc.pid]:   # no ranks yet: torchrun stops whatever it is starting
                _kill(pid, signal.SIGTERM)
        else:
            for pid in ranks:
                _kill(-pid, signal.SIGKILL)   # the rank's process group: it and its data-loader workers
            _kill(proc.pid, signal.SIGKILL)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if code == PREEMPTED_EXIT_CODE:
        print(f"submit.py: the ranks stopped at a checkpoint (exit code {code}); continue with the same "
              "command and --resume latest", file=sys.stderr, flush=True)
    return code


def children(pid: int) -> list[int]:
    """Pids of the live child processes of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "(comm)", which may hold spaces
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def torchrun(argv: list[str]) -> int:
    """torchrun in this process, tied to submit.py; exit code PREEMPTED_EXIT_CODE if the ranks said so."""
    launcher = os.environ.pop(LAUNCHER_PID, None)
    die_with_parent(signal.SIGTERM, int(launcher) if launcher else None)
    os.environ[RANK_PARENT_PID] = str(os.getpid())
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except ChildFailedError as e:
        # The first rank to exit decides: torchrun then stops the others (SIGTERM), whatever they were
        # doing; a rank exits PREEMPTED_EXIT_CODE only once every rank's checkpoint is complete.
        _, first = e.get_first_failure()
        if first.exitcode == PREEMPTED_EXIT_CODE:
            return PREEMPTED_EXIT_CODE
        print(e.format_msg(), file=sys.stderr, flush=True)   # what torchrun prints: the ranks' failures
        return 1
    except SignalException as e:   # torchrun itself was signalled; it has stopped the ranks
        print(f"torchrun: stopped the ranks on {signal.Signals(e.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(torchrun(sys.argv[1:]))
