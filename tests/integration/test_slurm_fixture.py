"""When the local SLURM cannot run (no root, packages missing), the `slurm` tests skip and say why —
except where SLURM is required (CI=true, UNIMRG_SLURM_REQUIRED=1), where they fail.

    python -m pytest -q tests/integration/test_slurm_fixture.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_slurm_test_without_slurm(tmp_path, **env) -> subprocess.CompletedProcess:
    # an empty PATH hides every SLURM binary; nothing is started either way
    env = {**os.environ, "PATH": str(tmp_path), "CI": "", "UNIMRG_SLURM_REQUIRED": "", **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/integration/test_slurm_cluster.py", "-k", "two_nodes"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_slurm_tests_skip_with_the_reason_without_slurm(tmp_path):
    r = run_slurm_test_without_slurm(tmp_path)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout + r.stderr
    reason = "not root" if os.geteuid() != 0 else "missing munged, mungekey, slurmctld"
    assert "no local SLURM" in r.stdout and reason in r.stdout, r.stdout


def test_slurm_tests_fail_without_slurm_where_required(tmp_path):
    for required in ({"CI": "true"}, {"UNIMRG_SLURM_REQUIRED": "1"}):
        r = run_slurm_test_without_slurm(tmp_path, **required)
        assert r.returncode == 1 and "1 error" in r.stdout and "install_slurm.sh" in r.stdout, (required, r.stdout)
