"""A local Antenna-compatible server on loopback: the contract's semantics, real HTTP.

It speaks API v2 pull mode as /work/shared/antenna-protocol.md describes it: find
jobs, reserve tasks (a JetStream-like work queue with a reservation timeout and a
delivery limit), post results (validated all-or-nothing with ``worker.schema``),
register pipelines. Registrations are stored and results saved as Antenna does
(``pipeline_registry``): a result whose save fails is answered 200 but never
acknowledged, so its task is redelivered. Images are served under ``/media`` with no
auth, optionally shaped (latency, bandwidth) or broken on purpose (``image_faults``);
``mount`` serves a directory (a model mirror); API endpoints can be made to answer
error statuses (``set_faults``, ``set_unavailable``).

Tests and the demo use ``LocalAntenna`` in-process; ``worker serve-antenna`` runs it
as a process (``add_server_arguments`` / ``run_server``) and a loopback-only
``/_control`` API lets another process add jobs, inject faults and read reports.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from pydantic import ValidationError

from worker.schema import (
    PipelineResultsError,
    PipelineResultsResponse,
    RegisterPipelines,
    ResultsPost,
    result_kind,
)
from worker.testing.pipeline_registry import PipelineRegistry, RegistrationError
from worker.testing.synthetic import PRESETS, SyntheticImage, default_cache_dir, generate_preset

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v2"
# Endpoints (fault names of ROUTES) the real server grants only to superusers (antenna-protocol.md).
SUPERUSER_ENDPOINTS = frozenset({"tasks", "result"})
# Of those, the endpoints whose body is validated before the permission check (Antenna's view order).
BODY_FIRST_ENDPOINTS = frozenset({"tasks"})
PROJECTS_PAGE_SIZE = 10
MEDIA_PREFIX = "/media"
CONTROL_PREFIX = "/_control"
FAULT_ENDPOINTS = ("jobs", "tasks", "result", "pipelines", "projects", "media")
IMAGE_FAULTS = ("404", "corrupt", "truncated", "empty", "html", "reset", "bomb", "slow", "drip")
DISPATCH_MODES = ("async_api", "sync_api")
SLOW_STALL_S = 5.0
_DRAIN_BEFORE_413_BYTES = 1 << 20
DRIP_INTERVAL_S = 2.0  # "drip": the real body, one byte every DRIP_INTERVAL_S (a stalled link)
BOMB_SIDE_PX = 60000
TASK_QUEUE_DOWN = {"error": "Task queue temporarily unavailable"}
_MEDIA_CHUNK_BYTES = 256 * 1024
_SERVE_POLL_S = 0.05
_TRUTHY = ("1", "true", "True", "yes")
_UNSAVED_REASONS_KEPT = 10


@dataclass(frozen=True)
class ImageSource:
    """An image a job points at by URL (served by anyone, not necessarily this server)."""

    image_id: str
    url: str


@dataclass(frozen=True)
class JobReport:
    """What happened to one job's tasks, computed at the moment of the call.

    Every task is in exactly one state, so
    ``tasks == results_ok + results_error + pending + reserved + awaiting_redelivery + lost``.
    ``results_ok`` and ``results_error`` count SAVED results (acknowledged); a success result whose
    save fails is counted in ``results_unsaved`` and leaves its task unacknowledged.

    - ``pending``: never delivered.
    - ``reserved``: delivered, no result, last reservation not yet expired.
    - ``awaiting_redelivery``: no result, last reservation expired, deliveries left.
    - ``lost``: no result, ``max_deliveries`` deliveries used up AND the last
      reservation expired. The real server drops such a message from the queue and a
      later sweep marks the image failed; here a late result for it is still accepted
      (it then counts as ok/error, no longer lost).
    - ``delivered``: all deliveries; ``redeliveries``: deliveries beyond each task's first.
    - ``duplicates``: results posted for a task that already had one (answered 200).
    - ``results_unsaved``: success results answered 200 whose save failed (unregistered pipeline
      or algorithm key, no single detector, empty or over-long scores, non-integer image id);
      never acknowledged, so the task is redelivered or ends lost. ``unsaved_reasons``: the first
      distinct reasons (up to 10).
    - ``rejected_posts``: result POSTs to this job answered 400 (nothing recorded).
    - ``complete``: every task has an accepted result.
    - ``settled``: every task has a result or is lost; the job is no longer listed by
      ``incomplete_only`` (the real server's sweep would have finished it).
    - ``media_requests_with_auth`` / ``media_bytes_served``: server-wide, not per job.
    """

    job_id: int
    tasks: int
    delivered: int
    redeliveries: int
    results_ok: int
    results_error: int
    duplicates: int
    lost: int
    pending: int
    reserved: int
    complete: bool
    rejected_posts: int
    media_requests_with_auth: int
    media_bytes_served: int
    awaiting_redelivery: int
    settled: bool
    results_unsaved: int = 0
    unsaved_reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ApiError(Exception):
    """An HTTP answer other than success, raised from deep inside a handler."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        super().__init__(status, payload)
        self.status = status
        self.payload = payload


# --------------------------------------------------------------------------- job state


@dataclass
class _Task:
    id: str
    seq: int
    image_id: str
    image_url: str
    delivered_at_s: list[float] = field(default_factory=list)
    result: Optional[str] = None  # "ok" | "error" once a result is accepted

    def state(self, now_s: float, timeout_s: float, max_deliveries: int) -> str:
        if self.result is not None:
            return self.result
        if not self.delivered_at_s:
            return "pending"
        if now_s < self.delivered_at_s[-1] + timeout_s:
            return "reserved"
        return "awaiting_redelivery" if len(self.delivered_at_s) < max_deliveries else "lost"


@dataclass
class _Job:
    id: int
    pipeline_slug: str
    dispatch_mode: str
    tasks: list[_Task]
    by_subject: dict[str, _Task] = field(default_factory=dict)
    consumer_seq: int = 0
    duplicates: int = 0
    rejected_posts: int = 0
    unsaved: int = 0
    unsaved_reasons: list[str] = field(default_factory=list)

    def record_unsaved(self, reason: str) -> None:
        self.unsaved += 1
        if reason not in self.unsaved_reasons and len(self.unsaved_reasons) < _UNSAVED_REASONS_KEPT:
            self.unsaved_reasons.append(reason)


SaveCheck = Callable[[PipelineResultsResponse], Optional[str]]


class _Ledger:
    """All job state behind one lock; reservation expiry is evaluated lazily.

    ``save_check`` answers, for a posted success result, why saving it fails (None: it saves).
    """

    def __init__(self, reservation_timeout_s: float, max_deliveries: int, rng_seed: Optional[int],
                 save_check: SaveCheck = lambda result: None) -> None:
        self.reservation_timeout_s = reservation_timeout_s
        self.save_check = save_check
        self.max_deliveries = max_deliveries
        self.lock = threading.Lock()
        self.jobs: dict[int, _Job] = {}
        self._rng = random.Random(rng_seed)
        self._last_job_id = 0
        self.job_faults = _JobFaults()

    def new_job_id(self) -> int:
        with self.lock:
            self._last_job_id += 1
            return self._last_job_id

    def add(self, job_id: int, pipeline_slug: str, dispatch_mode: str,
            sources: Sequence[tuple[str, str]]) -> None:
        tasks = [_Task(id=f"{job_id}-{seq}", seq=seq, image_id=image_id, image_url=url)
                 for seq, (image_id, url) in enumerate(sources, start=1)]
        with self.lock:
            self.jobs[job_id] = _Job(job_id, pipeline_slug, dispatch_mode, tasks)

    def _states(self, job: _Job) -> list[str]:
        now_s = time.monotonic()
        return [t.state(now_s, self.reservation_timeout_s, self.max_deliveries) for t in job.tasks]

    def _settled(self, job: _Job) -> bool:
        return all(s in ("ok", "error", "lost") for s in self._states(job))

    def job(self, job_id: int) -> _Job:
        job = self.jobs.get(job_id)
        if job is None or job_id in self.job_faults.deleted:
            raise ApiError(404, {"detail": f"No job with id {job_id}."})
        return job

    def list_jobs(self, slugs: Optional[set[str]], incomplete_only: bool,
                  dispatch_mode: Optional[str]) -> list[_Job]:
        with self.lock:
            return [job for job in self.jobs.values()
                    if (slugs is None or job.pipeline_slug in slugs)
                    and (dispatch_mode is None or job.dispatch_mode == dispatch_mode)
                    and job.id not in self.job_faults.deleted
                    and not (incomplete_only and self._settled(job))]

    def pick(self, jobs: list[_Job]) -> list[_Job]:
        with self.lock:
            return [self._rng.choice(jobs)] if jobs else []

    def reserve(self, job_id: int, batch_size: int) -> list[dict[str, str]]:
        with self.lock:
            job = self.job(job_id)
            if job.dispatch_mode != "async_api":
                raise ApiError(400, {"detail": f"Job {job_id} is not an async_api job "
                                               f"(dispatch_mode={job.dispatch_mode})."})
            states = self._states(job)
            available = [t for t, s in zip(job.tasks, states) if s in ("pending", "awaiting_redelivery")]
            chosen = available[:batch_size]
            now_s = time.monotonic()
            return [self._deliver(job, task, now_s, len(available) - i - 1)
                    for i, task in enumerate(chosen)]

    @staticmethod
    def _deliver(job: _Job, task: _Task, now_s: float, pending: int) -> dict[str, str]:
        task.delivered_at_s.append(now_s)
        job.consumer_seq += 1
        # Shaped like a JetStream ack subject:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.<consumer_seq>.<ts_ns>.<pending>
        subject = (f"$JS.ACK.job_{job.id}.job-{job.id}-workers.{len(task.delivered_at_s)}"
                   f".{task.seq}.{job.consumer_seq}.{time.time_ns()}.{pending}")
        job.by_subject[subject] = task
        return {"id": task.id, "image_id": task.image_id, "image_url": task.image_url,
                "reply_subject": subject}

    def post_results(self, job_id: int, body: Any) -> dict[str, Any]:
        with self.lock:
            job = self.job(job_id)
            try:
                self.job_faults.check_results(job.id, body)
                accepted = self._validate(job, body)
            except ApiError:
                job.rejected_posts += 1
                raise
            answers = []
            for subject, task, result in accepted:
                self._save(job, task, result)
                answers.append({"reply_subject": subject, "status": "queued", "task_id": task.id})
            self.job_faults.after_results(job.id, sum(t.result is not None for t in job.tasks))
            return {"status": "accepted", "job_id": job.id, "results_queued": len(answers),
                    "tasks": answers}

    def _save(self, job: _Job, task: _Task, result: Any) -> None:
        """Save one accepted result, or leave its task unacknowledged when the save fails."""
        kind = result_kind(result)
        problem = self.save_check(result) if kind == "ok" else None
        if problem is not None:
            job.record_unsaved(problem)
            logger.warning("job %d: result for image %s not saved, task left unacknowledged: %s",
                           job.id, task.image_id, problem)
        elif task.result is None:
            task.result = kind
        else:
            job.duplicates += 1

    @staticmethod
    def _validate(job: _Job, body: Any) -> list[tuple[str, _Task, Any]]:
        """All-or-nothing: the first bad item rejects the POST, naming its index."""
        try:
            parsed = ResultsPost.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, {"detail": _describe_validation_error(exc)}) from None
        accepted = []
        for index, item in enumerate(parsed.results):
            task = job.by_subject.get(item.reply_subject)
            if task is None:
                raise ApiError(400, {"detail": f"results[{index}]: reply_subject "
                                               f"{item.reply_subject!r} was not issued by job {job.id}."})
            _check_image_ids(index, item.result, task)
            accepted.append((item.reply_subject, task, item.result))
        return accepted

    def report(self, job_id: int, media_with_auth: int, media_bytes: int) -> JobReport:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise KeyError(f"no job {job_id}")
            states = self._states(job)
            delivered = sum(len(t.delivered_at_s) for t in job.tasks)
            count = states.count
            return JobReport(
                job_id=job.id, tasks=len(job.tasks), delivered=delivered,
                redeliveries=sum(max(0, len(t.delivered_at_s) - 1) for t in job.tasks),
                results_ok=count("ok"), results_error=count("error"), duplicates=job.duplicates,
                lost=count("lost"), pending=count("pending"), reserved=count("reserved"),
                complete=all(s in ("ok", "error") for s in states), rejected_posts=job.rejected_posts,
                media_requests_with_auth=media_with_auth, media_bytes_served=media_bytes,
                awaiting_redelivery=count("awaiting_redelivery"),
                settled=all(s in ("ok", "error", "lost") for s in states),
                results_unsaved=job.unsaved, unsaved_reasons=tuple(job.unsaved_reasons),
            )


