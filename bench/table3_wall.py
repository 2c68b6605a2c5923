"""Wall time of the whole Table 3 sweep for one model at the documented length (goal ≤ 60 min, 2-core CPU).

    python bench/table3_wall.py                          # Harmon: 4 rows × 3 seeds, tiny recipes, 2 CPU ranks
    python bench/table3_wall.py --model openuni --run-dir runs/t3_openuni
    python bench/table3_wall.py --seeds 1 -- train.steps=40

The documented length (docs/table3_tiny.md) is ``DOCUMENTED`` with ``--seeds 3``: each row's tiny recipe as written
(``train.steps`` of <model>_tiny.yaml), ``--seeds 3``, two CPU ranks per run, no in-training evaluation
(``eval.every=0``: the table reads the end-of-run ``scenes`` suite, 32 held-out scenes). Runs
``launch/submit.py --sweep table3 --cluster local`` into ``--run-dir`` (default: a temporary folder, removed
afterwards), prints the wall time with the machine it ran on (CPU count, model, load average before and
after: on a shared machine the number is an upper bound), then the table. Extra ``key=value`` after ``--``
are added to the sweep's overrides.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCUMENTED = ["--gpus-per-node", "0", "--cpu-ranks-per-node", "2", "--eval-scenes", "32",
              "eval.every=0"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> float:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="harmon")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--run-dir", help="keep the sweep here (default: a temporary folder, removed afterwards)")
    a = ap.parse_args(argv)
    tmp = None if a.run_dir else tempfile.mkdtemp(prefix="table3_wall_")
    out = Path(a.run_dir or Path(tmp) / "sweep")
    args = ["--seeds", str(a.seeds), *DOCUMENTED, *extra]
    load0 = os.getloadavg()
    t0 = time.time()
    cmd = [sys.executable, str(REPO / "launch" / "submit.py"), "--sweep", "table3", "--model", a.model,
           "--cluster", "local", "--run-dir", str(out), *args]
    print(" ".join(cmd), flush=True)
    code = subprocess.call(cmd, cwd=REPO)
    wall = time.time() - t0
    load1 = os.getloadavg()
    print(f"\ntable3 sweep {a.model} ({a.seeds} seed(s), {' '.join(args)}): {wall:.0f} s = {wall / 60:.1f} min wall "
          f"(exit {code}) on {os.cpu_count()} CPU(s), {cpu_model()}; load average before {load0[0]:.1f}, "
          f"after {load1[0]:.1f} (1 min)", flush=True)
    subprocess.call([sys.executable, "-m", "unimrg.eval.table", str(out)], cwd=REPO)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return wall


if __name__ == "__main__":
    main()
