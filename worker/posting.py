"""Result posting: bounded concurrency with backpressure, byte-capped bodies, never a dropped result.

``submit`` blocks while ``max_pending_posts`` posts are in flight, which slows inference instead
of piling results up in memory. Bodies are split so each stays under ``max_post_bytes`` (proxies
answer 413 on the 100+ MB bodies of very wide classifiers). A 400 rejects a whole body (the
server validates all-or-nothing), so the body is bisected until the offending item is alone; that
item is replaced by an error result for its image so the task still completes. If the API stays
unreachable through every retry, the body is spooled to disk and replayed first at the next start.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from worker.antenna import AntennaClient, AntennaRejected, AntennaUnavailable

if TYPE_CHECKING:
    from worker.results import ImageResult

log = logging.getLogger(__name__)


@dataclass
class PostCounters:
    posted_items: int = 0
    posted_bodies: int = 0
    spooled_items: int = 0
    replayed_items: int = 0
    replaced_items: int = 0
    dropped_items: int = 0


def encode_items(items: list[dict]) -> list[bytes]:
    return [json.dumps(item, separators=(",", ":")).encode() for item in items]


def split_under_cap(encoded: list[bytes], max_body_bytes: int) -> list[list[int]]:
    """Group item indexes so each ``{"results":[...]}`` body stays under ``max_body_bytes``.

    An item larger than the cap on its own still goes alone (it cannot be split further).
    """
    overhead_bytes = len(b'{"results":[]}')
    groups: list[list[int]] = []
    current: list[int] = []
    size_bytes = overhead_bytes
    for index, blob in enumerate(encoded):
        extra = len(blob) + (1 if current else 0)
        if current and size_bytes + extra > max_body_bytes:
            groups.append(current)
            current, size_bytes, extra = [], overhead_bytes, len(blob)
        current.append(index)
        size_bytes += extra
    if current:
        groups.append(current)
    return groups


def body_of(encoded: list[bytes], indexes: list[int]) -> bytes:
    return b'{"results":[' + b",".join(encoded[i] for i in indexes) + b"]}"


class Spool:
    """Result bodies the API could not take, one JSON file each under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, job_id: int, items: list[dict]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{time.time_ns()}-{job_id}-{uuid.uuid4().hex[:8]}.json"
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"job_id": job_id, "results": items}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)  # atomic: a crash leaves either nothing or a whole file
        return path

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.json")) if self.directory.exists() else []

    @staticmethod
    def read(path: Path) -> tuple[int, list[dict]]:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["job_id"]), list(data["results"])


class ResultPoster:
    def __init__(
        self,
        client: AntennaClient,
        spool: Spool,
        *,
        max_pending_posts: int = 5,
        max_post_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.spool = spool
        self.max_post_bytes = max_post_bytes
        self.counters = PostCounters()
        # Called with each result POST's seconds (retries included), on the posting thread that made
        # it; set once before the first submit (the metrics middleware's on_start does).
        self.post_timer: Optional[Callable[[float], None]] = None
        self._slots = threading.BoundedSemaphore(max_pending_posts)
        self._pool = ThreadPoolExecutor(max_pending_posts, thread_name_prefix="post")
        self._pending: set[Future] = set()
        self._lock = threading.Lock()

    @property
    def pending_posts(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, job_id: int, results: "Sequence[ImageResult]") -> None:
        """Queue ``results`` for posting; blocks while all slots are busy.

        Serialised here, once: from this point a result travels as its wire JSON (the spool keeps it).
        """
        if not results:
            return
        items = [result.item().model_dump(mode="json") for result in results]
        encoded = encode_items(items)
        for group in split_under_cap(encoded, self.max_post_bytes):
            self._slots.acquire()
            future = self._pool.submit(self._post_group, job_id, [items[i] for i in group],
                                       body_of(encoded, group))
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)
        self._slots.release()
        if future.exception() is not None:
            log.error("result post crashed: %r", future.exception())

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait for every queued post; True if all finished (posted or spooled) in time."""
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return True
            remaining_s = None if deadline_s is None else deadline_s - time.monotonic()
            if remaining_s is not None and remaining_s <= 0:
                return False
            pending[0].exception(timeout=remaining_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def replay_spool(self) -> int:
        """Post spooled bodies oldest first; stops at the first that still cannot be posted."""
        replayed = 0
        for path in self.spool.files():
            job_id, items = Spool.read(path)
            try:
                self._post_validated(job_id, items, body_of(encode_items(items), list(range(len(items)))))
            except AntennaUnavailable as error:
                log.warning("spool replay paused, API still unavailable: %s", error)
                break
            path.unlink()
            replayed += len(items)
            log.info("replayed %d spooled results for job %d from %s", len(items), job_id, path.name)
        self.counters.replayed_items += replayed
        return replayed

    def _post_group(self, job_id: int, items: list[dict], body: bytes) -> None:
        try:
            self._post_validated(job_id, items, body)
        except AntennaUnavailable as error:
            path = self.spool.write(job_id, items)
            self.counters.spooled_items += len(items)
            log.error("job %d: %d results spooled to %s (%s)", job_id, len(items), path, error)

    def _post_validated(self, job_id: int, items: list[dict], body: bytes) -> None:
        """Post; on 400 bisect until the bad item is alone, then replace it by an error result."""
        try:
            self._post_once(job_id, items, body)
        except AntennaRejected as error:
            if error.status != 400:
                raise AntennaUnavailable(f"result post rejected with HTTP {error.status}: {error.message}") from None
            self._bisect(job_id, items, error)
            return
        self.counters.posted_items += len(items)
        self.counters.posted_bodies += 1

    def _post_once(self, job_id: int, items: list[dict], body: bytes) -> None:
        started_s = time.perf_counter()
        try:
            self.client.post_results(job_id, items, body_bytes=body)
        finally:
            if self.post_timer is not None:
                self.post_timer(time.perf_counter() - started_s)

    def _bisect(self, job_id: int, items: list[dict], error: AntennaRejected) -> None:
        if len(items) > 1:
            half = len(items) // 2
            for part in (items[:half], items[half:]):
                self._post_validated(job_id, part, body_of(encode_items(part), list(range(len(part)))))
            return
        item = items[0]
        image_id = _image_id_of(item)
        if "error" in item.get("result", {}) or image_id is None:
            self.counters.dropped_items += 1
            log.error("job %d: server rejected result %s even as an error (%s); it will be redelivered",
                      job_id, item.get("reply_subject"), error.message[:200])
            return
        replacement = {"reply_subject": item["reply_subject"],
                       "result": {"error": f"result rejected by server: {error.message[:300]}", "image_id": image_id}}
        log.error("job %d: server rejected the result for image %s; posting an error result instead", job_id, image_id)
        self.counters.replaced_items += 1
        self._post_validated(job_id, [replacement], body_of(encode_items([replacement]), [0]))


def _image_id_of(item: dict) -> Optional[str]:
    result = item.get("result") or {}
    if "image_id" in result:
        return str(result["image_id"])
    images = result.get("source_images") or []
    return str(images[0]["id"]) if images and "id" in images[0] else None
