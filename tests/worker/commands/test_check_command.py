"""``worker config`` and ``worker check`` as real subprocesses (check against the real local server)."""
from __future__ import annotations

import os
import re
import resource
import subprocess

import pytest

from tests.conftest import TOKEN
from tests.worker.worker_process import worker_command
from worker.commands.check import redact_url


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd, *, env_file: str = "/nonexistent", preexec_fn=None):
    command = worker_command(*args)
    command[command.index("--env-file") + 1] = env_file
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=100,
                          preexec_fn=preexec_fn)


def _config_lines(stdout: str) -> dict[str, tuple[str, str]]:
    lines = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(AMI_\w+)=(.*?)\s+# (.+)", line)
        assert match, line
        lines[match.group(1)] = (match.group(2), match.group(3))
    return lines


@pytest.mark.timeout(60)
def test_config_prints_every_setting_with_its_source_and_never_the_token(tmp_path):
    env_file = tmp_path / "worker.env"
    env_file.write_text(f"AMI_ANTENNA_API_BATCH_SIZE=7\nAMI_LOG_LEVEL=debug\nAMI_ANTENNA_API_AUTH_TOKEN={TOKEN}\n"
                        "AMI_NATS_URL=nats://worker:s3cret-pass@nats.example:4222\n")
    done = _run(["config"], _env(AMI_LOG_LEVEL="WARNING", AMI_SHUTDOWN_GRACE_S="45"), tmp_path,
                env_file=str(env_file))
    assert done.returncode == 0, done.stderr
    lines = _config_lines(done.stdout)
    assert lines["AMI_ANTENNA_API_BATCH_SIZE"] == ("7", str(env_file))
    assert lines["AMI_LOG_LEVEL"] == ("WARNING", "env")  # the environment wins over the file
    assert lines["AMI_SHUTDOWN_GRACE_S"] == ("45.0", "env")
    assert lines["AMI_ANTENNA_SERVICE_NAME"] == ("AMI Data Companion", "default")
    assert lines["AMI_ANTENNA_API_AUTH_TOKEN"] == ("***", str(env_file))
    assert lines["AMI_NATS_URL"] == ("nats://worker:***@nats.example:4222", str(env_file))
    assert len(lines) >= 40
    assert TOKEN not in done.stdout + done.stderr and "s3cret-pass" not in done.stdout + done.stderr


@pytest.mark.timeout(30)
def test_redact_url():
    assert redact_url("http://user:pw@host:8000/api/v2") == "http://user:***@host:8000/api/v2"
    assert redact_url("http://localhost:8000/api/v2") == "http://localhost:8000/api/v2"


def _check_lines(stdout: str) -> dict[str, tuple[bool, str]]:
    found = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(ok  |FAIL)  ([^:]+): (.*)", line)
        assert match, line
        found[match.group(2)] = (match.group(1) == "ok  ", match.group(3))
    return found


@pytest.mark.timeout(90)
def test_check_passes_against_the_local_server(antenna, tmp_path):
    done = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
                                AMI_USER_DATA_PATH=str(tmp_path / "user-data")), tmp_path)
    checks = _check_lines(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(checks) == {"api", "open files", "memory", "/dev/shm", "spool"}
    assert all(ok for ok, _ in checks.values())
    assert "token accepted" in checks["api"][1]
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.timeout(90)
def test_check_fails_on_a_wrong_token_and_an_unreachable_api(antenna, tmp_path):
    wrong = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url,
                                 AMI_ANTENNA_API_AUTH_TOKEN="wrong-token-123"), tmp_path)
    assert wrong.returncode == 1
    ok, detail = _check_lines(wrong.stdout)["api"]
    assert not ok and "rejected the token (HTTP 401)" in detail and "wrong-token-123" not in wrong.stdout
    base_url = antenna.base_url
    antenna.stop()
    down = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN), tmp_path)
    assert down.returncode == 1
    ok, detail = _check_lines(down.stdout)["api"]
    assert not ok and "unreachable" in detail and TOKEN not in down.stdout + down.stderr


@pytest.mark.timeout(90)
def test_check_fails_on_a_low_fd_limit_and_a_small_memory_limit(antenna, tmp_path):
    def low_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))

    done = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
                                AMI_MAX_MEMORY_BYTES=str(512 * 2**20)), tmp_path, preexec_fn=low_fds)
    assert done.returncode == 1
    checks = _check_lines(done.stdout)
    assert checks["api"][0] and checks["/dev/shm"][0]
    assert not checks["open files"][0] and "soft 1024, hard 2048" in checks["open files"][1]
    assert not checks["memory"][0] and "from AMI_MAX_MEMORY_BYTES" in checks["memory"][1]


@pytest.mark.timeout(90)
def test_check_names_a_job_whose_results_the_server_rejects_and_quarantined_spool_files(antenna, tmp_path):
    """Failed before: `worker check` said nothing of results held in the spool (issue 14 item 9)."""
    from worker.posting import Spool

    spool = Spool(tmp_path / "user-data" / "spool")
    spool.write(7, [{"reply_subject": "s", "result": {"error": "e", "image_id": "i"}}])
    spool.record_rejection(7, "results[0]: algorithm key 'moth-x' is not registered")
    (spool.directory / "corrupt").mkdir()
    (spool.directory / "corrupt" / "1-1-a.json").write_text("{")
    env = _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
               AMI_USER_DATA_PATH=str(tmp_path / "user-data"))
    done = _run(["check"], env, tmp_path)
    assert done.returncode == 1
    ok, detail = _check_lines(done.stdout)["spool"]
    assert not ok and "job 7" in detail and "algorithm key 'moth-x' is not registered" in detail
    assert "1 results in 1 files" in detail and "1 unreadable" in detail
