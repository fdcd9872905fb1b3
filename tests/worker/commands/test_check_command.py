"""``worker config`` and ``worker check`` as real subprocesses (check against the real local server)."""
from __future__ import annotations

import os
import re
import resource
import http.server
import socket
import subprocess
import threading

import pytest

from tests.conftest import TOKEN
from tests.worker.worker_process import worker_command
from worker.commands.check import redact_url
from worker.settings import Settings, load_settings


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMI_")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd, *, env_file: str = os.devnull, preexec_fn=None):
    command = worker_command(*args)
    command[command.index("--env-file") + 1] = env_file
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=100,
                          preexec_fn=preexec_fn)


def _config_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """``AMI_NAME`` -> (value as printed, source); a commented ``# AMI_NAME=`` line keeps its ``# ``."""
    lines, source = {}, ""
    for line in stdout.splitlines():
        if heading := re.fullmatch(r"# (?:from (.+)|(defaults).*)", line):
            source = heading.group(1) or "default"
        elif match := re.fullmatch(r"(# )?(AMI_\w+)=(.*)", line):
            lines[match.group(2)] = ((match.group(1) or "") + match.group(3), source)
    return lines


# What systemd's EnvironmentFile= and python-dotenv both read the same way: a bare value of safe
# characters, or a single-quoted one without quotes inside; no trailing comments.
ENV_FILE_LINE = re.compile(r"(#.*|[A-Z][A-Z0-9_]*=([A-Za-z0-9_./:@,+=~%*-]*|'[^'\\]*'))?")


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
    assert lines["AMI_LOG_LEVEL"] == ("WARNING", "the environment")  # the environment wins over the file
    assert lines["AMI_SHUTDOWN_GRACE_S"] == ("45.0", "the environment")
    assert lines["AMI_ANTENNA_SERVICE_NAME"] == ("# 'AMI Data Companion'", "default")
    assert lines["AMI_ANTENNA_API_AUTH_TOKEN"] == ("# <set, not shown>", str(env_file))
    assert lines["AMI_NATS_URL"] == ("# nats://worker:***@nats.example:4222", str(env_file))
    assert len(lines) >= 40
    assert TOKEN not in done.stdout + done.stderr and "s3cret-pass" not in done.stdout + done.stderr


def _config_round_trip(tmp_path, env: dict[str, str]) -> tuple[str, "Settings"]:
    """``worker config`` output written to a file and read back as the only source of settings."""
    first = _run(["config"], _env(**env), tmp_path)
    assert first.returncode == 0, first.stderr
    assert all(ENV_FILE_LINE.fullmatch(line) for line in first.stdout.splitlines()), first.stdout
    env_file = tmp_path / "pasted.env"
    env_file.write_text(first.stdout)
    again = _run(["config"], _env(), tmp_path, env_file=str(env_file))
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""  # no warnings: every name it printed is a setting
    return first.stdout, load_settings(env_file=str(env_file))


@pytest.mark.timeout(60)
def test_config_output_read_back_as_an_env_file_pins_nothing(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("AMI_")]:
        monkeypatch.delenv(name)
    text, settings = _config_round_trip(tmp_path, {})
    assert settings.explicitly_set() == set()
    assert settings == load_settings(env_file=None)
    assert "# AMI_ANTENNA_API_AUTH_TOKEN=<your token>" in text.splitlines()


@pytest.mark.timeout(60)
def test_config_output_read_back_keeps_what_was_set_and_never_the_token(tmp_path, monkeypatch):
    for name in [n for n in os.environ if n.startswith("AMI_")]:
        monkeypatch.delenv(name)
    chosen = {"AMI_ANTENNA_API_BATCH_SIZE": "7", "AMI_ANTENNA_SERVICE_NAME": "Moth rig #2 (north field)",
              "AMI_MAX_MEMORY_BYTES": "6GiB", "AMI_ANTENNA_API_AUTH_TOKEN": TOKEN, "AMI_LOG_FORMAT": "json",
              "AMI_METRICS_ADDR": ""}
    text, settings = _config_round_trip(tmp_path, chosen)
    assert TOKEN not in text
    assert settings.explicitly_set() == set(chosen) - {"AMI_ANTENNA_API_AUTH_TOKEN"}
    assert settings.antenna_service_name == "Moth rig #2 (north field)"
    assert (settings.antenna_api_batch_size, settings.max_memory_bytes) == (7, 6 * 1024**3)
    assert settings.metrics_addr == ""  # empty is a choice here: metrics off


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(90)
def test_check_passes_against_the_local_server(antenna, tmp_path, tiny_images):
    antenna.add_job(tiny_images[:2], "null")
    port = _free_port()
    done = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
                                AMI_ANTENNA_PIPELINES="synthetic-moths,null", AMI_METRICS_ADDR=f"127.0.0.1:{port}",
                                AMI_USER_DATA_PATH=str(tmp_path / "user-data")), tmp_path)
    checks = _check_lines(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(checks) == {"api", "reserve", "device", "pipeline synthetic-moths", "pipeline null", "spool",
                           "metrics", "open files", "memory", "/dev/shm"}
    assert all(ok for ok, _ in checks.values())
    assert "token accepted" in checks["api"][1]
    assert "may reserve tasks" in checks["reserve"][1]
    assert checks["device"][1].startswith("cpu") or checks["device"][1].startswith("cuda")
    assert f"127.0.0.1:{port} is free" in checks["metrics"][1]
    assert str(tmp_path / "user-data" / "spool") in checks["spool"][1]
    assert antenna.reservations == []  # the reserve check took no task
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.timeout(90)
def test_check_fails_on_a_token_that_may_not_reserve_a_busy_port_a_bad_spool_and_an_unknown_pipeline(
        antenna_factory, tmp_path, tiny_images):
    antenna = antenna_factory(reader_tokens=["reader-token-456"])
    antenna.add_job(tiny_images[:2], "null")
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url,
                                    AMI_ANTENNA_API_AUTH_TOKEN="reader-token-456",
                                    AMI_ANTENNA_PIPELINES="null,no-such-model", AMI_METRICS_ADDR=f"127.0.0.1:{port}",
                                    AMI_USER_DATA_PATH=str(not_a_dir / "user-data")), tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    checks = _check_lines(done.stdout)
    assert checks["api"][0] and checks["pipeline null"][0]
    ok, detail = checks["reserve"]
    assert not ok and "HTTP 403" in detail and "superuser" in detail
    ok, detail = checks["metrics"]
    assert not ok and f"127.0.0.1:{port} is in use" in detail and "AMI_METRICS_ADDR" in detail
    ok, detail = checks["spool"]
    assert not ok and "AMI_USER_DATA_PATH" in detail
    ok, detail = checks["pipeline no-such-model"]
    assert not ok and "unknown pipeline" in detail
    assert antenna.reservations == []


