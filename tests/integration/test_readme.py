"""The README's two commands: the demo runs (in a temporary copy of the checkout), and .ci/run runs the
test command.

    python -m pytest -q tests/integration/test_readme.py
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The set-up part of the README's first command. The test never runs it: it would install packages
# into the environment the tests run in (on a GPU machine, a CPU torch over the user's CUDA build);
# the tests already run in an environment that has them.
DOCUMENTED_INSTALLS = ["pip install torch==2.13.0", 'pip install -e ".[test]"']


def readme_commands(repo) -> list[str]:
    section = (repo / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def copy_checkout(repo: Path, dest: Path) -> Path:
    """The checkout's source files (tracked, plus new files git does not ignore) copied to DEST, without
    run folders, generated data or caches: what a fresh clone of this working tree holds."""
    if (repo / ".git").exists():
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               cwd=repo, capture_output=True, text=True, check=True).stdout.split("\0")
        for name in filter(None, names):
            src = repo / name
            if src.is_file():                      # listed but deleted in the working tree: skip
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:                                          # an unpacked archive: everything but generated output
        shutil.copytree(repo, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "runs", "data", "__pycache__", "*.egg-info", "build", ".pytest_cache"))
    return dest


def snapshot(path: Path):
    """Every file under PATH with its size and mtime (None if PATH does not exist)."""
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_readme_states_exactly_two_commands_and_ci_runs_the_test_command(repo):
    commands = readme_commands(repo)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    ci_lines = [line.strip() for line in (repo / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines, f".ci/run must run the README's test command {commands[1]!r}"


def test_readme_demo_command_runs_in_a_copy_and_leaves_the_checkout_alone(repo, tmp_path):
    demo = readme_commands(repo)[0]
    parts = demo.split(" && ")
    assert parts[:2] == DOCUMENTED_INSTALLS, \
        f"the README's set-up changed ({parts[:-1]}): update DOCUMENTED_INSTALLS, and .ci/run to install the same"
    run = " && ".join(parts[2:])
    assert run.startswith("python launch/submit.py ") and "--run-dir runs/demo" in run, run
    # the interpreter running the tests has everything installed; `python` on PATH may be another one
    run = shlex.quote(sys.executable) + run[len("python"):]
    # The demo as written, cut to 20 steps (its full length and wall time are measured in the README; here
    # it starts from random weights, UNIMRG_BASE=none, so no base is built either).
    run += " train.steps=20"

    users_demo = snapshot(repo / "runs" / "demo")
    copy = copy_checkout(repo, tmp_path / "checkout")
    assert not (copy / "runs").exists()            # the demo starts fresh, as on a new machine
    res = subprocess.run(["bash", "-c", run], cwd=copy, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "step 20/20" in res.stdout
    run_dir = copy / "runs" / "demo"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "final" / "model.pt").is_file()
    assert snapshot(repo / "runs" / "demo") == users_demo, "the test changed the checkout's runs/demo"
    # the demo's in-training evaluation (layout and values: test_train_openuni.test_in_training_eval_zero2_and_zero3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.integration.test_train_openuni import EVAL_TAGS
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert EVAL_TAGS <= set(acc.Tags()["scalars"]) and "samples/grid" in acc.Tags()["images"]
    assert "s per eval" in res.stdout
