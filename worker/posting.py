"""Result posting: bounded concurrency with backpressure, byte-capped bodies, never a silently lost result.

``submit`` blocks while ``max_pending_posts`` posts are in flight, which slows inference instead
of piling results up in memory. Bodies are split so each stays under ``max_post_bytes``.

What each answer does to a body (the client has already retried what it may retry):
- accepted (2xx): posted.
- unreachable, 5xx or 429 through every retry, 401/403, any other 4xx: the body is spooled to disk
  and retried later with backoff, by a replay thread that runs while spooled files are due.
- 404 (the job was deleted): the results are dropped, one log line, counted in ``job_gone_items``.
- 413 (a proxy's body limit below ours): the body is split in halves and each retried, and
  ``max_post_bytes`` is lowered to half the refused body for later bodies; a single result over
  the limit is replaced by an error result for its image, so its task still completes.
- 400 (validation is all-or-nothing): the body is bisected. If both halves are rejected for the
  same cause as the whole, the rejection is systematic (every item, the same error): nothing is
  replaced, posting for the job stops for this process's life, the results stay spooled, the cause
  is logged once and recorded under ``spool/rejected/`` (``worker check`` shows it), and the next
  start replays them. Otherwise the bisection goes on until the offending item is alone and that
  item is replaced by an error result for its image.
- the spool cannot be written (disk full, permissions): one ERROR line, ``spool_failed_items``,
  and the tasks count as stranded (``take_stranded``): the server redelivers them.

Spooled bodies are replayed oldest first at start and then whenever a file is due: a file that
still fails is kept with its own backoff while the others go on; an unreadable file is moved to
``spool/corrupt/`` with one ERROR line; a file the worker cannot open or remove (a read-only
filesystem, another user's file) is left alone for the process's life, with one ERROR line. Each
file is claimed with ``flock`` so two replayers (a thread and the start-up call, or two workers
sharing a spool) never post it twice. A drain stops the replay (``stop_replay``); past its
deadline posts give up their retries (``give_up``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Optional, Sequence

from worker.antenna import AntennaClient, AntennaError, AntennaRejected, AntennaUnavailable
from worker.backoff import backoff_delay_s

if TYPE_CHECKING:
    from worker.results import ImageResult

log = logging.getLogger(__name__)

MIN_POST_BYTES = 64 * 1024  # the floor a 413 can lower the cap to (AMI_ANTENNA_MAX_POST_BYTES' minimum)
HoldReason = Literal["unavailable", "auth", "refused", "job_rejects_all", "crashed", "gave_up"]
SLOT_POLL_S = 0.1  # how often a submit waiting for a post slot looks at ``give_up``
STALE_TEMPORARY_S = 60.0  # a spool write takes milliseconds: an older .tmp is a crash's leftover


@dataclass
class PostCounters:
    posted_items: int = 0
    posted_bodies: int = 0
    spooled_items: int = 0
    replayed_items: int = 0
    replaced_items: int = 0
    dropped_items: int = 0  # rejected even as an error result: left for redelivery
    job_gone_items: int = 0  # the job was deleted (404): dropped
    split_bodies: int = 0  # bodies split after a 413
    spool_failed_items: int = 0  # neither posted nor spooled: stranded
    corrupt_spool_files: int = 0


@dataclass(frozen=True)
class Held:
    """Results that could not be delivered now and go (back) to the spool."""

    items: list[dict]
    reason: HoldReason
    detail: str


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


def whole_body(items: list[dict]) -> bytes:
    return body_of(encode_items(items), list(range(len(items))))


class SpoolCorrupt(ValueError):
    """A spool file that cannot be read back as ``{"job_id": int, "results": [item, ...]}``."""


class Spool:
    """Result bodies the API could not take, one JSON file each under ``directory``.

    ``corrupt/`` holds files that could not be read back; ``rejected/`` one record per job whose
    every result the server rejected (its cause), until those results are posted.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, job_id: int, items: list[dict], *, path: Optional[Path] = None) -> Path:
        """Write a new file (or replace ``path``) atomically: a crash leaves the old file or the new one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = path or self.directory / f"{time.time_ns()}-{job_id}-{uuid.uuid4().hex[:8]}.json"
        temporary = path.with_suffix(".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump({"job_id": job_id, "results": items}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        _fsync_directory(self.directory)  # the rename itself survives a power cut
        return path

    def unwritable(self) -> Optional[OSError]:
        """Why no file can be written here now (None: one can): the folder is created as a write
        would, and a file made and removed in it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe-"):
                return None
        except OSError as error:
            return error

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []

    @staticmethod
    def read(path: Path) -> tuple[int, list[dict]]:
        """``(job_id, items)``; ``SpoolCorrupt`` when unreadable, ``FileNotFoundError`` when gone."""
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
            job_id, items = data["job_id"], data["results"]
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError, OSError) as error:
            raise SpoolCorrupt(f"{type(error).__name__}: {str(error)[:200]}") from None
        if isinstance(job_id, bool) or not isinstance(job_id, int) or not isinstance(items, list) \
                or not all(isinstance(item, dict) and "reply_subject" in item for item in items):
            raise SpoolCorrupt("not {job_id: int, results: [{reply_subject, result}, ...]}")
        return job_id, items

    def remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _fsync_directory(self.directory)

    def quarantine(self, path: Path) -> Path:
        """Move an unreadable file to ``corrupt/``; returns where it went."""
        target_dir = self.directory / "corrupt"
        target_dir.mkdir(exist_ok=True)
        target = target_dir / path.name
        os.replace(path, target)
        _fsync_directory(target_dir)
        _fsync_directory(self.directory)
        return target

    def remove_stale_temporaries(self, older_than_s: float = STALE_TEMPORARY_S) -> int:
        """Delete ``.tmp`` files a crashed write left behind; returns how many."""
        if not self.directory.is_dir():
            return 0
        removed = 0
        cutoff_s = time.time() - older_than_s
        for temporary in self.directory.glob("*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if temporary.stat().st_mtime < cutoff_s:
                    temporary.unlink()
                    removed += 1
        return removed

    @contextlib.contextmanager
    def claim(self, path: Path) -> Iterator[bool]:
        """Hold an exclusive ``flock`` on ``path``; yields False when another replayer holds it or
        the file is gone (posted and removed by someone else meanwhile)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield os.fstat(fd).st_nlink > 0
        finally:
            os.close(fd)  # releases the lock

    # --- systematic rejections, for `worker check`

    def record_rejection(self, job_id: int, cause: str) -> None:
        directory = self.directory / "rejected"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{job_id}.json").write_text(json.dumps({"job_id": job_id, "cause": cause}))

    def clear_rejection(self, job_id: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "rejected" / f"{job_id}.json").unlink()

    def rejections(self) -> dict[int, str]:
        """Job id -> the cause the server gave, for jobs whose results are held after a systematic 400."""
        found = {}
        directory = self.directory / "rejected"
        for record in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(record.read_text())
                found[int(data["job_id"])] = str(data["cause"])
        return found


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse a directory fsync: nothing to do then
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def same_cause(*messages: str) -> bool:
    """True when the messages differ at most in numbers (item indexes, ids)."""
    return len({re.sub(r"\d+", "#", message) for message in messages}) == 1


class ResultPoster:
    def __init__(
        self,
        client: AntennaClient,
        spool: Spool,
        *,
        max_pending_posts: int = 5,
        max_post_bytes: int = 32 * 1024 * 1024,
        replay_backoff_s: float = 5.0,
        replay_backoff_cap_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.spool = spool
        self.max_post_bytes = max_post_bytes
        self.replay_backoff_s = replay_backoff_s
        self.replay_backoff_cap_s = replay_backoff_cap_s
        self.counters = PostCounters()
        self._clock = clock
        # Called with each result POST's seconds (retries included), on the posting thread that made
        # it; set once before the first submit (the metrics middleware's on_start does).
        self.post_timer: Optional[Callable[[float], None]] = None
        self._slots = threading.BoundedSemaphore(max_pending_posts)
        self._pool = ThreadPoolExecutor(max_pending_posts, thread_name_prefix="post")
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._rejecting: dict[int, str] = {}  # job -> cause of its systematic 400
        self._stranded: dict[int, int] = {}  # job -> results neither posted nor spooled
        self._gone: set[int] = set()  # jobs the server answered 404 for
        self._retry: dict[str, tuple[int, float]] = {}  # spool file name -> (failures, due at)
        self._replay_lock = threading.Lock()
        self._temporaries_checked = False
        self._stuck: set[str] = set()  # spool files this process cannot open or remove: left alone
        self._closing = threading.Event()
        self._replay_stopped = threading.Event()  # a drain began: spooled files wait for the next start
        self._gave_up = threading.Event()  # past the drain's deadline: no retries, no waiting for a slot
        self._replayer: Optional[threading.Thread] = None

    @property
    def pending_posts(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def rejected_jobs(self) -> dict[int, str]:
        """Jobs whose every result the server rejects (job -> cause): their results stay spooled."""
        with self._lock:
            return dict(self._rejecting)

    def take_stranded(self, job_id: int) -> int:
        """Results of ``job_id`` lost since the last call (neither posted nor spooled): their tasks
        are left for redelivery. The loop adds them to the job's stranded count."""
        with self._lock:
            return self._stranded.pop(job_id, 0)

    def submit(self, job_id: int, results: "Sequence[ImageResult]") -> None:
        """Queue ``results`` for posting; blocks while all slots are busy.

        Serialised here, once: from this point a result travels as its wire JSON (the spool keeps it).
        """
        if not results:
            return
        items = [result.item().model_dump(mode="json") for result in results]
        encoded = encode_items(items)
        for group in split_under_cap(encoded, self.max_post_bytes):
            if not self._take_slot():
                self._spool(job_id, Held([items[i] for i in group], "gave_up",
                                         "not posted: the shutdown's deadline passed while every post slot was busy"))
                continue
            future = self._pool.submit(self._post_group, job_id, [items[i] for i in group],
                                       body_of(encoded, group))
            with self._lock:
                self._pending.add(future)
            future.add_done_callback(self._done)

    def _take_slot(self) -> bool:
        """A post slot, waiting while all are busy; False once ``give_up`` was called and none is free."""
        while not self._slots.acquire(timeout=SLOT_POLL_S):
            if self._gave_up.is_set():
                return False
        return True

    def stop_replay(self) -> None:
        """A drain began: replay no further spooled file (the one in flight finishes); they are
        replayed at the next start. Safe from any thread."""
        self._replay_stopped.set()

    def give_up(self) -> None:
        """The shutdown's deadline passed: a failed attempt is final (posts in flight finish their
        current one) and ``submit`` spools a body at once rather than wait for a busy slot, so the
        loop reaches its forced stop within one API timeout instead of every post's retries.
        Safe from any thread."""
        self._gave_up.set()
        self._replay_stopped.set()
        self.client.stop_retrying()

    def _done(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)
        self._slots.release()

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait for every queued post; True if all finished (posted or spooled) in time, False at the
        deadline (never raises)."""
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                return True
            remaining_s = None if deadline_s is None else deadline_s - time.monotonic()
            if remaining_s is not None and remaining_s <= 0:
                return False
            try:
                pending[0].exception(timeout=remaining_s)
            except FutureTimeout:
                return False

    def close(self, replay_join_s: float = 2.0) -> None:
        """Stop retrying, let posts in flight finish their current attempt (spooling what fails),
        and stop the replay thread (waiting ``replay_join_s`` at most: a replay POST still in
        flight then ends with the process; its file stays and is replayed at the next start, a
        harmless duplicate at worst). After a ``flush`` that met its deadline nothing is in flight."""
        self._closing.set()
        self.client.stop_retrying()
        self._pool.shutdown(wait=True)
        replayer = self._replayer
        if replayer is not None:
            replayer.join(timeout=replay_join_s)
            if replayer.is_alive():
                log.warning("spool replay still posting at close; its file stays for the next start")

    # --- live posting

    def _post_group(self, job_id: int, items: list[dict], body: bytes) -> None:
        try:
            held = self._deliver(job_id, items, body)
        except Exception as error:  # a bug here must not lose the results: keep them
            log.exception("job %d: posting %d results failed unexpectedly", job_id, len(items))
            held = Held(items, "crashed", f"{type(error).__name__}: {error}")
        if held is not None:
            self._spool(job_id, held)

    def _spool(self, job_id: int, held: Held) -> None:
        count = len(held.items)
        try:
            path = self.spool.write(job_id, held.items)
        except OSError as error:
            with self._lock:
                self.counters.spool_failed_items += count
                self._stranded[job_id] = self._stranded.get(job_id, 0) + count
            log.error("job %d: %d results could not be posted (%s) nor spooled to %s (%s); their tasks "
                      "are stranded and will be redelivered", job_id, count, held.detail[:200],
                      self.spool.directory, error)
            return
        with self._lock:
            self.counters.spooled_items += count
        if held.reason == "job_rejects_all":
            log.info("job %d: %d results held in %s (the server rejects every result of this job)",
                     job_id, count, path.name)
        elif held.reason == "auth":
            self._schedule(path.name, failures=1)
            log.error("job %d: the API rejected the token posting %d results (%s); spooled to %s: check "
                      "AMI_ANTENNA_API_AUTH_TOKEN", job_id, count, held.detail[:300], path)
        else:
            self._schedule(path.name, failures=1)
            log.error("job %d: %d results spooled to %s (%s)", job_id, count, path, held.detail[:300])
        self._ensure_replayer()

    # --- delivery: one body, whatever the server answers

    def _deliver(self, job_id: int, items: list[dict], body: Optional[bytes] = None) -> Optional[Held]:
        """Post ``items``; None when every item reached a final state (posted, replaced, dropped),
        else what must be held in the spool."""
        cause = self.rejected_jobs.get(job_id)
        if cause is not None:
            return Held(items, "job_rejects_all", cause)
        error = self._attempt(job_id, items, body)
        return None if error is None else self._settle(job_id, items, error)

    def _attempt(self, job_id: int, items: list[dict], body: Optional[bytes] = None) -> Optional[AntennaError]:
        started_s = time.perf_counter()
        try:
            self.client.post_results(job_id, items, body_bytes=body or whole_body(items))
        except AntennaError as error:
            return error
        finally:
            if self.post_timer is not None:
                self.post_timer(time.perf_counter() - started_s)
        with self._lock:
            self.counters.posted_items += len(items)
            self.counters.posted_bodies += 1
        return None

    def _settle(self, job_id: int, items: list[dict], error: AntennaError) -> Optional[Held]:
        if isinstance(error, AntennaUnavailable) or not isinstance(error, AntennaRejected):
            return Held(items, "unavailable", str(error))
        if error.auth:
            return Held(items, "auth", str(error))
        if error.reason == "not_found":
            with self._lock:
                self.counters.job_gone_items += len(items)
                self._gone.add(job_id)
            log.warning("job %d is gone from the server (HTTP 404): %d results dropped", job_id, len(items))
            return None
        if error.reason == "too_large":
            return self._split_too_large(job_id, items, error)
        if error.reason == "invalid":
            return self._bisect(job_id, items, error)
        return Held(items, "refused", str(error))

    def _split_too_large(self, job_id: int, items: list[dict], error: AntennaRejected) -> Optional[Held]:
        refused_bytes = len(whole_body(items))
        with self._lock:
            cap_bytes = max(MIN_POST_BYTES, min(self.max_post_bytes, refused_bytes // 2))
            lowered = cap_bytes < self.max_post_bytes
            self.max_post_bytes = cap_bytes
        if lowered:
            log.warning("job %d: a body of %d bytes got HTTP 413; capping later bodies at %d bytes",
                        job_id, refused_bytes, cap_bytes)
        if len(items) == 1:
            return self._replace(job_id, items[0], "result too large for the server's body limit (HTTP 413)")
        with self._lock:
            self.counters.split_bodies += 1
        half = len(items) // 2
        log.warning("job %d: a body of %d results was refused as too large (HTTP 413); posting it in halves",
                    job_id, len(items))
        return _merge([self._deliver(job_id, part) for part in (items[:half], items[half:])])

    def _bisect(self, job_id: int, items: list[dict], error: AntennaRejected) -> Optional[Held]:
        """Isolate the invalid items of a 400; a systematic rejection holds the whole body."""
        cause = self.rejected_jobs.get(job_id)
        if cause is not None:  # another body of the job found it systematic meanwhile
            return Held(items, "job_rejects_all", cause)
        if len(items) == 1:
            return self._replace(job_id, items[0], f"result rejected by server: {error.message[:300]}")
        half = len(items) // 2
        held: list[Optional[Held]] = []
        invalid: list[tuple[list[dict], AntennaRejected]] = []
        for part in (items[:half], items[half:]):
            part_error = self._attempt(job_id, part)
            if isinstance(part_error, AntennaRejected) and part_error.reason == "invalid":
                invalid.append((part, part_error))
            elif part_error is not None:
                held.append(self._settle(job_id, part, part_error))
        if len(invalid) == 2 and same_cause(error.message, *(e.message for _, e in invalid)):
            return self._reject_job(job_id, items, error)
        held.extend(self._bisect(job_id, part, part_error) for part, part_error in invalid)
        return _merge(held)

    def _reject_job(self, job_id: int, items: list[dict], error: AntennaRejected) -> Held:
        cause = error.message[:300]
        with self._lock:
            first = job_id not in self._rejecting
            self._rejecting[job_id] = cause
        if first:
            log.error("job %d: the server rejects every result (HTTP 400: %s); posting for this job stops and "
                      "its results stay in %s until the cause is fixed and the worker restarts",
                      job_id, cause, self.spool.directory)
            try:
                self.spool.record_rejection(job_id, cause)
            except OSError as record_error:
                log.warning("job %d: could not record the rejection for `worker check`: %s", job_id, record_error)
        return Held(items, "job_rejects_all", cause)

    def _replace(self, job_id: int, item: dict, why: str) -> Optional[Held]:
        image_id = _image_id_of(item)
        if "error" in item.get("result", {}) or image_id is None:
            with self._lock:
                self.counters.dropped_items += 1
            log.error("job %d: server refused result %s even as an error (%s); it will be redelivered",
                      job_id, item.get("reply_subject"), why[:200])
            return None
        replacement = {"reply_subject": item["reply_subject"], "result": {"error": why, "image_id": image_id}}
        log.error("job %d: server refused the result for image %s; posting an error result instead (%s)",
                  job_id, image_id, why[:200])
        with self._lock:
            self.counters.replaced_items += 1
        return self._deliver(job_id, [replacement])

    # --- replay

    def replay_spool(self) -> int:
        """Post the spooled files that are due, oldest first; returns results that reached a final
        state (posted, replaced or dropped). A file that still fails is kept (what was delivered
        is cut from it) and retried later with backoff; the others go on. 0 at once when another
        replay is running in this process."""
        if not self._replay_lock.acquire(blocking=False):
            return 0
        try:
            if not self._temporaries_checked:
                self._temporaries_checked = True
                removed = self.spool.remove_stale_temporaries()
                if removed:
                    log.warning("removed %d leftover temporary spool files (an interrupted write)", removed)
            files = self.spool.files()
            with self._lock:
                names = {path.name for path in files}
                self._retry = {name: due for name, due in self._retry.items() if name in names}
            replayed = 0
            for path in files:
                if self._closing.is_set() or self._replay_stopped.is_set():
                    break
                if path.name in self._stuck or not self._due(path.name):
                    continue
                try:
                    replayed += self._replay_file(path)
                except OSError as error:  # a read-only or foreign file: not a reason to stop the worker
                    self._stuck.add(path.name)
                    with self._lock:
                        self._retry.pop(path.name, None)
                    log.error("spool file %s cannot be opened or removed (%s): left in place for this run; the "
                              "next start posts it again (a duplicate result is harmless)", path, error)
        finally:
            self._replay_lock.release()
        with self._lock:
            self.counters.replayed_items += replayed
        if self._retry:
            self._ensure_replayer()
        return replayed

    def _replay_file(self, path: Path) -> int:
        with self.spool.claim(path) as claimed:
            if not claimed:
                return 0
            try:
                job_id, items = Spool.read(path)
            except FileNotFoundError:
                return 0
            except SpoolCorrupt as error:
                self._quarantine(path, error)
                return 0
            if job_id in self.rejected_jobs:
                return 0
            held = self._deliver(job_id, items)
            if held is None:
                self.spool.remove(path)
                with self._lock:
                    self._retry.pop(path.name, None)
                self.spool.clear_rejection(job_id)
                if job_id not in self._gone:  # else the 404's own line said it
                    log.info("replayed %d spooled results for job %d from %s", len(items), job_id, path.name)
                return len(items)
            if len(held.items) < len(items):
                with contextlib.suppress(OSError):  # else the file stays whole: a harmless duplicate later
                    self.spool.write(job_id, held.items, path=path)
            if held.reason != "job_rejects_all":
                delay_s = self._schedule(path.name)
                log.warning("spool replay of %s (job %d, %d results) failed: %s; next try in %.1f s, other "
                            "files go on", path.name, job_id, len(held.items), held.detail[:200], delay_s)
            return len(items) - len(held.items)

    def _quarantine(self, path: Path, error: SpoolCorrupt) -> None:
        with self._lock:
            self.counters.corrupt_spool_files += 1
            self._retry.pop(path.name, None)
        try:
            target = self.spool.quarantine(path)
        except OSError as move_error:
            log.error("spool file %s is unreadable (%s) and could not be moved aside (%s)", path, error, move_error)
            return
        log.error("spool file %s is unreadable (%s); moved to %s", path.name, error, target)

    def _due(self, name: str) -> bool:
        with self._lock:
            entry = self._retry.get(name)
        return entry is None or self._clock() >= entry[1]

    def _schedule(self, name: str, failures: Optional[int] = None) -> float:
        """Set the next try of spool file ``name``; returns the delay in seconds."""
        with self._lock:
            count = failures if failures is not None else self._retry.get(name, (0, 0.0))[0] + 1
            delay_s = max(self.replay_backoff_s, backoff_delay_s(
                count, base_s=self.replay_backoff_s, cap_s=self.replay_backoff_cap_s))
            self._retry[name] = (count, self._clock() + delay_s)
        return delay_s

    def _ensure_replayer(self) -> None:
        with self._lock:
            if (self._closing.is_set() or self._replay_stopped.is_set()
                    or (self._replayer is not None and self._replayer.is_alive())):
                return
            self._replayer = threading.Thread(target=self._replay_loop, name="spool-replay", daemon=True)
            self._replayer.start()

    def _replay_loop(self) -> None:
        """Replay due files until none is scheduled (the spool is empty, or holds only files of jobs
        whose results the server rejects), the poster closes or a drain stops the replay."""
        while not self._closing.is_set() and not self._replay_stopped.is_set():
            with self._lock:
                next_due_s = min((due for _, due in self._retry.values()), default=None)
            if next_due_s is None:
                return
            if self._closing.wait(max(0.05, next_due_s - self._clock())):
                return
            try:
                self.replay_spool()
            except Exception:  # the thread must outlive one bad replay
                log.exception("spool replay failed")


def _merge(held: Sequence[Optional[Held]]) -> Optional[Held]:
    parts = [h for h in held if h is not None]
    if not parts:
        return None
    return Held([item for h in parts for item in h.items], parts[0].reason, parts[0].detail)


def _image_id_of(item: dict) -> Optional[str]:
    result = item.get("result") or {}
    if "image_id" in result:
        return str(result["image_id"])
    images = result.get("source_images") or []
    return str(images[0]["id"]) if images and "id" in images[0] else None
