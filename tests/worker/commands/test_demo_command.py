"""``worker demo``'s arguments (the whole demo runs in .ci/run, from a fresh clone)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _demo(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    return subprocess.run([sys.executable, "-m", "worker.cli", "--env-file", os.devnull, "demo", *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=170)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("counts", [("-1", "0"), ("0", "0")])
def test_a_demo_of_no_images_is_one_line_exit_2(tmp_path, counts):
    """Before: ``--small -1 --large 0`` ran a job of no images and printed PASS."""
    done = _demo("--small", counts[0], "--large", counts[1], cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("worker")]
    assert done.returncode == 2 and len(errors) == 1 and "--small" in errors[0], done.stderr[-2000:]
    assert "PASS" not in done.stdout


@pytest.mark.timeout(200)
def test_a_bad_setting_passed_to_the_demo_exits_2(tmp_path):
    """Before: the worker's one line, then a FAIL summary and exit 1."""
    done = _demo("--small", "1", "--large", "0", "--data-dir", str(tmp_path / "data"),
                 "--env", "AMI_ANTENNA_API_BATCH_SIZE=0", cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-2000:]
    assert "AMI_ANTENNA_API_BATCH_SIZE=0" in done.stderr