@pytest.mark.timeout(30)
def test_the_reserve_check_tells_a_superusers_token_from_another_whatever_order_the_server_checks_in(
        antenna_factory, settings_for, tiny_images):
    """Antenna validates a reserve's body before the job's permission, so a reserve of batch_size 0 is
    400 to any token: read as "may reserve", it passed a token that then got 403 on every task call."""
    from worker.commands.check import check_reserve

    antenna = antenna_factory(reader_tokens=["reader-token-456"])
    job = antenna.add_job(tiny_images[:2], "null")
    reader = check_reserve(settings_for(antenna, antenna_api_auth_token="reader-token-456", antenna_pipelines="null"))
    assert not reader.ok and "HTTP 403" in reader.detail and "superuser" in reader.detail, reader.detail
    superuser = check_reserve(settings_for(antenna, antenna_pipelines="null"))
    assert superuser.ok and "may reserve tasks" in superuser.detail, superuser.detail
    report = antenna.report(job)
    assert antenna.reservations == [] and report.delivered == report.results_ok == report.results_error == 0


@pytest.mark.timeout(90)
def test_check_fails_on_cuda_asked_for_without_cuda(antenna, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: AMI_DEVICE=cuda is valid here")
    done = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
                                AMI_DEVICE="cuda", AMI_ANTENNA_PIPELINES="null", AMI_METRICS_ADDR=""), tmp_path)
    assert done.returncode == 1
    checks = _check_lines(done.stdout)
    ok, detail = checks["device"]
    assert not ok and "AMI_DEVICE=cuda" in detail
    assert not checks["pipeline null"][0] and "no device" in checks["pipeline null"][1]


@pytest.mark.timeout(90)
def test_check_fails_on_a_wrong_token_and_an_unreachable_api(antenna, tmp_path):
    wrong = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_PIPELINES="null",
                                 AMI_ANTENNA_API_AUTH_TOKEN="wrong-token-123"), tmp_path)
    assert wrong.returncode == 1
    ok, detail = _check_lines(wrong.stdout)["api"]
    assert not ok and "rejected the token (HTTP 401)" in detail and "wrong-token-123" not in wrong.stdout
    base_url = antenna.base_url
    antenna.stop()
    down = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
                                AMI_ANTENNA_PIPELINES="null"), tmp_path)
    assert down.returncode == 1
    ok, detail = _check_lines(down.stdout)["api"]
    assert not ok and "unreachable" in detail and TOKEN not in down.stdout + down.stderr


class _LoginPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"<html><body>Sign in to the proxy</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.timeout(90)
def test_check_says_an_api_url_that_answers_a_page_answered(tmp_path):
    """Before: "unreachable", for a server that answered at once (a proxy's or a login page)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LoginPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=f"http://127.0.0.1:{server.server_address[1]}/api/v2",
                                    AMI_ANTENNA_API_AUTH_TOKEN=TOKEN, AMI_ANTENNA_PIPELINES="null"), tmp_path)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 1
    ok, detail = _check_lines(done.stdout)["api"]
    assert not ok and "answered, but not as Antenna's API does" in detail and "unreachable" not in detail, detail


@pytest.mark.timeout(90)
def test_check_fails_on_a_low_fd_limit_and_a_small_memory_limit(antenna, tmp_path):
    def low_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 2048))

    done = _run(["check"], _env(AMI_ANTENNA_API_BASE_URL=antenna.base_url, AMI_ANTENNA_API_AUTH_TOKEN=TOKEN,
                                AMI_ANTENNA_PIPELINES="null", AMI_MAX_MEMORY_BYTES=str(512 * 2**20)), tmp_path,
                preexec_fn=low_fds)
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