def _check_image_ids(index: int, result: Any, task: _Task) -> None:
    if isinstance(result, PipelineResultsError):
        # image_id is optional in the contract (a task sent with no image id has none to give).
        if result.image_id is not None and result.image_id != task.image_id:
            raise ApiError(400, {"detail": f"results[{index}]: error image_id {result.image_id!r} "
                                           f"is not the task's image {task.image_id!r}."})
        return
    if not result.source_images or result.source_images[0].id != task.image_id:
        got = result.source_images[0].id if result.source_images else None
        raise ApiError(400, {"detail": f"results[{index}]: source_images[0].id {got!r} "
                                       f"is not the task's image {task.image_id!r}."})
    for d_index, detection in enumerate(result.detections):
        if detection.source_image_id != task.image_id:
            raise ApiError(400, {"detail": f"results[{index}]: detections[{d_index}].source_image_id "
                                           f"{detection.source_image_id!r} is not the task's image "
                                           f"{task.image_id!r}."})


def _describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = list(first.get("loc", ()))
    where = "body"
    if len(loc) >= 2 and loc[0] == "results" and isinstance(loc[1], int):
        where = f"results[{loc[1]}]"
        loc = loc[2:]
    path = ".".join(str(part) for part in loc)
    return f"{where}: {first.get('msg', 'invalid')}" + (f" at {path}" if path else "") + \
        f" ({exc.error_count()} error(s))"


# --------------------------------------------------------------------------- media


@dataclass(frozen=True)
class _MediaEntry:
    path: Optional[Path]  # None: no local bytes (an ImageSource behind a fault)
    fault: Optional[str] = None
    image_id: str = ""


