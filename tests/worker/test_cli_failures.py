"""Failures a user can cause end in ONE line on stderr and a documented exit code, never a
traceback (real subprocesses against the real local server)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import TOKEN
from tests.worker.worker_process import worker_command


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    env.update({"PYTHONUNBUFFERED": "1", **extra})
    return env


def _run(args: list[str], env: dict[str, str], cwd, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(worker_command(*args), env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The stderr line that says what failed; log lines (timestamped) may precede it."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("worker")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def _server_env(antenna, tmp_path, **extra: str) -> dict[str, str]:
    values = dict(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
                  AMI_USER_DATA_PATH=str(tmp_path / "user-data"), AMI_METRICS_ADDR="",
                  AMI_ANTENNA_PIPELINES="null", AMI_ANTENNA_API_MAX_ATTEMPTS="1")
    return _env(**{**values, **extra})


@pytest.mark.timeout(120)
def test_register_with_an_unknown_project_is_one_line_exit_3(antenna, tmp_path):
    done = _run(["register", "--project", "99"], _server_env(antenna, tmp_path), tmp_path)
    line = _one_error_line(done)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "HTTP 404" in line and "/projects/99/" in line


@pytest.mark.timeout(120)
def test_tune_with_an_unknown_job_is_one_line_exit_3(antenna, tmp_path):
    done = _run(["tune", "--job", "999"], _server_env(antenna, tmp_path), tmp_path)
    line = _one_error_line(done)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "HTTP 404" in line and "/jobs/999/" in line


@pytest.mark.timeout(120)
def test_a_rejected_token_is_one_line_exit_3(antenna, tmp_path):
    env = _server_env(antenna, tmp_path, AMI_ANTENNA_API_AUTH_TOKEN="wrong-token-123")
    done = _run(["register"], env, tmp_path)
    line = _one_error_line(done)
    assert done.returncode == 3 and "HTTP 401" in line and "AMI_ANTENNA_API_AUTH_TOKEN" in line
    assert "wrong-token-123" not in done.stderr + done.stdout


@pytest.mark.timeout(120)
def test_an_unreachable_api_is_one_line_exit_4(antenna, tmp_path):
    env = _server_env(antenna, tmp_path)
    antenna.stop()
    done = _run(["register"], env, tmp_path)
    line = _one_error_line(done)
    assert done.returncode == 4 and "unreachable" in line and "AMI_ANTENNA_API_BASE_URL" in line


@pytest.mark.timeout(120)
def test_cuda_asked_for_without_cuda_is_one_line_exit_2(antenna, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: AMI_DEVICE=cuda is valid here")
    done = _run(["run", "--burst"], _server_env(antenna, tmp_path, AMI_DEVICE="cuda"), tmp_path)
    line = _one_error_line(done)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "AMI_DEVICE=cuda" in line and "cpu" in line


@pytest.mark.timeout(60)
def test_a_bad_local_server_job_spec_is_one_line_exit_2(tmp_path):
    done = _run(["serve-antenna", "--job", "foo", "--port", "0"], _env(), tmp_path, timeout_s=50)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--job" in done.stderr and "small:20" in done.stderr


@pytest.mark.timeout(60)
def test_the_local_server_takes_its_options_after_the_subcommand(tmp_path):
    server = subprocess.Popen(worker_command("serve-antenna", "--port", "0", "--job", "tiny:2",
                                            "--data-dir", str(tmp_path / "data")),
                              env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert first.startswith("serving http://127.0.0.1:") and "jobs=[1]" in first, stderr[-2000:]
    assert server.returncode == 0, stderr[-2000:]


@pytest.mark.timeout(60)
def test_a_bad_argument_is_one_line_exit_2(tmp_path):
    done = _run(["tune", "--job", "seven"], _env(), tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "--job" in done.stderr and "`worker tune --help`" in done.stderr


@pytest.mark.timeout(60)
def test_config_into_a_closed_pipe_ends_quietly(tmp_path):
    """``worker config | head -1``: the reader has left; no BrokenPipeError traceback, exit 141.

    The reader's end is closed before the command starts, so its first write meets the broken
    pipe whatever the pace (a reader closing after one line may lose the race to a config that
    fits the pipe's buffer and exits 0)."""
    env = _env()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        config = subprocess.Popen(worker_command("config"), env=env, cwd=tmp_path, stdout=write_end,
                                  stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert config.stderr is not None
    with config.stderr:
        stderr = config.stderr.read().decode()
    assert config.wait(timeout=50) == 141, stderr
    assert stderr == ""


@pytest.mark.timeout(60)
def test_unknown_variables_are_warned_about_on_stderr(tmp_path):
    done = _run(["config"], _env(AMI_ANTENA_API_BATCH_SIZE="3", AMI_LOCALIZATION_MODEL="fasterrcnn"), tmp_path)
    assert done.returncode == 0
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, done.stderr
    assert "did you mean AMI_ANTENNA_API_BATCH_SIZE?" in warnings[0]
    assert "AMI_LOCALIZATION_MODEL is an ADC setting this worker ignores" in warnings[1]


@pytest.mark.timeout(120)
def test_start_up_logs_one_banner_line(antenna, tmp_path):
    import torch

    from worker import __version__

    done = _run(["run", "--burst"], _server_env(antenna, tmp_path, AMI_MAX_MEMORY_BYTES="3GiB"), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    banners = [line for line in done.stderr.splitlines() if f"antenna-worker {__version__} starting" in line]
    assert len(banners) == 1, done.stderr[-3000:]
    banner = banners[0]
    for part in (f"torch {torch.__version__}", "CUDA", "device cpu", f"API {antenna.base_url}",
                 "pipelines null", "memory limit 3072 MiB (AMI_MAX_MEMORY_BYTES)"):
        assert part in banner, (part, banner)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("variable", "value"), [
    ("AMI_ANTENNA_API_TIMEOUT_S", "inf"),  # accepted before, then an OverflowError in the first call
    ("AMI_ANTENNA_IDLE_SLEEP_SECONDS", "inf"),
    ("AMI_METRICS_ADDR", "127.0.0.1:99999"),  # accepted before, then an OverflowError binding it
    ("AMI_ANTENNA_API_BASE_URL", "http://127.0.0.1:abc/api/v2"),  # before: "unreachable", burst exit 0
    ("AMI_USER_DATA_PATH", "~nosuchuser/spool"),  # before: a RuntimeError traceback
])
def test_a_value_that_failed_only_later_is_one_line_exit_2(tmp_path, variable, value):
    done = _run(["check"], _env(AMI_ANTENNA_API_AUTH_TOKEN=TOKEN, **{variable: value}), tmp_path)
    line = _one_error_line(done)
    assert done.returncode == 2 and f"{variable}={value}" in line, done.stderr[-2000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["run"], ["run", "--processes", "2"], ["tune"], ["models", "list"], ["register"]])
def test_a_bad_setting_is_answered_before_torch_loads(tmp_path, command):
    """Torch takes seconds to load: a typo in a setting is answered without it."""
    code = ("import sys; from worker.cli import main; rc = main(sys.argv[1:]); "
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "--env-file", os.devnull, *command],
                          env=_env(AMI_ANTENNA_API_BATCH_SIZE="lots"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    line = _one_error_line(done)
    assert done.returncode == 2 and "AMI_ANTENNA_API_BATCH_SIZE=lots" in line, done.stderr[-2000:]
    assert done.stdout.strip() == "torch not loaded"
