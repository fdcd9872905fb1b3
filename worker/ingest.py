"""Ingest: a torch DataLoader whose workers reserve tasks, download and decode images.

Built from ONE ``LoaderPlan``. Each loader worker process (or the main process when
``num_workers == 0``) loops: reserve ``tasks_per_reserve`` tasks (read from shared state at each
reserve, so the watchdog can shrink it without a restart), download up to ``download_threads`` at
a time, wait for credit, decode to uint8 CHW (float conversion happens on the inference device)
and yield one ``LoadedImage`` per task, taking downloads in the order they finish, not the order
they started (``TaskStream._next_download``); batches reach the main process in the order they
are ready, whichever worker filled them (``in_order=False``), so one slow download holds up its
own image only. The next reservation is made, on a thread of its own, once the current one's last
download is under way, so reserving never drains the lane's downloads nor stops the decoder
(``TaskStream._stream``). Downloads and reservations run on the lane's reused daemon threads
(``worker.threads``).
A failed download or decode yields an item with ``error`` set: it never fails the batch.

Credit: a worker decodes its next image only while fewer than ``prefetch_depth x batch_size`` of
its decoded images (the batch being filled included) have not reached the main process; that
bounds decoded images in flight below the DataLoader's own prefetch and is the knob the watchdog
shrinks. Downloads ahead are bounded by ``min(download_threads, tasks_per_reserve)``. Workers are
forked from a fork server with torch preloaded (``start_fork_server``), never from the main
process (a forked copy of a process holding a model and CUDA state is unsafe), and torn down
explicitly at job end.
"""
from __future__ import annotations

import gc
import logging
import mmap
import multiprocessing
import multiprocessing.forkserver
import os
import select
import shutil
import signal
import tempfile
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_futures
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from autotune.plan import LoaderPlan
from worker.antenna import AntennaClient, AntennaError, AntennaRejected
from worker.imaging import fix_mmap_threshold, image_session
from worker.loading import Fetched, ImageLoader, LoadedImage, failed, loaded
from worker.logs import LogSetup, apply_setup, current_setup
from worker.schema import Task
from worker.stops import process_exists
from worker.threads import DaemonThreads

log = logging.getLogger(__name__)

MAX_LOADER_WORKERS = 64
WAIT_POLL_S = 0.02
STOP_POLL_S = 0.1  # how often a wait for a download or a deadline looks at the stop flags
# A loader worker told to stop (abandon, close, a passed deadline) that is still running this long
# afterwards is inside a call that ignores the flags (a reserve against a stalled API): it is killed.
LOADER_EXIT_GRACE_S = 2.0
DEADLINE_SLACK_S = 1.0  # a download's own deadline check comes first; the loader's wait gives up this much later

# control.stop values: RUN reserves; DRAIN reserves no more but finishes what it holds;
# ABANDON yields nothing more (held, unloaded tasks are stranded and then released).
RUN, DRAIN, ABANDON = 0, 1, 2
RESERVED = object()  # TaskStream._next_download: the reservation in flight was answered first


@dataclass(frozen=True)
class IngestSource:
    """What a loader worker needs to reach the API and the images (picklable)."""

    base_url: str
    token: str
    job_id: int
    api_timeout_s: float = 30.0
    api_max_attempts: int = 6
    image_timeout_s: float = 60.0  # connect and each read
    image_deadline_s: float = 120.0  # the whole download (AMI_IMAGE_DOWNLOAD_DEADLINE_S)
    block_private_hosts: bool = False  # AMI_BLOCK_PRIVATE_IMAGE_HOSTS
    max_image_bytes: int = 100_000_000
    max_image_pixels: int = 80_000_000
    client_info: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # keep the token out of any repr that reaches a log
        return f"IngestSource(base_url={self.base_url!r}, job_id={self.job_id})"

    @property
    def images(self) -> ImageLoader:
        """How this job's images are loaded (the one path the probe and ``worker tune`` use too)."""
        return ImageLoader(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           timeout_s=self.image_timeout_s, deadline_s=self.image_deadline_s,
                           block_private_hosts=self.block_private_hosts)