@lru_cache(maxsize=1)
def _fallback_jpeg() -> bytes:
    """A small real JPEG for faults on images whose bytes this server does not have."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(150, 255, size=(240, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@lru_cache(maxsize=1)
def _bomb_jpeg() -> bytes:
    """A valid small JPEG whose frame header claims BOMB_SIDE_PX x BOMB_SIDE_PX."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 200, 200)).save(buffer, format="JPEG", quality=80)
    data = bytearray(buffer.getvalue())
    sof = _find_sof(bytes(data))
    # SOFn payload: length(2) precision(1) height(2) width(2)
    struct.pack_into(">HH", data, sof + 5, BOMB_SIDE_PX, BOMB_SIDE_PX)
    return bytes(data)


def _find_sof(data: bytes) -> int:
    pos = 2
    while pos + 4 <= len(data):
        marker, length = data[pos + 1], struct.unpack_from(">H", data, pos + 2)[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return pos
        pos += 2 + length
    raise ValueError("no SOF marker in JPEG")


def _corrupt_bytes(image_id: str) -> bytes:
    seed = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    noise = random.Random(seed).randbytes(32 * 1024)
    return b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + noise


_HTML_ERROR = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
               b"<body><h1>Bad Gateway</h1><p>The upstream storage did not answer.</p></body></html>")
_S3_NOT_FOUND = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchKey</Code>'
                 b"<Message>The specified key does not exist.</Message></Error>")


class _MediaStore:
    """URL path -> what to serve; counts media bytes and requests carrying auth."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _MediaEntry] = {}
        self._mounts: dict[str, Path] = {}
        self.requests_with_auth = 0
        self.bytes_served = 0

    def register_file(self, path: Path) -> str:
        path = Path(path).resolve()
        dir_key = hashlib.sha1(str(path.parent).encode()).hexdigest()[:12]
        url_path = f"{MEDIA_PREFIX}/{dir_key}/{quote(path.name)}"
        with self._lock:
            self._entries[url_path] = _MediaEntry(path=path)
        return url_path

    def register_fault(self, job_id: int, seq: int, image_id: str, kind: str, path: Optional[Path]) -> str:
        url_path = f"{MEDIA_PREFIX}/faults/{job_id}/{seq}/{quote(image_id, safe='')}.jpg"
        with self._lock:
            self._entries[url_path] = _MediaEntry(path=path, fault=kind, image_id=image_id)
        return url_path

    def mount(self, directory: Path) -> str:
        """Serve every file under ``directory`` at the returned URL path + its relative path."""
        root = Path(directory).resolve()
        url_prefix = f"{MEDIA_PREFIX}/mount-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}"
        with self._lock:
            self._mounts[url_prefix] = root
        return url_prefix

    def lookup(self, url_path: str) -> Optional[_MediaEntry]:
        with self._lock:
            entry = self._entries.get(url_path)
            mounts = list(self._mounts.items())
        if entry is not None:
            return entry
        for url_prefix, root in mounts:
            if url_path.startswith(url_prefix + "/"):
                path = (root / unquote(url_path[len(url_prefix) + 1:])).resolve()
                inside = path.is_relative_to(root) and path.is_file()
                return _MediaEntry(path=path if inside else None)
        return None

    def count(self, *, with_auth: bool = False, sent_bytes: int = 0) -> None:
        with self._lock:
            self.requests_with_auth += int(with_auth)
            self.bytes_served += sent_bytes


# --------------------------------------------------------------------------- conditions


@dataclass(frozen=True)
class _Network:
    latency_s: float = 0.0
    bandwidth_bytes_per_s: Optional[float] = None
    jitter_s: float = 0.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def media_jitter_s(self) -> float:
        """The extra wait of one media request (0 without jitter)."""
        return self.rng.expovariate(1.0 / self.jitter_s) if self.jitter_s > 0 else 0.0


class _Conditions:
    """Injected faults and network shaping, consumed by the request handler."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, deque[int]] = {name: deque() for name in FAULT_ENDPOINTS}
        self._retry_after_s: dict[str, Optional[float]] = {}
        self.network = _Network()
        self.unavailable = False

    def set_faults(self, endpoint: str, statuses: Sequence[int], retry_after_s: Optional[float]) -> None:
        if endpoint not in self._faults:
            raise ValueError(f"unknown fault endpoint {endpoint!r}; choose one of {FAULT_ENDPOINTS}")
        bad = [s for s in statuses if not 100 <= int(s) <= 599]
        if bad:
            raise ValueError(f"not HTTP statuses: {bad}")
        with self._lock:
            self._faults[endpoint] = deque(int(s) for s in statuses)
            self._retry_after_s[endpoint] = retry_after_s

    def next_fault(self, endpoint: str) -> Optional[tuple[int, Optional[float]]]:
        with self._lock:
            queue = self._faults[endpoint]
            if not queue:
                return None
            return queue.popleft(), self._retry_after_s.get(endpoint)


# --------------------------------------------------------------------------- the server


