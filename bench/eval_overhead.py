"""Share of a training run's wall time spent in in-training evaluation (goal ≤ 5 % at eval.every's default).

    python bench/eval_overhead.py                                   # tiny OpenUni, 2 CPU ranks, its recipe's eval
    python bench/eval_overhead.py --model harmon -- train.steps=40 eval.every=20

Runs ``launch/submit.py --cluster local`` into a temporary run folder, then adds the seconds of every
evaluation (``RUN/eval/step_*/metrics.json``, ``eval/seconds``, measured by rank 0 around the collective
evaluation) and prints them against the whole run's wall time (start-up included, so the share is a
lower bound of the share of *training* time; the eval seconds themselves are not in the throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="openuni")
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--cpu-ranks", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="recipe overrides key=value (after --)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eval_overhead-") as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--model", args.model, "--recipe", args.recipe,
               "--cluster", "local", "--cpu-ranks-per-node", str(args.cpu_ranks), "--run-dir", str(run),
               *args.overrides]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        t0 = time.time()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if res.returncode:
            sys.exit(f"training run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        evals = sorted((run / "eval").glob("step_*/metrics.json"))
        seconds = [json.loads(p.read_text())["eval/seconds"] for p in evals]
    share = sum(seconds) / wall
    print(f"{args.model} {args.recipe}: {len(seconds)} evaluations, {sum(seconds):.1f} s of {wall:.1f} s wall "
          f"({', '.join(f'{s:.1f}' for s in seconds)} s each) → eval share {100 * share:.2f} % (goal ≤ 5 %)")
    return share


if __name__ == "__main__":
    main()