@dataclass
class Batch:
    items: list[LoadedImage]

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin-memory thread (CUDA only)."""
        for item in self.items:
            if item.image is not None:
                shared, item.image = item.image, item.image.pin_memory()
                release_image(shared)  # the pinned copy is what is used from here
        return self

    def release(self) -> None:
        """The consumer is done with the images: drop them, and let loader workers reuse their buffers."""
        for item in self.items:
            release_image(item.image)
            item.image = None

    @property
    def image_bytes(self) -> int:
        return sum(i.image.numel() * i.image.element_size() for i in self.items if i.image is not None)


def collate(items: list[LoadedImage]) -> Batch:
    return Batch(list(items))


class SharedControl:
    """Shared state between the main process and its loader workers (a few shared integers).

    The watchdog writes ``tasks_per_reserve``, ``prefetch_depth`` and ``admit``; ``stop`` ends
    reserving (drain). Workers count images produced, the main process counts images consumed.
    """

    def __init__(self, plan: LoaderPlan, context: Any) -> None:
        self.tasks_per_reserve = context.Value("i", plan.tasks_per_reserve, lock=False)
        self.prefetch_depth = context.Value("i", plan.prefetch_factor, lock=False)
        self.admit = context.Value("b", 1, lock=False)
        self.stop = context.Value("b", 0, lock=False)
        self.produced = context.Array("q", MAX_LOADER_WORKERS + 1, lock=False)
        self.consumed = context.Array("q", MAX_LOADER_WORKERS + 1, lock=False)
        self.reserved_total = context.Value("q", 0)
        self.pids = context.Array("q", MAX_LOADER_WORKERS + 1, lock=False)  # slot 0: unused
        # Reserves on the wire per slot: a worker is not killed while the server may be handing it
        # tasks its ledger has not recorded yet.
        self.reserving = context.Array("i", MAX_LOADER_WORKERS + 1)
        # The HTTP status of a reserve the API refused (a 4xx: 401/403 for the token), 0 if none:
        # the reserving process stops, and only the main process can act on it (exit code, backoff).
        self.reserve_refused_status = context.Value("i", 0, lock=False)
        self.ledger = ReservationLedger()

    def set_limits(self, *, tasks_per_reserve: int, prefetch_depth: int, admit: bool) -> None:
        self.tasks_per_reserve.value = max(1, tasks_per_reserve)
        self.prefetch_depth.value = max(1, prefetch_depth)
        self.admit.value = 1 if admit else 0

    def mark_consumed(self, batch: Batch) -> None:
        for item in batch.items:
            self.consumed[slot_of(item.worker_id)] += 1

    def close(self) -> None:
        self.ledger.remove()


class ReservationLedger:
    """Every task a loader reserved, for the main process to read at any time, exactly.

    The reserving process (a loader worker, or the main process when ``num_workers == 0``) appends
    one JSON line per task to a file of its own as soon as the reserve call returns, before it
    does anything else with the tasks, so a worker killed later has lost nothing it reserved.
    Files rather than a multiprocessing queue: a queue's pipe that is read only at close fills
    after a few hundred tasks, and the writer's exit then waits on it for ever. Picklable: it is
    a directory path (under the temporary directory, removed by ``remove``).
    """

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ami-ledger-")
        self.unwritten: list[Task] = []  # what this process could not write (read back only here)

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "unwritten": []}

    def record(self, tasks: Sequence[Task]) -> None:
        """Append ``tasks``; never raises. Tasks that cannot be written (out of descriptors, disk
        full) are kept in memory, which only this process reads, and logged by id."""
        data = memoryview(b"".join(task.model_dump_json().encode() + b"\n" for task in tasks))
        path = os.path.join(self.directory, f"{os.getpid()}.jsonl")
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                while data:
                    data = data[os.write(descriptor, data):]
            finally:
                os.close(descriptor)
        except OSError as error:
            self.unwritten.extend(tasks)
            log.error("cannot record %d reserved tasks in the ledger (%s); if stranded they are not counted: %s",
                      len(tasks), error, ", ".join(task.id for task in tasks))

    def read(self) -> dict[str, Task]:
        """Every task recorded so far, by reply subject."""
        tasks: dict[str, Task] = {task.reply_subject: task for task in self.unwritten}
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return tasks
        for name in names:
            with open(os.path.join(self.directory, name), "rb") as handle:
                for line in handle:
                    if not line.endswith(b"\n"):
                        break  # its writer was killed mid-line, inside the reserve that returned it
                    task = Task.model_validate_json(line)
                    tasks[task.reply_subject] = task
        return tasks

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class TaskStream(IterableDataset):
    """The IterableDataset each loader worker runs; see the module docstring."""

    def __init__(self, source: IngestSource, plan: LoaderPlan, control: SharedControl) -> None:
        self.source = source
        self.plan = plan
        self.control = control
        self.images = source.images

    def __iter__(self) -> Iterator[LoadedImage]:
        info = get_worker_info()
        worker_id = info.id if info is not None else -1
        fix_mmap_threshold()  # this process decodes: large JPEG bodies and images go back to the OS
        in_worker = info is not None
        client = AntennaClient(
            self.source.base_url, self.source.token,
            timeout_s=self.source.api_timeout_s, max_attempts=self.source.api_max_attempts,
        )
        session = image_session(self.plan.download_threads)
        buffers = None
        if in_worker:
            buffers = SharedImageBuffers(lambda: (self.control.prefetch_depth.value + 1) * self.plan.batch_size)
        bodies = BodyBuffers(self._ahead)
        try:
            yield from self._stream(client, session, worker_id, buffers, bodies, DaemonThreads("lane-io"))
        finally:
            session.close()  # downloads still running (abandoned) fail on their own deadline
            client.close()

    def _ahead(self) -> int:
        """Downloads a lane keeps in flight: also bounded by the live tasks_per_reserve, so a
        shrink cuts the compressed JPEGs held now (24 MB each when large), not only at the next
        reserve."""
        return min(self.plan.download_threads, max(1, self.control.tasks_per_reserve.value))

    def _stream(self, client, session, worker_id: int, buffers: Optional[SharedImageBuffers],
                bodies: "BodyBuffers", threads: DaemonThreads) -> Iterator[LoadedImage]:
        """Reserve, download ``ahead`` at a time, decode, yield; see the module docstring.

        The next reservation is made as soon as the current one's last download is submitted
        (while ``admit`` allows it), on a thread of its own, so its round trip overlaps the
        downloads in flight and the decoder: reserving only once the lane had drained cost it a
        round trip plus a whole download per reservation (1.3 s on a 300 ms, 2 MB/s link), and
        reserving on the decoding thread still stopped the decoder for each round trip (15% of a
        lane's time on a 300 ms link). A lane so holds at most ``tasks_per_reserve`` + ``ahead``
        reserved tasks. An empty reservation (the job has no task left for us, or the reserve
        failed) ends the lane once it has drained. A reservation in flight when the lane ends is
        waited for (``_settle``): its tasks are in the ledger before the process can exit.
        """
        pending: deque[tuple[Task, float, Future]] = deque()
        todo: deque[Task] = deque()
        more = True
        reserving: Optional[Future] = None
        try:
            while True:
                if reserving is not None and (reserving.done() or (not todo and not pending)):
                    tasks = self._settle(reserving)
                    if self.control.stop.value == ABANDON:
                        return  # the reservation is waited for below, not used
                    reserving = None
                    if tasks is not None:  # None: paused since the check (or abandoned); reserve again later
                        more = more and bool(tasks)
                        todo.extend(tasks)
                if not todo and not pending:
                    if not more or self.control.stop.value != RUN:
                        return
                    todo.extend(self._reserve(client) or [])
                    if not todo:
                        return
                ahead = self._ahead()
                while todo and len(pending) < ahead:
                    task = todo.popleft()
                    deadline_s = time.monotonic() + self.source.image_deadline_s + DEADLINE_SLACK_S
                    pending.append((task, deadline_s, threads.submit(self._fetch, session, task, bodies)))
                if (more and not todo and reserving is None and self.control.stop.value == RUN
                        and self.control.admit.value):
                    reserving = threads.submit(partial(self._reserve, wait=False), client)
                    continue
                if buffers is not None:  # in a loader worker process
                    self._wait_for_credit(worker_id)
                if self.control.stop.value == ABANDON:
                    return
                entry = self._next_download(pending, reserving)
                if entry is RESERVED:  # its tasks' downloads start before we wait again
                    continue
                if entry is None:  # abandoned while waiting for a download
                    return
                task, deadline_s, future = entry
                del entry
                item = self._load(task, deadline_s, future, worker_id, buffers, bodies)
                if item is None:  # abandoned while waiting for the download
                    return
                # Drop our references before suspending: a suspended generator frame would
                # otherwise keep the last compressed JPEG (24 MB for a large image) alive.
                del future
                # Counted before the yield: the decoded image is held from now on, while the
                # DataLoader ships it only once its batch is full.
                self.control.produced[slot_of(worker_id)] += 1
                yield item
                del item
        finally:
            if reserving is not None:  # its tasks reach the ledger (stranded, released) before we exit
                self._settle(reserving, until_abandoned=False)

    def _settle(self, reserving: Future, *, until_abandoned: bool = True) -> Optional[list[Task]]:
        """The tasks of a reservation made on its own thread (None: paused, or given up on).

        Waits for it, looking at the stop flag: once the loader is abandoned it gives up (the
        reserve records what it gets in the ledger on its own) unless ``until_abandoned`` is
        False; then it waits up to the API timeout, so a lane's process never exits in the middle
        of a reserve whose tasks the ledger would miss.
        """
        give_up_s = time.monotonic() + self.source.api_timeout_s * max(1, self.source.api_max_attempts) + 1.0
        while time.monotonic() < give_up_s:
            if until_abandoned and self.control.stop.value == ABANDON:
                return None
            try:
                return reserving.result(timeout=STOP_POLL_S)
            except FutureTimeout:
                continue
        return None

    def _reserve(self, client: AntennaClient, *, wait: bool = True) -> Optional[list[Task]]:
        """Reserve up to the live ``tasks_per_reserve``; [] when there is nothing (or the reserve
        failed, or we are stopping). While the watchdog pauses reserving it waits, or with
        ``wait=False`` returns None at once: a lane reserving ahead must not sit on downloaded
        images while memory is at the hard cap."""
        while not self.control.admit.value and self.control.stop.value == RUN:
            if not wait:
                return None
            time.sleep(0.1)  # the watchdog paused reserving: memory is at the hard cap
        if self.control.stop.value != RUN:
            return []
        wanted = max(1, int(self.control.tasks_per_reserve.value))
        info = get_worker_info()
        slot = slot_of(info.id if info is not None else -1)
        with self.control.reserving.get_lock():
            self.control.reserving[slot] += 1
        try:
            try:
                tasks = client.reserve_tasks(self.source.job_id, wanted, self.source.client_info)
            except AntennaError as error:
                log.warning("job %d: reserve failed, this loader worker stops: %s", self.source.job_id, error)
                # The first refusal is kept, unless a later one is the token's (the main process
                # backs off and a burst exits 3 for those).
                if isinstance(error, AntennaRejected) and (error.auth or not self.control.reserve_refused_status.value):
                    self.control.reserve_refused_status.value = error.status
                return []
            if tasks:
                with self.control.reserved_total.get_lock():
                    self.control.reserved_total.value += len(tasks)
                self.control.ledger.record(tasks)
            return tasks
        finally:
            with self.control.reserving.get_lock():
                self.control.reserving[slot] -= 1

    def _wait_for_credit(self, worker_id: int) -> None:
        """Before each image: wait until this worker holds fewer than ``prefetch_depth x batch_size``
        decoded images the main process has not received, the batch being filled included.

        Checked per image (not per batch) so a shrink takes effect at the next image. No deadlock:
        a partial batch is under ``batch_size``, so a worker only waits while it has a full batch
        out, which the main process will receive.
        """
        slot = slot_of(worker_id)
        while self.control.stop.value != ABANDON:
            waiting = self.control.produced[slot] - self.control.consumed[slot]
            if waiting < self.control.prefetch_depth.value * self.plan.batch_size:
                return
            time.sleep(WAIT_POLL_S)

    def _fetch(self, session, task: Task, bodies: "BodyBuffers") -> Fetched:
        return self.images.fetch_task(session, task, body_buffer=bodies.take)

    def _next_download(self, pending: deque, reserving: Optional[Future]) -> object:
        """Take the first of ``pending`` to finish, whatever order they started in; ``RESERVED``
        if the reservation in flight (``reserving``) is answered first; None once the loader is
        abandoned.

        One slow download (a far object store's tail) then holds up only its own image: the
        decoder goes on with the downloads that finished behind it, and the downloads of a
        reservation answered while it waits start at once, not when the slow one ends. A download
        whose deadline passes first is taken as it is, and ``_load`` turns it into an error result.
        """
        while self.control.stop.value != ABANDON:
            for entry in pending:
                if entry[2].done():
                    pending.remove(entry)
                    return entry
            if reserving is not None and reserving.done():
                return RESERVED
            first_due = min(pending, key=lambda entry: entry[1])
            remaining_s = first_due[1] - time.monotonic()
            if remaining_s <= 0:
                pending.remove(first_due)
                return first_due
            waited = [entry[2] for entry in pending] + ([reserving] if reserving is not None else [])
            wait_for_futures(waited, timeout=min(remaining_s, STOP_POLL_S), return_when=FIRST_COMPLETED)
        return None

    def _wait_for_download(self, future: Future, task: Task, deadline_s: float) -> Optional[Fetched]:
        """The download's result; None as soon as the loader is abandoned (the task is stranded).

        The download keeps its own deadline; this one (``time.monotonic()``, a little later) holds
        even where it cannot, such as headers trickling in. The download's thread is left to end.
        """
        while self.control.stop.value != ABANDON:
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                raise self.images.over_deadline(task.image_url)
            try:
                return future.result(timeout=min(remaining_s, STOP_POLL_S))
            except FutureTimeout:
                continue
        return None

    def _load(self, task: Task, deadline_s: float, future: Future, worker_id: int,
              buffers: Optional["SharedImageBuffers"], bodies: "BodyBuffers") -> Optional[LoadedImage]:
        """The task's image or its error; None when the loader is abandoned while it waits.

        Download and decode are ``worker.loading.ImageLoader``'s steps, which map every fault to
        a failure; what is the lane's own is the deadline wait and where the pixels go.
        """
        try:
            fetched = self._wait_for_download(future, task, deadline_s)
            if fetched is None:
                return None
            try:
                decoded = self.images.decode(fetched, allocate=buffers.allocate if buffers is not None else None)
            finally:
                bodies.give(fetched.data)  # decoded or not, the body is read no more
        except Exception as error:  # an ImageError; anything else (a bug) costs one image, not the job
            return failed(task, error, worker_id=worker_id)
        image = decoded.tensor
        if self.plan.tensor_dtype == "float32":  # legacy ADC behaviour, benchmarks only
            image = image.float().div_(255.0)
            if buffers is not None:
                image.share_memory_()
        elif buffers is not None:
            buffers.hold(image)  # from here until the main process calls release_image
        return loaded(task, fetched, decoded, image=image, worker_id=worker_id)


BUFFER_TAG = b"AWIMGBF"  # 7 bytes after the pixels of a reusable buffer; then the held flag
BUFFER_TAG_BYTES = len(BUFFER_TAG) + 1


class SharedImageBuffers:
    """Shared-memory image buffers one loader worker reuses once the main process is done with them.

    A fresh shared-memory segment per image is paid in page faults: allocating and faulting in a
    2048x1536 image's 9 MiB costs about half as much CPU as decoding it
    (docs/benchmarks.md, "Loader and main-process CPU"). So a worker keeps its buffers: each
    carries, after the pixels, a tag and a held flag. The worker sets the flag when it hands the
    image out (``hold``); the main process
    clears it (``release_image``) once the batch's results are computed; the worker then decodes
    the next image of the same size into it. A buffer whose flag stays set (a consumer that never
    releases, a pinned copy) is simply never reused.

    Bounded: at most ``limit()`` buffers (the worker's credit plus the batch the main process is
    working on), re-read at each allocation so a watchdog shrink frees spare buffers at the next
    image. Past the bound the worker forgets its oldest buffers; a held one stays alive in the main
    process until released there, so the worst case is what a fresh segment per image costs.
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._buffers: deque[tuple[torch.UntypedStorage, torch.Tensor]] = deque()  # (storage, tag view)
        self.reused = 0
        self.allocated = 0

    def allocate(self, height: int, width: int) -> torch.Tensor:
        """A shared (height, width, 3) uint8 tensor, free to write (not yet held)."""
        nbytes = height * width * 3
        chosen = None
        for entry in self._buffers:
            storage, tag = entry
            if storage.nbytes() == nbytes + BUFFER_TAG_BYTES and int(tag[-1]) == 0:
                chosen = entry
                break
        if chosen is not None:
            self._buffers.remove(chosen)
            self.reused += 1
        self._trim(max(1, self._limit()) - 1)  # room for the one handed out now
        if chosen is None:
            storage = torch.UntypedStorage._new_shared(nbytes + BUFFER_TAG_BYTES)
            tag = torch.empty(0, dtype=torch.uint8).set_(storage, nbytes, (BUFFER_TAG_BYTES,))
            tag.copy_(torch.frombuffer(bytearray(BUFFER_TAG + b"\0"), dtype=torch.uint8))
            chosen = (storage, tag)
            self.allocated += 1
        self._buffers.append(chosen)
        return torch.empty(0, dtype=torch.uint8).set_(chosen[0], 0, (height, width, 3))

    def hold(self, image: torch.Tensor) -> None:
        """Mark ``image``'s buffer as handed out: not reused until the main process releases it."""
        tag = _buffer_tag(image)
        if tag is not None:
            tag[-1] = 1

    def _trim(self, keep: int) -> None:
        """Keep at most ``keep`` buffers: spare (released) ones go first, then the oldest held ones."""
        for entry in [e for e in self._buffers if int(e[1][-1]) == 0]:
            if len(self._buffers) <= keep:
                return
            self._buffers.remove(entry)
        while len(self._buffers) > keep:
            self._buffers.popleft()

    def __len__(self) -> int:
        return len(self._buffers)


class BodyBuffers:
    """Buffers one lane reuses for the compressed bodies it downloads.

    A body read into a fresh buffer is paid in page faults: a fresh mapping's every page is
    faulted in and zeroed as the socket fills it. With glibc's heap a small body's pages are
    handed back at each free (the lanes fix the mmap threshold, which leaves the trim threshold
    at 128 KiB), so a lane faulted in about a third of each 1.4 MB body, and every page of a
    large one: ~6,000 faults per 23 MB image, some 5% of a lane's CPU on a large-image job
    (docs/benchmarks.md, "Reused body buffers"). A lane takes each body's buffer here
    (``take``, from a download thread, once the body's length is known) and gives it back
    once the body is decoded (``give``).

    Bounded: buffers in use (taken, not given back, still alive) plus spares stay within
    ``limit()``, the lane's downloads ahead, which is what the memory model prices for the
    lane's bodies (``autotune.memory_model``: every connection holding the largest JPEG). A
    body that is never given back (a download that failed or was abandoned) is simply freed
    with its last reference. Each buffer is a private anonymous mapping of the body's length
    plus a quarter (a later, larger body fits); only the pages a body was written to are
    resident. Thread-safe.
    """

    SLACK = 1.25  # capacity per byte of the body a buffer is made for
    GRAIN_BYTES = 64 * 1024

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._spares: list[mmap.mmap] = []
        self._in_use: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # dropped with their last view
        self.reused = 0
        self.allocated = 0

    def take(self, length_bytes: int) -> memoryview:
        """A writable buffer of exactly ``length_bytes``: a spare that holds it, else a new one."""
        with self._lock:
            fitting = [spare for spare in self._spares if len(spare) >= length_bytes]
            if fitting:
                chosen = min(fitting, key=len)
                self._spares.remove(chosen)
                self.reused += 1
            else:
                room = max(1, self._limit()) - 1 - len(self._in_use)
                while self._spares and len(self._spares) > room:  # none fits: make room for a new one
                    self._spares.remove(min(self._spares, key=len))
                capacity = -(-max(1, int(length_bytes * self.SLACK)) // self.GRAIN_BYTES) * self.GRAIN_BYTES
                chosen = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                self.allocated += 1
            self._in_use.add(chosen)
        return memoryview(chosen)[:length_bytes]

    def give(self, body: Any) -> None:
        """``body`` (from ``take``) is no longer read: its buffer may hold the next body.

        The view is released first, so a stray later read of it fails instead of seeing another
        image's bytes; a view something still exports (a numpy array over it) is left alone, and
        so is one already given back."""
        if not isinstance(body, memoryview):
            return
        try:
            buffer = body.obj
        except ValueError:  # released: given back before
            return
        if not isinstance(buffer, mmap.mmap):
            return
        try:
            body.release()
        except BufferError:
            return
        with self._lock:
            if buffer not in self._in_use:
                return
            self._in_use.discard(buffer)
            if len(self._in_use) + len(self._spares) < max(1, self._limit()):
                self._spares.append(buffer)

    def __len__(self) -> int:
        """Buffers held: in use and spare."""
        with self._lock:
            return len(self._in_use) + len(self._spares)


def _buffer_tag(image: torch.Tensor) -> Optional[torch.Tensor]:
    """The tag view of a reusable buffer holding ``image``, or None for any other tensor."""
    if image.dtype != torch.uint8 or image.device.type != "cpu":
        return None
    storage = image.untyped_storage()
    if storage.nbytes() != image.numel() + BUFFER_TAG_BYTES or image.storage_offset() != 0:
        return None
    tag = torch.empty(0, dtype=torch.uint8).set_(storage, image.numel(), (BUFFER_TAG_BYTES,))
    if bytes(tag[:-1].tolist()) != BUFFER_TAG:
        return None
    return tag


def release_image(image: Optional[torch.Tensor]) -> None:
    """The main process is done with ``image``: its loader worker may decode into the buffer again.

    A no-op for tensors that are not reusable buffers. Nothing may read ``image`` afterwards.
    """
    if image is not None:
        tag = _buffer_tag(image)
        if tag is not None:
            tag[-1] = 0


class LoaderFailed(RuntimeError):
    """The DataLoader broke (a loader worker process died); the job can go on with a new one."""


def slot_of(worker_id: int) -> int:
    """A loader worker's slot in ``SharedControl``'s per-worker arrays: its id + 1; slot 0 is the
    main process (worker_id -1, num_workers=0)."""
    return worker_id + 1


def init_loader_worker(main_pid: int, log_setup: LogSetup, pids: Any, worker_id: int) -> None:
    """``worker_init_fn`` of every loader worker: note its pid in ``pids[slot_of(worker_id)]`` (the
    Loader kills a worker that outlives its deadline), log as the main process does, ignore stop
    signals, exit with the main process.

    The fork server never configures logging, so without ``log_setup`` a worker's lines would
    reach stderr unformatted and unredacted.

    Loader workers ignore SIGINT/SIGTERM: Ctrl-C in a terminal, systemd's control-group kill or
    supervisor's stopasgroup signal the whole process group, and a loader worker dying there
    would strand what it holds. The main process drains and then shuts them down itself.

    If the main process dies (the OOM killer, SIGKILL), nothing else ends them: torch's own check
    watches the worker's parent, which is the fork server, and the server outlives the main
    process while any worker holds its pipe. So each worker watches the main process and exits
    when it is gone; what it held is redelivered after the reservation timeout, as after any crash.
    """
    pids[slot_of(worker_id)] = os.getpid()
    apply_setup(log_setup)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_gone, args=(main_pid,), name="main-process-watch", daemon=True).start()


def _worker_log_setup(source: IngestSource) -> LogSetup:
    """This process's logging set-up (or its root level, as text, when it has none), with the token."""
    setup = current_setup() or LogSetup(level=logging.getLevelName(logging.getLogger().getEffectiveLevel()))
    return setup.with_secrets(source.token)


def _exit_when_gone(pid: int) -> None:
    try:
        descriptor = os.pidfd_open(pid)  # Linux 5.3+: readable once the process has exited
    except (AttributeError, OSError):
        descriptor = None
    if descriptor is not None:
        select.select([descriptor], [], [])
    else:
        while process_exists(pid):
            time.sleep(1.0)
    os._exit(1)


FORK_SERVER_PRELOAD = ["worker.loader_server"]
_fork_server_started = False
_fork_server_ready_pid: Optional[int] = None


def start_fork_server(*, wait: bool = False) -> None:
    """Start multiprocessing's fork server for loader workers (once per process; idempotent).

    A spawned loader worker is a fresh interpreter that imports torch before its first image:
    about 3 core-s here, per worker, per job. Forked from the server, a worker starts with torch,
    the decoder and requests imported. The server is a clean interpreter of its own (started by
    exec, not forked from this process): it never loads a model, holds no CUDA state and runs no
    threads, so its forks are as safe as spawned workers. It imports ``FORK_SERVER_PRELOAD`` in
    the background (and ignores SIGINT and SIGTERM: see ``worker.loader_server``); ``wait=True``
    returns once it serves forks (a no-op child forked and joined). It exits with this process.
    """
    global _fork_server_started
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORK_SERVER_PRELOAD)
    multiprocessing.forkserver.ensure_running()
    _fork_server_started = True
    if wait:
        wait_for_fork_server()


def wait_for_fork_server() -> None:
    """Return once the fork server (if this process started one) has its imports done.

    A no-op child forked and joined proves it (about 0.1 s); once proven for a server's pid the
    call returns at once, so the probe's baseline costs no fork per job.
    """
    global _fork_server_ready_pid
    if not _fork_server_started:
        return
    pid = _fork_server_pid()
    if pid is not None and pid == _fork_server_ready_pid:
        return
    child = multiprocessing.get_context("forkserver").Process(target=_no_op, name="fork-server-ready")
    child.start()
    child.join()
    _fork_server_ready_pid = _fork_server_pid()


def _fork_server_pid() -> Optional[int]:
    """The running fork server's pid (multiprocessing keeps it privately; None if that changes)."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def retire_refusing_fork_server() -> None:
    """Kill a fork server that refuses connections, so the next loader starts a fresh one.

    A request cut off half-sent (this process ran out of file descriptors while passing its
    pipes) ends the server with EOFError. It then spends seconds, longer on a busy machine,
    tearing down its preloaded torch: not yet a zombie, so ``ensure_running`` keeps it, yet no
    longer listening, so every loader started meanwhile is refused. Its forked loader workers
    belong to their loaders (which track and kill them by pid) and live on without it.
    """
    pid = _fork_server_pid()
    if pid is None:
        return
    log.warning("the loader fork server (pid %d) refuses connections; it is killed and restarts with "
                   "the next loader", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _no_op() -> None:
    pass


@contextmanager
def worker_count_warning_ignored() -> Iterator[None]:
    """torch warns (on construction and on iteration) when workers exceed its suggested count; the
    plan is logged with its reasons already, and download-bound jobs legitimately use more
    workers than cores."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        yield


class Loader:
    """A DataLoader for one job, with explicit teardown. Use as a context manager.

    Holds itself to a deadline whatever the network does: once the deadline given to
    ``stop_reserving`` (or the moment of ``abandon``/``close``) passes, loader workers yield
    nothing more, and one still running ``LOADER_EXIT_GRACE_S`` later is killed (a thread of this
    process watches: ``_watch``). Every task a worker reserved is in its ledger, so what never
    reached this process is counted exactly by ``stranded``.
    """

    def __init__(self, source: IngestSource, plan: LoaderPlan, *, start_method: str = "forkserver") -> None:
        if plan.num_workers > MAX_LOADER_WORKERS:
            raise ValueError(f"num_workers={plan.num_workers} is over {MAX_LOADER_WORKERS}")
        self.plan = plan
        self.source = source
        self._context = multiprocessing.get_context(start_method)
        try:
            self._build(start_method)
        except OSError as error:  # out of file descriptors (EMFILE), memory or processes
            raise LoaderFailed(f"cannot set the loader up: {type(error).__name__}: {error}") from error
        self._iterator: Optional[Iterator[Batch]] = None
        self.received: dict[str, Task] = {}
        self.reserved: dict[str, Task] = {}
        self._closed = False
        # Written by the main thread (possibly inside a signal handler: a plain float store),
        # read by the watch thread.
        self._deadline_s: Optional[float] = None
        self._watcher: Optional[threading.Thread] = None
        self.killed_pids: list[int] = []

    def _build(self, start_method: str) -> None:
        plan, source = self.plan, self.source
        if start_method == "forkserver" and plan.num_workers > 0:
            start_fork_server()
        # No fix_mmap_threshold() here: the process that decodes fixes it (TaskStream.__iter__: the
        # loader workers, or this process when num_workers == 0). In a main process that only
        # infers, a fixed threshold turns every large temporary tensor of the forward pass into a
        # fresh mmap and its page faults: measured 14 of 52 core-s of a small job as system time.
        self.control = SharedControl(plan, self._context)
        self.dataset = TaskStream(source, plan, self.control)
        extra: dict[str, Any] = {}
        if plan.num_workers > 0:
            extra = {"multiprocessing_context": self._context, "prefetch_factor": plan.prefetch_factor,
                     "worker_init_fn": partial(init_loader_worker, os.getpid(), _worker_log_setup(source),
                                               self.control.pids)}
        with worker_count_warning_ignored():
            self.dataloader = DataLoader(
                self.dataset, batch_size=plan.batch_size, num_workers=plan.num_workers,
                collate_fn=collate, pin_memory=plan.pin_memory, in_order=False, **extra,
            )

    def start(self) -> None:
        """Start the loader workers (their first reserve and downloads begin); iterating starts
        them too. Raises ``LoaderFailed``."""
        if self._iterator is not None:
            return
        try:
            with worker_count_warning_ignored():
                self._iterator = iter(self.dataloader)  # starts the loader workers
            self._start_watch()
        except (OSError, EOFError, RuntimeError) as error:  # EMFILE, a failed fork, "can't start new thread"
            self._kill_workers("the loader failed to start")  # those started before the failure
            if isinstance(error, ConnectionRefusedError) and self._context.get_start_method() == "forkserver":
                retire_refusing_fork_server()
            raise LoaderFailed(f"cannot start the loader: {type(error).__name__}: {error}") from error

    def __iter__(self) -> Iterator[Batch]:
        self.start()
        assert self._iterator is not None
        while True:
            failure = None
            try:
                batch = next(self._iterator)
            except StopIteration:
                return
            except Exception as error:
                # A loader worker died (OOM killer, a decoder segfault, killed at the deadline):
                # torch reports it as a RuntimeError, or as EOFError/ConnectionError when a batch it
                # sent can no longer be fetched from it. Either way the loader is done; what it
                # held is stranded.
                failure = f"{type(error).__name__}: {error}"
            if failure is not None:
                # Raised outside the handler, so unchained: the cause's tracebacks hold the
                # DataLoader iterator (its queues' pipes, its workers' handles) for as long as
                # anything keeps the exception, such as a log record's arguments.
                raise LoaderFailed(failure)
            self.control.mark_consumed(batch)
            self.received.update((item.task.reply_subject, item.task) for item in batch.items)
            yield batch
            del batch  # not held while the next batch is awaited: that is one batch of images

    def stop_reserving(self, deadline_s: Optional[float] = None) -> None:
        """Drain: workers finish what they hold and stop; iteration then ends by itself.

        ``deadline_s`` (``time.monotonic()``): when it passes the loader is abandoned, whatever
        its workers are waiting for. Safe to call from a signal handler (stores only).
        """
        self.control.stop.value = max(self.control.stop.value, DRAIN)
        if deadline_s is not None and (self._deadline_s is None or deadline_s < self._deadline_s):
            self._deadline_s = deadline_s

    def abandon(self) -> None:
        """Workers yield nothing more; batches already decoded still arrive and should be used.
        A worker that has not ended ``LOADER_EXIT_GRACE_S`` from now is killed."""
        self.control.stop.value = ABANDON
        now_s = time.monotonic()
        if self._deadline_s is None or now_s < self._deadline_s:
            self._deadline_s = now_s

    def reserve_refused_status(self) -> Optional[int]:
        """The HTTP status (4xx; 401/403: the token) of the first reserve the API refused, if one was."""
        return self.control.reserve_refused_status.value or None

    def stranded(self) -> list[Task]:
        """Tasks a worker reserved that never reached the main process (after a crash or abort).

        Exact after ``close()``; before it, a worker may still be inside a reserve call.
        """
        self._collect_ledger()
        return [task for key, task in self.reserved.items() if key not in self.received]

    def _collect_ledger(self) -> None:
        if self._closed:  # close() read the ledger last, before removing it
            return
        try:
            self.reserved = self.control.ledger.read()
        except OSError as error:  # out of file descriptors: the last read stands
            log.error("job %d: cannot read the reservation ledger (%s); stranded tasks may be undercounted",
                      self.source.job_id, error)

    def _start_watch(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="loader-deadline", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """Abandon at the deadline; kill loader workers still running the grace after it."""
        abandoned = False
        while not self._closed:
            time.sleep(STOP_POLL_S)
            deadline_s = self._deadline_s
            if deadline_s is None or time.monotonic() < deadline_s:
                continue
            if not abandoned and self.control.stop.value != ABANDON:
                log.warning("job %d: loader deadline passed: abandoning what it holds (counted as stranded)",
                            self.source.job_id)
            abandoned = True
            self.control.stop.value = ABANDON
            kill_at_s = deadline_s + LOADER_EXIT_GRACE_S
            now_s = time.monotonic()
            if now_s >= kill_at_s:
                # One in a reserve gets that call's timeout more: its answer may hold tasks the
                # server counts as ours, which only its ledger can tell us about.
                self._kill_workers(f"still running {LOADER_EXIT_GRACE_S:g} s after the loader's deadline",
                                   spare_reserving=now_s < kill_at_s + self.source.api_timeout_s)

    def _kill_workers(self, why: str, *, spare_reserving: bool = False) -> None:
        for slot in range(1, self.plan.num_workers + 1):
            pid = int(self.control.pids[slot])
            if pid <= 0 or pid in self.killed_pids or not process_exists(pid):
                continue
            if spare_reserving and self.control.reserving[slot] > 0:
                continue
            log.warning("job %d: killing loader worker %d (pid %d): %s", self.source.job_id, slot - 1, pid, why)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed_pids.append(pid)

    def close(self) -> None:
        """Stop and join every loader worker process (killing one that hangs), then release shared state."""
        self.abandon()
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            self._start_watch()  # kills a worker that ignores the stop while torch joins it
            if hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
        del iterator
        self._collect_ledger()
        self._closed = True
        if self._watcher is not None:
            self._watcher.join()
        self.control.close()
        # The DataLoader's queues hold POSIX semaphores in /dev/shm; they are freed when
        # collected, and reference cycles inside the DataLoader delay that.
        self.dataloader = None  # type: ignore[assignment]
        gc.collect()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