class LocalAntenna:
    """An Antenna API v2 (pull mode) server on loopback, with knobs for faults.

    ``reservation_timeout_s`` and ``max_deliveries`` mirror the real server's NATS
    consumer (ack wait 300 s, 2 deliveries). ``data_dir`` is where ``/_control/jobs``
    generates images (default: ``worker.testing.synthetic.default_cache_dir()``).
    ``max_request_bytes`` makes API POSTs over that size answer 413, like a proxy.
    ``project_count`` projects (ids from ``project_id`` up) are listed 10 per page, as the real
    server pages ``GET /projects/``; jobs belong to the first (0: the token sees no project, and jobs
    belong to a project ``project_id`` it cannot see). ``reader_tokens`` are valid tokens
    of users who are not superusers: like the real server, it answers them 403 on the task and
    result endpoints; on the result endpoint before looking at the body, on the task endpoint once
    the body's ``batch_size`` is valid (Antenna's reserve validates its body before the job's
    permission, so a bad ``batch_size`` is 400 to any token).

    ``proxy_prefix`` (e.g. ``/antenna``) stands for a reverse proxy that serves the API under that
    prefix and strips it: a request under the prefix is served as without it, while the server's
    own links (pages' ``next``, redirects) carry no prefix, as Django's do behind such a proxy
    without SCRIPT_NAME. ``redirect_api_to`` (a URL prefix: another origin, or a path such as
    ``/moved`` with that ``proxy_prefix``) answers every API call made outside ``proxy_prefix`` 301
    to the same path under it, as a site that moved its API, or an http-to-https redirect, does.

    Results are saved as Antenna saves them (``pipeline_registry``): a result for a registered
    pipeline must pass its checks or its task is never acknowledged. ``require_registration``
    decides what happens to a pipeline slug nobody registered: True (as Antenna) its results are
    never saved; False (the default, a shortcut for tests and benchmarks that skip ``worker
    register``) they are saved unchecked.
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, token: str = "local-token",
        reservation_timeout_s: float = 300.0, max_deliveries: int = 2, project_id: int = 1,
        data_dir: Optional[Path] = None, max_request_bytes: Optional[int] = None,
        rng_seed: Optional[int] = None, reader_tokens: Sequence[str] = (), project_count: int = 1,
        require_registration: bool = False, proxy_prefix: str = "", redirect_api_to: Optional[str] = None,
    ) -> None:
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")
        if project_count < 0:
            raise ValueError("project_count must be >= 0")
        self.host = host
        self.port = port
        self.token = token
        self.reader_tokens = frozenset(reader_tokens)
        self.proxy_prefix = proxy_prefix.rstrip("/")
        self.redirect_api_to = redirect_api_to.rstrip("/") if redirect_api_to else None
        self.project_id = project_id
        self.project_ids = list(range(project_id, project_id + project_count))
        self.registered_projects: list[int] = []
        self.require_registration = require_registration
        self.registry = PipelineRegistry()
        self.data_dir = Path(data_dir) if data_dir is not None else default_cache_dir()
        self.max_request_bytes = max_request_bytes
        self.registered: list[dict] = []
        self.result_posts: list[dict] = []
        self.reservations: list[dict] = []
        # When each API call with the service's own token arrived (time.monotonic()): the real
        # server marks a pull-mode service offline after 60 s without one (``longest_silence_s``).
        self.service_calls_s: list[float] = []
        self.job_page_cap: Optional[int] = None  # set_job_page_cap
        self._ledger = _Ledger(reservation_timeout_s, max_deliveries, rng_seed, save_check=self._save_error)
        self._media = _MediaStore()
        self.conditions = _Conditions()
        self.response_faults = _ResponseFaults()
        self.stopping = threading.Event()
        self._server: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    # ---- lifecycle

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.origin + API_PREFIX

    @property
    def media_url(self) -> str:
        return self.origin + MEDIA_PREFIX

    def start(self) -> "LocalAntenna":
        if self._server is not None:
            return self
        self._server = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_SERVE_POLL_S,),
                                        name=f"local-antenna-{self.port}", daemon=True)
        self._thread.start()
        logger.info("local Antenna serving %s (reservation timeout %.1f s, %d deliveries)",
                    self.base_url, self._ledger.reservation_timeout_s, self._ledger.max_deliveries)
        return self

    def stop(self) -> None:
        """Stop serving and cut open keep-alive connections; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        # Set first: stalled and throttled responses wait on it and give up.
        self.stopping.set()
        server.shutdown()
        server.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        logger.info("local Antenna on port %d stopped", self.port)

    def __enter__(self) -> "LocalAntenna":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    # ---- jobs

    def add_job(
        self, images: Sequence[Union[SyntheticImage, ImageSource]], pipeline_slug: str, *,
        image_faults: Optional[Mapping[str, str]] = None, dispatch_mode: str = "async_api",
    ) -> int:
        """Add a job with one task per image; returns the job id.

        ``image_faults`` maps image_id -> one of ``IMAGE_FAULTS``: that image's URL then
        serves the broken body instead (it is still a task and needs an error result).
        """
        faults = dict(image_faults or {})
        _check_job_args(images, faults, dispatch_mode)
        job_id = self._ledger.new_job_id()
        sources = [(image.image_id, self._image_url(job_id, seq, image, faults.get(image.image_id)))
                   for seq, image in enumerate(images, start=1)]
        self._ledger.add(job_id, pipeline_slug, dispatch_mode, sources)
        logger.info("job %d: %d tasks, pipeline %s, %d faulty images", job_id, len(sources),
                    pipeline_slug, len(faults))
        return job_id

    def _image_url(self, job_id: int, seq: int, image: Union[SyntheticImage, ImageSource],
                   fault: Optional[str]) -> str:
        path = image.path if isinstance(image, SyntheticImage) else None
        if fault is not None:
            return self.origin + self._media.register_fault(job_id, seq, image.image_id, fault, path)
        if path is not None:
            return self.origin + self._media.register_file(path)
        return image.url

    def mount(self, directory: Path) -> str:
        """Serve the files under ``directory`` (no auth, like media); returns their base URL.

        A file ``directory/a/b.pt`` is at ``<returned URL>/a/b.pt``: a model mirror for
        ``AMI_MODELS_BASE_URL``.
        """
        return self.origin + self._media.mount(directory)

    def report(self, job_id: int) -> JobReport:
        return self._ledger.report(job_id, self._media.requests_with_auth, self._media.bytes_served)

    def image_urls(self, job_id: int) -> list[str]:
        """The image URL of every task of ``job_id``, in task order (what a plain downloader pulls)."""
        with self._ledger.lock:
            return [task.image_url for task in self._ledger.job(job_id).tasks]

    def job_ids(self) -> list[int]:
        with self._ledger.lock:
            return list(self._ledger.jobs)

    # ---- knobs

    def set_faults(self, endpoint: str, statuses: Sequence[int], *, retry_after_s: Optional[float] = None) -> None:
        """The next ``len(statuses)`` calls to ``endpoint`` answer these statuses, then normal."""
        self.conditions.set_faults(endpoint, statuses, retry_after_s)

    def set_network(self, *, latency_s: float = 0.0, bandwidth_bytes_per_s: Optional[float] = None,
                    jitter_s: float = 0.0, seed: int = 0) -> None:
        """Latency before every request; bandwidth cap per media response (None: none).

        ``jitter_s``: each media request also waits an exponentially distributed extra delay of
        that mean (drawn from ``seed``): most requests are near ``latency_s``, a few wait several
        times the mean, like an object store's tail.
        """
        if latency_s < 0 or jitter_s < 0 or (bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s <= 0):
            raise ValueError("latency_s and jitter_s must be >= 0 and bandwidth_bytes_per_s > 0 or None")
        self.conditions.network = _Network(latency_s, bandwidth_bytes_per_s, jitter_s, random.Random(seed))

    def longest_silence_s(self, since_s: float, until_s: float) -> float:
        """The longest time between ``since_s`` and ``until_s`` (``time.monotonic()``) without an API
        call from the service's token: over 60 s, the real server shows the service offline."""
        marks = [since_s] + sorted(s for s in self.service_calls_s if since_s < s < until_s) + [until_s]
        return max(later - earlier for earlier, later in zip(marks, marks[1:]))

    def set_unavailable(self, unavailable: bool) -> None:
        """While set, every API call answers 503 (media is still served)."""
        self.conditions.unavailable = bool(unavailable)

    # ---- knobs of the reliability faults (see "response and job faults" below)

    def set_response_faults(self, endpoint: str, kinds: Sequence[str]) -> None:
        """The next ``len(kinds)`` calls to ``endpoint`` are done (the ledger changes) and then answered
        broken: ``reset`` (half the body, then a TCP reset), ``malformed`` (truncated JSON),
        ``misshapen`` (valid JSON of the wrong shape) or ``empty`` (the status, no body); or
        answered whole but ``LATE_ANSWER_S`` late (``late``), or as usual (``none``: a call to let
        through before the next fault)."""
        self.response_faults.set(endpoint, kinds)

    def delete_job(self, job_id: int, *, after_results: int = 0) -> None:
        """Delete ``job_id`` now, or once it has ``after_results`` accepted results: every API call
        naming it answers 404 and listing omits it; ``report`` still reads its ledger."""
        self._ledger.job_faults.delete(job_id, after_results)
        if after_results <= 0:
            logger.info("job %d deleted", job_id)

    def reject_all_results(self, job_id: int, detail: Optional[str]) -> None:
        """While ``detail`` is set, every result POST for ``job_id`` answers 400 naming its first
        item with ``detail`` (a systematic rejection, e.g. an unregistered algorithm key)."""
        self._ledger.job_faults.reject(job_id, detail)

    # ---- handler entry points (API)

    def api_list_jobs(self, query: Mapping[str, list[str]]) -> dict[str, Any]:
        slugs = {s for value in query.get("pipeline__slug__in", []) for s in value.split(",") if s} or None
        jobs = self._ledger.list_jobs(slugs, _flag(query, "incomplete_only"),
                                      (query.get("dispatch_mode") or [None])[0])
        limit = _limit(query)
        if _flag(query, "ids_only") and limit is None:
            chosen, next_link, previous_link = self._ledger.pick(jobs), None, None
        else:
            chosen, next_link, previous_link = self._job_page(query, jobs, limit)
        results = [self._job_summary(job, _flag(query, "ids_only")) for job in chosen]
        return {"count": len(jobs), "next": next_link, "previous": previous_link, "results": results}

    def set_job_page_cap(self, cap: Optional[int]) -> None:
        """At most ``cap`` jobs per listing page, whatever ``limit`` asks (Django REST framework's
        ``max_limit``); None: no cap. The rest are behind the page's ``next`` link."""
        if cap is not None and cap < 1:
            raise ValueError("cap must be >= 1 or None")
        self.job_page_cap = cap

    def _job_page(self, query: Mapping[str, list[str]], jobs: list[_Job],
                  limit: Optional[int]) -> tuple[list[_Job], Optional[str], Optional[str]]:
        """Limit-offset paging, as the real server's listing: ``limit`` capped at the page cap,
        ``offset`` from the query, and ``next``/``previous`` as absolute URLs carrying the query."""
        if limit is None and self.job_page_cap is None:
            return jobs, None, None
        size = min(limit if limit is not None else len(jobs), self.job_page_cap or len(jobs) or 1)
        offset = _offset(query)
        chosen = jobs[offset:offset + size]

        def link(start: int) -> str:
            pairs = [(k, v) for k, values in query.items() if k not in ("limit", "offset") for v in values]
            pairs += [("limit", str(size)), ("offset", str(start))]
            return f"{self.base_url}/jobs/?{urlencode(pairs)}"

        next_link = link(offset + size) if offset + size < len(jobs) else None
        previous_link = link(max(0, offset - size)) if offset > 0 else None
        return chosen, next_link, previous_link

    def _job_summary(self, job: _Job, ids_only: bool) -> dict[str, Any]:
        summary: dict[str, Any] = {"id": job.id, "pipeline_slug": job.pipeline_slug}
        if not ids_only:
            summary.update(dispatch_mode=job.dispatch_mode, project_id=self.project_id,
                           tasks=len(job.tasks))
        return summary

    def api_reserve(self, job_id: int, body: Any) -> dict[str, Any]:
        batch_size = _reserve_batch_size(body)
        tasks = self._ledger.reserve(job_id, batch_size)
        with self._ledger.lock:
            self.reservations.append({"job_id": job_id, "batch_size": batch_size,
                                      "client_info": body.get("client_info"),
                                      "task_ids": [t["id"] for t in tasks]})
        return {"tasks": tasks}

    def api_post_results(self, job_id: int, body: Any) -> dict[str, Any]:
        with self._ledger.lock:
            self.result_posts.append(body)
        return self._ledger.post_results(job_id, body)

    def _save_error(self, result: PipelineResultsResponse) -> Optional[str]:
        if not self.require_registration and not self.registry.is_registered(result.pipeline):
            return None
        return self.registry.save_error(result)

    def api_projects(self, query: Mapping[str, list[str]]) -> dict[str, Any]:
        try:
            page = max(1, int((query.get("page") or ["1"])[0]))
        except ValueError:
            raise ApiError(404, {"detail": "Invalid page."}) from None
        first = (page - 1) * PROJECTS_PAGE_SIZE
        chosen = self.project_ids[first:first + PROJECTS_PAGE_SIZE]
        if not chosen and page > 1:
            raise ApiError(404, {"detail": "Invalid page."})

        def link(number: int) -> Optional[str]:
            return f"{self.base_url}/projects/?page={number}" if number >= 1 else None

        more = first + PROJECTS_PAGE_SIZE < len(self.project_ids)
        return {"count": len(self.project_ids), "next": link(page + 1) if more else None,
                "previous": link(page - 1), "results": [{"id": i, "name": f"Local project {i}"} for i in chosen]}

    def api_register(self, project_id: int, body: Any) -> dict[str, Any]:
        if project_id not in self.project_ids:
            raise ApiError(404, {"detail": f"No project with id {project_id}."})
        try:
            parsed = RegisterPipelines.model_validate(body)
        except ValidationError as exc:
            raise ApiError(400, {"detail": _describe_validation_error(exc)}) from None
        with self._ledger.lock:
            self.registered.append(body)
            self.registered_projects.append(project_id)
        try:
            outcome = self.registry.register(project_id, parsed)
        except RegistrationError as exc:
            raise ApiError(400, {"success": False, "error": str(exc), "detail": str(exc)}) from None
        return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "success": True, "error": None,
                "project_id": project_id, "processing_service_name": parsed.processing_service_name,
                "pipelines": [p.slug for p in parsed.pipelines],
                "pipelines_created": list(outcome.pipelines_created),
                "pipelines_updated": list(outcome.pipelines_updated),
                "algorithms_created": list(outcome.algorithms_created)}

    # ---- handler entry points (media, control)

    def media_entry(self, url_path: str) -> Optional[_MediaEntry]:
        return self._media.lookup(url_path)

    def count_media(self, *, with_auth: bool = False, sent_bytes: int = 0) -> None:
        self._media.count(with_auth=with_auth, sent_bytes=sent_bytes)

    def control_add_job(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        images = generate_preset(self.data_dir, str(body.get("preset", "tiny")), int(body.get("count", 1)),
                                 seed=int(body.get("seed", 0)))
        job_id = self.add_job(images, str(body["pipeline_slug"]), image_faults=body.get("image_faults") or {},
                              dispatch_mode=str(body.get("dispatch_mode", "async_api")))
        return {"job_id": job_id, "tasks": len(images)}


def _check_job_args(images: Sequence[Any], faults: Mapping[str, str], dispatch_mode: str) -> None:
    if dispatch_mode not in DISPATCH_MODES:
        raise ValueError(f"dispatch_mode must be one of {DISPATCH_MODES}, got {dispatch_mode!r}")
    unknown_kinds = sorted({k for k in faults.values() if k not in IMAGE_FAULTS})
    if unknown_kinds:
        raise ValueError(f"unknown image faults {unknown_kinds}; choose from {IMAGE_FAULTS}")
    missing = sorted(set(faults) - {image.image_id for image in images})
    if missing:
        raise ValueError(f"image_faults name images not in the job: {missing}")


def _reserve_batch_size(body: Any) -> int:
    """A reserve body's ``batch_size``; ``ApiError`` 400 unless it is an integer >= 1."""
    batch_size = body.get("batch_size") if isinstance(body, dict) else None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ApiError(400, {"detail": f"batch_size must be an integer >= 1, got {batch_size!r}."})
    return batch_size


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return bool(query.get(name)) and query[name][0] in _TRUTHY


def _offset(query: Mapping[str, list[str]]) -> int:
    try:
        return max(0, int((query.get("offset") or ["0"])[0]))
    except ValueError:
        return 0  # Django REST framework reads a bad offset as 0


def _limit(query: Mapping[str, list[str]]) -> Optional[int]:
    if not query.get("limit"):
        return None
    try:
        limit = int(query["limit"][0])
    except ValueError:
        limit = 0
    if limit < 1:
        raise ApiError(400, {"detail": f"limit must be an integer >= 1, got {query['limit'][0]!r}."})
    return limit


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: a burst of lanes connecting while the accept thread
    # waits for the GIL lost its sixth SYN, and the client's retry came 1 s later. Real servers
    # listen with hundreds (nginx 511); the kernel caps this at net.core.somaxconn.
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], handler: type, antenna: LocalAntenna) -> None:
        self.antenna = antenna
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-response is normal here (timeouts, fault tests).
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            logger.debug("connection from %s ended: %r", client_address, exc)
        else:
            logger.exception("error handling a request from %s", client_address)


