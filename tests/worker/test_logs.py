"""Log redaction and formats (``worker.logs``), in-process and in a real worker's loader workers."""
from __future__ import annotations

import json
import logging
import re
import subprocess

import pytest

from tests.conftest import TOKEN, worker_env
from tests.worker.worker_process import worker_command
from worker.logs import REDACTED, JsonFormatter, RedactFilter
from worker.testing.antenna_server import ApiError, LocalAntenna


def _record(message: str, *args: object, exc_info=None, level: int = logging.DEBUG) -> logging.LogRecord:
    return logging.LogRecord("worker.test", level, __file__, 1, message, args, exc_info)


def _formatted(record: logging.LogRecord) -> tuple[str, str]:
    assert RedactFilter([TOKEN, ""]).filter(record) is True
    return logging.Formatter("%(message)s").format(record), JsonFormatter().format(record)


def test_redact_filter_replaces_the_token_in_lazy_args_and_in_tracebacks():
    headers = {"Authorization": f"Token {TOKEN}"}
    text, as_json = _formatted(_record("DEBUG request %s %r", "POST /api/v2/jobs/1/tasks/", headers))
    assert TOKEN not in text and f"Token {REDACTED}" in text
    assert TOKEN not in as_json and json.loads(as_json)["message"] == text
    try:
        raise ValueError(f"server echoed Authorization: Token {TOKEN}")
    except ValueError:
        import sys

        record = _record("reserve failed", exc_info=sys.exc_info(), level=logging.ERROR)
    text, as_json = _formatted(record)
    assert TOKEN not in text and f"Token {REDACTED}" in text
    assert TOKEN not in as_json and f"Token {REDACTED}" in json.loads(as_json)["exception"]


def test_redact_filter_leaves_other_records_alone_and_ignores_short_secrets():
    record = _record("job %d: %s", 3, "ok")
    assert RedactFilter(["abc", TOKEN]).filter(record) and record.getMessage() == "job 3: ok"
    assert RedactFilter(["abc"]).secrets == []  # would redact ordinary words


class _EchoingAntenna(LocalAntenna):
    """The local server, answering every reserve with a 400 whose text echoes the request's
    Authorization header (as some proxies' error pages do)."""

    def api_reserve(self, job_id, body):
        raise ApiError(400, {"detail": f"Bad request; you sent Authorization: Token {self.token}"})


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_token_echoed_into_an_error_never_reaches_the_logs_of_either_process(tiny_images, tmp_path, num_workers):
    """The reserve's error text carries the token: logged by the main process (0 loader workers)
    or by a loader worker (1), it must come out redacted, as a JSON line like every other."""
    server = _EchoingAntenna(token=TOKEN, rng_seed=0).start()
    try:
        server.add_job(tiny_images[:2], "synthetic-moths")
        env = worker_env(server, tmp_path, AMI_AUTOTUNE="false", AMI_LOG_FORMAT="json", AMI_LOG_LEVEL="DEBUG",
                         AMI_ANTENNA_API_DATALOADER_NUM_WORKERS=str(num_workers))
        process = subprocess.Popen(worker_command("run", "--burst"), env=env, cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output, _ = process.communicate(timeout=150)
    finally:
        server.stop()
    assert process.returncode == 4, output[-3000:]  # every reserve refused 400: a burst that did nothing
    assert TOKEN not in output
    lines = output.strip().splitlines()
    echoed = [json.loads(line) for line in lines if "reserve failed" in line]
    assert len(echoed) == 1, output[-3000:]
    assert f"Token {REDACTED}" in echoed[0]["message"] and echoed[0]["logger"] == "worker.ingest"
    assert (echoed[0]["pid"] == process.pid) == (num_workers == 0)  # logged by a loader worker when there is one
    assert all(re.match(r"\{.*\}$", line) for line in lines), "every line is JSON"
