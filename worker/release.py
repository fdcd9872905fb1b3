"""Giving back reserved tasks the worker will not finish.

Through the HTTP API only a posted result completes a task; an unfinished task is redelivered
after the reservation timeout and costs one of its (default two) deliveries. Where the worker can
reach the server's NATS (``AMI_NATS_URL``), a ``-NAK`` on the task's reply subject releases it
for immediate redelivery. Each ``-NAK`` is sent as a request: JetStream answers an ack that has
a reply subject once its consumer has taken it, so a task counts as released only on that answer
(a subject no consumer serves, or no answer within the timeout, leaves it for redelivery after
the reservation timeout). Either way each task is logged by id.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Optional, Sequence

from worker.schema import Task

log = logging.getLogger(__name__)


class TaskReleaser:
    def __init__(self, nats_url: Optional[str] = None, *, timeout_s: float = 5.0) -> None:
        self.nats_url = nats_url
        self.timeout_s = timeout_s
        self.released_total = 0
        self.left_total = 0

    def release(self, job_id: int, tasks: Sequence[Task], reason: str) -> int:
        """NAK ``tasks`` when NATS is configured; returns how many the server confirmed released
        (the rest wait for the reservation timeout)."""
        if not tasks:
            return 0
        confirmed: set[str] = set()
        if self.nats_url:
            try:
                confirmed = asyncio.run(asyncio.wait_for(self._nak_all(tasks), timeout=self.timeout_s * 2))
            except Exception as error:  # NATS down: the reservation timeout still redelivers them
                log.warning("job %d: could not NAK %d tasks over NATS: %s", job_id, len(tasks), error)
        for task in tasks:
            how = ("released (-NAK)" if task.reply_subject in confirmed
                   else "left for redelivery after the reservation timeout")
            log.warning("job %d: task %s (image %s) %s: %s", job_id, task.id, task.image_id, how, reason)
        released = sum(1 for task in tasks if task.reply_subject in confirmed)
        self.released_total += released
        self.left_total += len(tasks) - released
        return released

    async def _nak_all(self, tasks: Sequence[Task]) -> set[str]:
        """The reply subjects whose ``-NAK`` the server answered."""
        import nats  # imported here: only deployments with AMI_NATS_URL need it loaded

        connection = await nats.connect(
            self.nats_url, connect_timeout=self.timeout_s, allow_reconnect=False, max_reconnect_attempts=0,
            error_cb=_quiet,
        )

        async def nak(subject: str) -> Optional[str]:
            try:
                await connection.request(subject, b"-NAK", timeout=self.timeout_s)
            except Exception as error:  # no responders (no such consumer), a timeout: not released
                log.debug("nats: -NAK on %s not confirmed: %r", subject, error)
                return None
            return subject

        try:
            answered = await asyncio.gather(*(nak(task.reply_subject) for task in tasks))
        finally:
            await connection.close()
        return {subject for subject in answered if subject is not None}


async def _quiet(error: Exception) -> None:
    log.debug("nats: %s", error)