# --------------------------------------------------------------------------- HTTP handler

_ApiRoute = tuple[str, "re.Pattern[str]", str, Callable[..., Any], int]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "LocalAntenna/1"

    # (method, path regex under /api/v2, fault endpoint, call, success status)
    ROUTES: list[_ApiRoute] = [
        ("GET", re.compile(r"/jobs/"), "jobs",
         lambda a, m, q, b: a.api_list_jobs(q), 200),
        ("POST", re.compile(r"/jobs/(\d+)/tasks/"), "tasks",
         lambda a, m, q, b: a.api_reserve(int(m.group(1)), b), 200),
        ("POST", re.compile(r"/jobs/(\d+)/result/"), "result",
         lambda a, m, q, b: a.api_post_results(int(m.group(1)), b), 200),
        ("GET", re.compile(r"/projects/"), "projects",
         lambda a, m, q, b: a.api_projects(q), 200),
        ("POST", re.compile(r"/projects/(\d+)/pipelines/"), "pipelines",
         lambda a, m, q, b: a.api_register(int(m.group(1)), b), 201),
    ]

    @property
    def antenna(self) -> LocalAntenna:
        return self.server.antenna

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; with Nagle on, delayed ACKs add ~40 ms
        # to every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.antenna.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.antenna.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s " + format, self.client_address[0], *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        prefix = self.antenna.proxy_prefix
        proxied = bool(prefix) and url.path.startswith(prefix + "/")
        if proxied:
            url = url._replace(path=url.path[len(prefix):])
        path = unquote(url.path)
        if path.startswith(CONTROL_PREFIX + "/"):
            self._control(method, path[len(CONTROL_PREFIX):])
            return
        network = self.antenna.conditions.network
        latency_s = network.latency_s
        if path.startswith(MEDIA_PREFIX + "/"):
            latency_s += network.media_jitter_s()
        if latency_s > 0:
            self.antenna.stopping.wait(latency_s)
        if path.startswith(MEDIA_PREFIX + "/") and method == "GET":
            self._media(url.path)
        elif path.startswith(API_PREFIX + "/") and self.antenna.redirect_api_to and not proxied:
            self._drain_body()
            self._send_bytes(301, b"", "text/plain", {"Location": self.antenna.redirect_api_to + self.path})
        elif path.startswith(API_PREFIX + "/"):
            self._api(method, path[len(API_PREFIX):], url.query)
        else:
            self._drain_body()
            self._send_json(404, {"detail": "Not found."})

    # ---- API

    def _api(self, method: str, sub_path: str, query: str) -> None:
        body_bytes = self._read_body()
        if body_bytes is None:
            return
        route, match = self._route(method, sub_path)
        if route is None:
            self._no_route(method, sub_path, query)
            return
        if self._injected_failure(route[2]):
            return
        authorization = self.headers.get("Authorization")
        readers = {f"Token {token}" for token in self.antenna.reader_tokens}
        if authorization != f"Token {self.antenna.token}" and authorization not in readers:
            detail = ("Authentication credentials were not provided." if "Authorization" not in self.headers
                      else "Invalid token.")
            self._send_json(401, {"detail": detail}, {"WWW-Authenticate": "Token"})
            return
        if authorization == f"Token {self.antenna.token}":
            self.antenna.service_calls_s.append(time.monotonic())
        forbidden = authorization in readers and route[2] in SUPERUSER_ENDPOINTS
        if forbidden and route[2] not in BODY_FIRST_ENDPOINTS:
            self._send_forbidden()
            return
        try:
            body = json.loads(body_bytes, parse_constant=_reject_constant) if body_bytes else {}
        except (ValueError, UnicodeDecodeError) as exc:
            self._send_json(400, {"detail": f"JSON parse error - {exc}"})
            return
        try:
            if forbidden:
                _reserve_batch_size(body)  # the one body-first endpoint: a bad batch_size is 400 first
                self._send_forbidden()
                return
            payload = route[3](self.antenna, match, parse_qs(query), body)
        except ApiError as exc:
            self._send_json(exc.status, exc.payload)
            return
        _answer_with_faults(self, route[2], route[4], payload)

    def _send_forbidden(self) -> None:
        self._send_json(403, {"detail": "You do not have permission to perform this action."})

    def _route(self, method: str, sub_path: str) -> tuple[Optional[_ApiRoute], Optional[re.Match[str]]]:
        for route in self.ROUTES:
            match = route[1].fullmatch(sub_path)
            if match and route[0] == method:
                return route, match
        return None, None

    def _no_route(self, method: str, sub_path: str, query: str) -> None:
        # Django's APPEND_SLASH: a GET without the trailing slash is redirected, query kept.
        slashed = sub_path + "/"
        if method == "GET" and any(r[0] == "GET" and r[1].fullmatch(slashed) for r in self.ROUTES):
            location = API_PREFIX + slashed + (f"?{query}" if query else "")
            self._send_bytes(301, b"", "text/plain", {"Location": location})
            return
        known_path = any(r[1].fullmatch(sub_path) or r[1].fullmatch(slashed) for r in self.ROUTES)
        if known_path and not sub_path.endswith("/"):
            self._send_json(404, {"detail": f"Not found: {method} paths end in '/'."})
        elif known_path:
            self._send_json(405, {"detail": f'Method "{method}" not allowed.'})
        else:
            self._send_json(404, {"detail": "Not found."})

    def _injected_failure(self, endpoint: str) -> bool:
        conditions = self.antenna.conditions
        if conditions.unavailable:
            self._send_json(503, {"detail": "Service temporarily unavailable."})
            return True
        fault = conditions.next_fault(endpoint)
        if fault is None:
            return False
        status, retry_after_s = fault
        headers = {}
        if status == 429:
            headers["Retry-After"] = _retry_after_value(retry_after_s)
        payload = TASK_QUEUE_DOWN if (endpoint == "tasks" and status == 503) else \
            {"detail": f"Injected fault: HTTP {status}."}
        self._send_json(status, payload, headers)
        return True

    # ---- media

    def _media(self, raw_path: str) -> None:
        self._drain_body()
        antenna = self.antenna
        antenna.count_media(with_auth="Authorization" in self.headers)
        fault = antenna.conditions.next_fault("media")
        if fault is not None:
            self._send_json(fault[0], {"detail": f"Injected fault: HTTP {fault[0]}."},
                            {"Retry-After": _retry_after_value(fault[1])} if fault[0] == 429 else None)
            return
        entry = antenna.media_entry(raw_path)
        if entry is None:
            self._send_bytes(404, _S3_NOT_FOUND, "application/xml")
        elif entry.fault is not None:
            _serve_fault(self, entry)
        else:
            self._serve_file(entry.path)

    def _serve_file(self, path: Optional[Path]) -> None:
        try:
            size_bytes = path.stat().st_size if path is not None else -1
        except FileNotFoundError:
            size_bytes = -1
        if path is None or size_bytes < 0:
            self._send_bytes(404, _S3_NOT_FOUND, "application/xml")
            return
        self._start_response(200, "image/jpeg", size_bytes)
        with open(path, "rb") as handle:
            self.write_shaped(iter(lambda: handle.read(_MEDIA_CHUNK_BYTES), b""))

    def write_shaped(self, chunks: Any) -> int:
        """Write media chunks under the bandwidth cap; returns bytes written."""
        bandwidth = self.antenna.conditions.network.bandwidth_bytes_per_s
        # Small slices under a cap keep the rate smooth rather than bursty.
        slice_bytes = _MEDIA_CHUNK_BYTES if bandwidth is None else max(1024, min(_MEDIA_CHUNK_BYTES, int(bandwidth / 20)))
        started_s, sent = time.monotonic(), 0
        for chunk in chunks:
            for start in range(0, len(chunk), slice_bytes):
                piece = chunk[start:start + slice_bytes]
                self._write_counted(piece)
                sent += len(piece)
                if bandwidth is not None:
                    ahead_s = started_s + sent / bandwidth - time.monotonic()
                    if ahead_s > 0 and self.antenna.stopping.wait(ahead_s):
                        self.close_connection = True
                        return sent
        return sent

    def _write_counted(self, piece: bytes) -> None:
        # Counted before the write so a client that has the bytes also sees them counted.
        self.antenna.count_media(sent_bytes=len(piece))
        try:
            self.wfile.write(piece)
        except OSError:
            self.antenna.count_media(sent_bytes=-len(piece))
            raise

    # ---- control (loopback only, no auth)

    def _control(self, method: str, sub_path: str) -> None:
        body_bytes = self._read_body()
        if body_bytes is None:
            return
        if self.client_address[0] not in ("127.0.0.1", "::1"):
            self._send_json(403, {"detail": "control API is loopback only"})
            return
        try:
            body = json.loads(body_bytes) if body_bytes else {}
            status, payload = _control_call(self.antenna, method, sub_path, body)
        except (ValueError, KeyError, TypeError) as exc:
            status, payload = 400, {"detail": f"{type(exc).__name__}: {exc}"}
        self._send_json(status, payload)

    # ---- plumbing

    def _read_body(self) -> Optional[bytes]:
        """The request body, or None after answering 413/400 (connection then closes)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        limit = self.antenna.max_request_bytes
        if limit is not None and length > limit:
            # Read (and drop) a body of modest size first, as proxies do: closing on unread bytes
            # makes the kernel reset the connection, and a client still sending then sees the
            # reset instead of the 413 (the 413 test failed that way once in a busy suite run).
            if length <= _DRAIN_BEFORE_413_BYTES:
                self.rfile.read(length)
            self._refuse_too_large(f"Request body of {length} bytes exceeds {limit} bytes.")
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> Optional[bytes]:
        parts, total = [], 0
        limit = self.antenna.max_request_bytes
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            total += size
            if limit is None or total <= limit:
                parts.append(self.rfile.read(size))
            elif total <= _DRAIN_BEFORE_413_BYTES:
                self.rfile.read(size)  # dropped: read on to the end first, as for a sized body
            else:
                break
            self.rfile.readline()
        if limit is not None and total > limit:
            self._refuse_too_large(f"Request body exceeds {limit} bytes.")
            return None
        return b"".join(parts)

    def _refuse_too_large(self, detail: str) -> None:
        """Answer 413 and close: a body not read to its end would poison the connection."""
        self.close_connection = True
        self._send_json(413, {"detail": detail})

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def _start_response(self, status: int, content_type: str, length_bytes: int,
                        headers: Optional[Mapping[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length_bytes))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            # Say so, as proxies do on a 413: a client that is not told may send its next request
            # down this connection before our close reaches it, and lose that request.
            self.send_header("Connection", "close")
        self.end_headers()

    def _send_bytes(self, status: int, data: bytes, content_type: str,
                    headers: Optional[Mapping[str, str]] = None) -> None:
        self._start_response(status, content_type, len(data), headers)
        self.wfile.write(data)

    def _send_json(self, status: int, payload: Any, headers: Optional[Mapping[str, str]] = None) -> None:
        self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)


def _reject_constant(name: str) -> Any:
    """Antenna's parser (Django REST framework, strict JSON) refuses NaN and Infinity."""
    raise ValueError(f"Out of range float values are not JSON compliant: {name!r}")


