"""``worker``'s global options as a user types them: ``--version`` and ``--env-file`` on either side
of the subcommand (real subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import torch
from worker import __version__


def _worker(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.timeout(60)
def test_version_prints_the_worker_and_torch_versions():
    done = _worker("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"antenna-worker {__version__},")
    assert f"torch {torch.__version__.split('+')[0]}" in done.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["before", "after"])
def test_env_file_is_read_before_or_after_the_subcommand(tmp_path, where):
    env_file = tmp_path / "worker.env"
    env_file.write_text("AMI_ANTENNA_API_BATCH_SIZE=7\n")
    option = ["--env-file", str(env_file)]
    done = _worker(*(option + ["config"] if where == "before" else ["config"] + option), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"AMI_ANTENNA_API_BATCH_SIZE=7  # {env_file}" in [line.strip() for line in done.stdout.splitlines()] \
        or any(line.startswith("AMI_ANTENNA_API_BATCH_SIZE=7") for line in done.stdout.splitlines())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["before", "after"])
def test_an_env_file_given_that_does_not_exist_is_said(tmp_path, where):
    """Before: a mistyped --env-file was ignored without a word, and `run` then failed on an unset
    token. Still not an error (a unit or batch script may name an optional file)."""
    option = ["--env-file", str(tmp_path / "typo.env")]
    done = _worker(*(option + ["config"] if where == "before" else ["config"] + option), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"--env-file {tmp_path / 'typo.env'} does not exist: settings come from the environment only" in done.stderr


@pytest.mark.timeout(60)
def test_the_default_env_file_is_read_where_it_exists_and_not_missed_where_it_does_not(tmp_path):
    assert "does not exist" not in _worker("config", cwd=tmp_path).stderr
    (tmp_path / ".env").write_text("AMI_ANTENNA_API_BATCH_SIZE=9\n")
    done = _worker("config", cwd=tmp_path)
    assert done.returncode == 0 and any(line.startswith("AMI_ANTENNA_API_BATCH_SIZE=9") for line in done.stdout.splitlines())


@pytest.mark.timeout(60)
def test_omp_num_threads_in_the_env_file_reaches_torch_below_the_environment(tmp_path):
    """``worker tune --write-env FILE`` writes OMP_NUM_THREADS, and ``worker --env-file FILE``
    ignored it before (a run then planned every core)."""
    env_file = tmp_path / "tuned.env"
    env_file.write_text("OMP_NUM_THREADS=1\nAMI_ANTENNA_API_BATCH_SIZE=4\n")
    code = ("import sys, worker.cli; rc = worker.cli.main(['--env-file', sys.argv[1], 'config']); "
            "import torch; print('threads', torch.get_num_threads(), file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_") and k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code, str(env_file)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "threads 1" in done.stderr, done.stderr[-2000:]
    env["OMP_NUM_THREADS"] = "2"  # the environment outranks the file, as for every setting
    done = subprocess.run([sys.executable, "-c", code, str(env_file)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "threads 2" in done.stderr, done.stderr[-2000:]
