"""Per-rank entry point: read a run folder's resolved config and train.

    python -m torch.distributed.run --standalone --nproc_per_node 2 launch/train.py --config RUN/config.yaml

Started by launch/submit.py (local: torchrun; SLURM: submitit or srun), never edited per variant:
variants are recipes in launch/recipes/. The ``deepspeed`` launcher works too
(``deepspeed --num_gpus 8 launch/train.py --config RUN/config.yaml``): it adds ``--local_rank=N``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python launch/train.py` from anywhere

from unimrg.config import load_resolved  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="RUN/config.yaml written by launch/submit.py")
    # the `deepspeed` launcher passes --local_rank=N (torchrun and SLURM set LOCAL_RANK instead)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))   # what unimrg.engine reads
    parent = os.environ.get("UNIMRG_RANK_PARENT_PID")   # started by launch/local.py's torchrun
    if parent:   # it may die of SIGKILL, unable to stop this rank (which runs in a session of its own)
        from unimrg.signals import die_with_parent
        die_with_parent(signal.SIGKILL, int(parent))
    cfg = load_resolved(args.config)
    from unimrg.trainer import run  # after parsing: --help stays fast
    return run(cfg)


if __name__ == "__main__":
    try:
        code = main()
    except (Exception, KeyboardInterrupt) as e:
        if not getattr(e, "unimrg_reported", False):   # unimrg.trainer.run logged it with the rank
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit now: interpreter shutdown may wait on loader workers or threads, and only this rank's
        # exit lets torchrun / `srun --kill-on-bad-exit` stop the ranks still waiting for it.
        os._exit(1)
    sys.exit(code)