def _retry_after_value(retry_after_s: Optional[float]) -> str:
    """Whole seconds as HTTP says; a fractional value is sent as a decimal (tests use them)."""
    value = 1.0 if retry_after_s is None else float(retry_after_s)
    return str(int(value)) if value == int(value) else f"{value:g}"


def _serve_fault(handler: _Handler, entry: _MediaEntry) -> None:
    """Answer a media request with the broken body ``entry.fault`` names."""
    kind = entry.fault

    def real() -> bytes:
        return entry.path.read_bytes() if entry.path is not None else _fallback_jpeg()

    if kind == "404":
        handler._send_bytes(404, _S3_NOT_FOUND, "application/xml")
    elif kind == "html":
        handler._send_bytes(200, _HTML_ERROR, "text/html; charset=utf-8")
    elif kind == "empty":
        handler._send_bytes(200, b"", "image/jpeg")
    elif kind in ("corrupt", "truncated", "bomb"):
        data = {"corrupt": lambda: _corrupt_bytes(entry.image_id),
                "truncated": lambda: real()[: len(real()) // 2], "bomb": _bomb_jpeg}[kind]()
        handler._start_response(200, "image/jpeg", len(data))
        handler.write_shaped([data])
    elif kind == "slow":
        data = real()
        handler._start_response(200, "image/jpeg", len(data))
        handler.wfile.flush()
        if handler.antenna.stopping.wait(SLOW_STALL_S):
            handler.close_connection = True
            return
        handler.write_shaped([data])
    elif kind == "reset":
        _reset_mid_body(handler, real())
    elif kind == "drip":
        _drip(handler, real())


def _drip(handler: _Handler, real: bytes) -> None:
    """Headers at once, then one byte every ``DRIP_INTERVAL_S`` until the body is sent, the client
    hangs up or the server stops: every read succeeds, so only a total deadline ends it."""
    handler._start_response(200, "image/jpeg", len(real))
    handler.wfile.flush()
    for offset in range(len(real)):
        if handler.antenna.stopping.wait(DRIP_INTERVAL_S):
            break
        handler._write_counted(real[offset:offset + 1])
        handler.wfile.flush()
    handler.close_connection = True


def _reset_mid_body(handler: _Handler, real: bytes) -> None:
    handler._start_response(200, "image/jpeg", len(real))
    handler._write_counted(real[: max(1, min(len(real) // 2, 64 * 1024))])
    handler.close_connection = True
    # Linger 0 turns the close into a TCP RST, the "connection reset by peer" of the field.
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()


def _control_call(antenna: LocalAntenna, method: str, sub_path: str, body: Any) -> tuple[int, Any]:
    if method == "POST" and sub_path == "/jobs":
        return 200, antenna.control_add_job(body)
    if method == "GET" and sub_path == "/jobs":
        return 200, {"jobs": [antenna.report(job_id).as_dict() for job_id in antenna.job_ids()]}
    match = re.fullmatch(r"/jobs/(\d+)/report", sub_path)
    if method == "GET" and match:
        try:
            return 200, antenna.report(int(match.group(1))).as_dict()
        except KeyError:
            return 404, {"detail": f"No job with id {match.group(1)}."}
    if method == "GET" and sub_path == "/registered":
        return 200, {"registered": antenna.registered, "registry": antenna.registry.snapshot()}
    if method == "POST" and sub_path == "/faults":
        antenna.set_faults(str(body["endpoint"]), [int(s) for s in body.get("statuses", [])],
                           retry_after_s=body.get("retry_after_s"))
        return 200, {"ok": True}
    if method == "POST" and sub_path == "/network":
        antenna.set_network(latency_s=float(body.get("latency_s", 0.0)),
                            bandwidth_bytes_per_s=body.get("bandwidth_bytes_per_s"),
                            jitter_s=float(body.get("jitter_s", 0.0)))
        return 200, {"ok": True}
    if method == "POST" and sub_path == "/unavailable":
        antenna.set_unavailable(bool(body.get("unavailable", True)))
        return 200, {"ok": True}
    return 404, {"detail": "Not found."}


# --------------------------------------------------------------------------- response and job faults
# Faults of the reliability suite (tests/faults): the server does its work, then answers broken; or a
# job disappears or rejects every result. Kept apart from the status faults above.

RESPONSE_FAULTS = ("reset", "malformed", "misshapen", "empty", "late", "none")
LATE_ANSWER_S = 2.0  # "late": the whole answer, this long after the work is done
_MISSHAPEN = {"results": [{"unexpected": True}], "tasks": [{"unexpected": True}], "status": "accepted"}


class _ResponseFaults:
    """Per endpoint, a queue of ways to break the next answers (after the call's work is done)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, deque[str]] = {name: deque() for name in FAULT_ENDPOINTS}

    def set(self, endpoint: str, kinds: Sequence[str]) -> None:
        if endpoint not in self._queues:
            raise ValueError(f"unknown fault endpoint {endpoint!r}; choose one of {FAULT_ENDPOINTS}")
        unknown = sorted({k for k in kinds if k not in RESPONSE_FAULTS})
        if unknown:
            raise ValueError(f"unknown response faults {unknown}; choose from {RESPONSE_FAULTS}")
        with self._lock:
            self._queues[endpoint] = deque(kinds)

    def next(self, endpoint: str) -> Optional[str]:
        with self._lock:
            queue = self._queues[endpoint]
            return queue.popleft() if queue else None


class _JobFaults:
    """Jobs deleted (now or after N results) and jobs whose every result POST is rejected.

    Called with the ledger's lock held."""

    def __init__(self) -> None:
        self.deleted: set[int] = set()
        self._delete_after: dict[int, int] = {}
        self._rejecting: dict[int, str] = {}

    def delete(self, job_id: int, after_results: int) -> None:
        if after_results <= 0:
            self.deleted.add(job_id)
        else:
            self._delete_after[job_id] = after_results

    def reject(self, job_id: int, detail: Optional[str]) -> None:
        if detail is None:
            self._rejecting.pop(job_id, None)
        else:
            self._rejecting[job_id] = detail

    def check_results(self, job_id: int, body: Any) -> None:
        detail = self._rejecting.get(job_id)
        if detail is not None:
            raise ApiError(400, {"detail": f"results[0]: {detail}"})

    def after_results(self, job_id: int, results: int) -> None:
        wanted = self._delete_after.get(job_id)
        if wanted is not None and results >= wanted:
            del self._delete_after[job_id]
            self.deleted.add(job_id)
            logger.info("job %d deleted after %d results", job_id, results)


def _answer_with_faults(handler: _Handler, endpoint: str, status: int, payload: Any) -> None:
    """Send ``payload``, or break the answer as the endpoint's next response fault says."""
    fault = handler.antenna.response_faults.next(endpoint)
    if fault in (None, "none"):
        handler._send_json(status, payload)
        return
    logger.info("response fault %s on %s", fault, endpoint)
    if fault == "late":
        if handler.antenna.stopping.wait(LATE_ANSWER_S):
            handler.close_connection = True
        else:
            handler._send_json(status, payload)
        return
    data = json.dumps(payload).encode()
    if fault == "misshapen":
        handler._send_json(status, _MISSHAPEN)
    elif fault == "empty":
        handler._send_bytes(status, b"", "application/json")
    elif fault == "malformed":
        handler._send_bytes(status, data[: max(1, len(data) // 2)], "application/json")
    else:  # reset: the client has the headers and part of the body, then the connection dies
        handler._start_response(status, "application/json", len(data))
        handler.wfile.write(data[: max(1, len(data) // 2)])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()


# --------------------------------------------------------------------------- CLI


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``worker serve-antenna``."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--token", default="local-token", help="the API token clients must send")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where generated images are cached (default {default_cache_dir()})")
    parser.add_argument("--reservation-timeout-s", type=float, default=300.0)
    parser.add_argument("--max-deliveries", type=int, default=2)
    parser.add_argument("--job", action="append", default=[], metavar="PRESET:COUNT", type=_parse_job_spec,
                        help="add a job of COUNT generated images of PRESET (tiny, small, large); repeatable")
    parser.add_argument("--pipeline", default="synthetic-moths",
                        help="pipeline slug of the jobs added with --job")
    parser.add_argument("--require-registration", action="store_true",
                        help="never save results of a pipeline nobody registered, as Antenna does")
    parser.add_argument("--projects", type=int, default=1, help="how many projects GET /projects/ lists")
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--bandwidth-bytes-per-s", type=float, default=None)
    parser.add_argument("--jitter-s", type=float, default=0.0, help="mean extra delay per media request (exponential)")


def run_server(args: argparse.Namespace) -> int:
    """Start the server with ``args`` from ``add_server_arguments``; block until SIGINT/SIGTERM."""
    jobs = list(args.job)  # (preset, count) pairs: add_server_arguments parsed them
    antenna = LocalAntenna(host=args.host, port=args.port, token=args.token, data_dir=args.data_dir,
                           reservation_timeout_s=args.reservation_timeout_s,
                           max_deliveries=args.max_deliveries, require_registration=args.require_registration,
                           project_count=max(1, args.projects))
    antenna.set_network(latency_s=args.latency_s, bandwidth_bytes_per_s=args.bandwidth_bytes_per_s,
                        jitter_s=args.jitter_s)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()  # the main thread below does the stopping

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        antenna.start()
        for preset, count in jobs:
            images = generate_preset(antenna.data_dir, preset, count)
            job_id = antenna.add_job(images, args.pipeline)
            logger.info("job %d: %d %s images for pipeline %s", job_id, count, preset, args.pipeline)
        # One plain line on stdout so scripts can find the port when --port 0.
        print(f"serving {antenna.base_url} jobs={antenna.job_ids()}", flush=True)
        while not stop.wait(0.5):
            pass
        logger.info("signal received, stopping")
    finally:
        antenna.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _parse_job_spec(spec: str) -> tuple[str, int]:
    preset, _, count = spec.partition(":")
    try:
        count_n = int(count)
    except ValueError:
        count_n = 0
    if count_n < 1 or preset not in PRESETS:
        raise argparse.ArgumentTypeError(f"{spec!r} is not PRESET:COUNT with PRESET one of "
                         f"{sorted(PRESETS)} and COUNT >= 1, e.g. small:20")
    return preset, count_n
