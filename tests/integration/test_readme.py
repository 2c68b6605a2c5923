"""The README's two commands, exactly as written: the demo runs, and .ci/run runs the test command.

    python -m pytest -q tests/integration/test_readme.py
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow


def readme_commands(repo) -> list[str]:
    section = (repo / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_states_exactly_two_commands_and_ci_runs_the_test_command(repo):
    commands = readme_commands(repo)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    ci_lines = [line.strip() for line in (repo / ".ci" / "run").read_text().splitlines()]
    assert commands[1] in ci_lines, f".ci/run must run the README's test command {commands[1]!r}"


def test_readme_demo_command_runs_as_written(repo):
    demo = readme_commands(repo)[0]
    run_dir = repo / "runs" / "demo"
    assert "--run-dir runs/demo" in demo
    shutil.rmtree(run_dir, ignore_errors=True)       # the demo starts fresh, as on a new machine
    res = subprocess.run(["bash", "-c", demo], cwd=repo, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "step 20/20" in res.stdout
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "final" / "model.pt").is_file()
    # the demo's in-training evaluation (layout and values: test_train_openuni.test_in_training_eval_zero2_and_zero3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.integration.test_train_openuni import EVAL_TAGS
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert EVAL_TAGS <= set(acc.Tags()["scalars"]) and "samples/grid" in acc.Tags()["images"]
    assert "s per eval" in res.stdout
