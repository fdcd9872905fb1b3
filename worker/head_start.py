"""The head start: tasks reserved while the probe downloads its sample, for the main process to
handle while the loader's lanes make their first reservation and downloads.

A job's start is two download times in a row: the probe's sample, then the lanes' first wave,
each followed by a decode and a result post, with the CPUs waiting on the network in between.
Once the probe's first image declares its size, the head start reserves its tasks and downloads
their images beside the sample's (one connection each), held compressed. With the loader
started, the main process decodes them as they arrive and handles them in batches of the plan's
size; the lanes' first batches wait in their queue meanwhile, within their credit.

Its bounds:

- Tasks: at most what ``ByteBudget`` holds at the first image's size (``HeadStart.count_for``)
  and what the planner allows (``worker.planning.head_start_size``: the main process finishes
  them within a tenth of the reservation timeout).
- Bytes: a body is read only once its declared length fits ``ByteBudget`` (one body always
  fits, so a single image larger than the budget still loads); a decoded image frees its bytes.
  Waiting for the budget does not count against the download's deadline. Bodies and decoded
  images live in anonymous mappings of their own (``anonymous_buffer``).
- Every task ends in a result (an error result where its download or decode failed) unless the
  worker is forced to stop, when the unhandled ones are returned for release (``abandon``).
"""
from __future__ import annotations

import logging
import mmap
import threading
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from typing import Callable, Iterator, Optional, Sequence

import torch

from worker.imaging import ImageError
from worker.ingest import Batch
from worker.loading import Fetched, ImageLoader, LoadedImage, failed, loaded
from worker.schema import Task

log = logging.getLogger(__name__)

MAX_HEAD_START_THREADS = 64
WAIT_POLL_S = 0.1


def anonymous_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of their own anonymous mapping, unmapped when the last reference goes.

    The main process keeps glibc's default allocator (a fixed mmap threshold there turns the
    forward pass's large temporaries into page faults: ``worker.ingest``), whose threshold rises
    after the first large free: the head start's 1-24 MB bodies and decoded images would then
    come from heap arenas (one per thread) and stay resident after they are freed.

    Private, not Python's default shared mapping: shared anonymous pages are shmem, which the
    watchdog's PSS-less-shmem reading leaves out (64 MiB of bodies counted as 0), and which sends
    the benchmarks' meter to the full smaps."""
    return mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def anonymous_image(height: int, width: int) -> torch.Tensor:
    """A uint8 (height, width, 3) tensor over ``anonymous_buffer`` (the tensor keeps it)."""
    return torch.frombuffer(anonymous_buffer(height * width * 3), dtype=torch.uint8).view(height, width, 3)


class ByteBudget:
    """Compressed bytes held at once: ``admit(n)`` waits until ``n`` more fit (or nothing is held),
    ``free(n)`` gives them back. An undeclared length is admitted at once and counted as it is read."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = max(1, int(limit_bytes))
        self.held_bytes = 0
        self.received_bytes = 0
        self._changed = threading.Condition()
        self._closed = False

    def admit(self, declared: Optional[int]) -> None:
        with self._changed:
            if declared is None:
                return
            while not self._closed and self.held_bytes > 0 and self.held_bytes + declared > self.limit_bytes:
                self._changed.wait(WAIT_POLL_S)
            if self._closed:
                raise ImageError("the head start was abandoned before this image's body was read", "other")
            self.held_bytes += declared

    def read(self, size: int) -> None:
        with self._changed:
            self.received_bytes += size

    def held_undeclared(self, size: int) -> None:
        """An undeclared body of ``size`` bytes arrived whole: it is held from now."""
        with self._changed:
            self.held_bytes += size

    def free(self, size: int) -> None:
        with self._changed:
            self.held_bytes = max(0, self.held_bytes - size)
            self._changed.notify_all()

    def close(self) -> None:
        """Every wait in ``admit`` ends (with an error) and none starts."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class HeadStart:
    """Up to ``wanted`` tasks reserved by ``reserve(n)`` once the probe's first image declares its
    size (``begin``), their images fetched on threads of their own, then decoded by ``batches``.

    Reserved then, not with the sample: the count follows the images' size (``byte_budget`` over
    the first one's), so large images get a few, not ``wanted`` of them held by one process."""

    def __init__(self, images: ImageLoader, byte_budget: int, *, wanted: int,
                 reserve: Callable[[int], Sequence[Task]]) -> None:
        self.images = images
        self.budget = ByteBudget(byte_budget)
        self.wanted = max(0, int(wanted))
        self.tasks: list[Task] = []
        self._reserve = reserve
        self._reserving: Optional[threading.Thread] = None
        self._begun = threading.Lock()
        self._futures: dict[Future, Task] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._handed: set[str] = set()  # task ids given out in a batch
        self.settled = False  # closed, or abandoned: nothing more comes out

    def count_for(self, declared: Optional[int]) -> int:
        """Tasks for images of ``declared`` bytes: what the byte budget holds, at most ``wanted``
        (an undeclared size is priced at the image size limit)."""
        size = declared if declared is not None and declared > 0 else self.images.max_bytes
        return min(self.wanted, self.budget.limit_bytes // max(1, size))

    def begin(self, declared: Optional[int]) -> None:
        """Reserve and start fetching, once (later calls do nothing); called from the sample's
        download threads as each response declares its length (``ImageLoader.fetch``'s ``admit``)."""
        if not self._begun.acquire(blocking=False):
            return
        count = self.count_for(declared)
        if count <= 0:
            return
        self._reserving = threading.Thread(target=self._reserve_and_start, args=(count,),
                                           name="head-start-reserve", daemon=True)
        self._reserving.start()

    def _reserve_and_start(self, count: int) -> None:
        try:
            self.tasks = list(self._reserve(count))
        except Exception as error:  # nothing is held: the job goes on without a head start
            log.warning("head start: the reserve of %d tasks failed: %s", count, error)
            return
        self.start()

    def wait_reserved(self) -> None:
        """Until the reserve ``begin`` made has returned (its own timeouts bound it), if any."""
        if self._reserving is not None:
            self._reserving.join()

    def start(self) -> None:
        if self._pool is not None or not self.tasks:
            return
        self._pool = ThreadPoolExecutor(min(len(self.tasks), MAX_HEAD_START_THREADS),
                                        thread_name_prefix="head-start")
        for task in self.tasks:
            self._futures[self._pool.submit(self._fetch, task)] = task

    @property
    def held_bytes(self) -> int:
        return self.budget.held_bytes

    @property
    def received_bytes(self) -> int:
        return self.budget.received_bytes

    def _fetch(self, task: Task) -> Fetched | ImageError:
        declared: list[Optional[int]] = []

        def admit(length: Optional[int]) -> None:
            self.budget.admit(length)
            declared.append(length)

        fetched = self.images.fetch_alone(task.image_url, admit=admit, on_read=self.budget.read,
                                          body_buffer=anonymous_buffer)
        if isinstance(fetched, ImageError):
            if declared and declared[-1] is not None:
                self.budget.free(declared[-1])  # the body was admitted, then failed
            return fetched
        if not declared or declared[-1] is None:  # a local file or an undeclared body: count it now
            self.budget.held_undeclared(len(fetched.data))
        return fetched

    def batches(self, batch_size: int, *, stopped: Callable[[], bool] = lambda: False,
                decoders: int = 1) -> Iterator[Batch]:
        """The images as they arrive, decoded on ``decoders`` threads of this process (the decoder
        releases the GIL), in batches of ``batch_size`` (the last may be short). At most
        ``batch_size - 1 + decoders`` decoded images wait for a batch; none is decoded while the
        caller holds a batch. Stops early once ``stopped()`` is true; ``abandon`` then returns what
        is left."""
        self.wait_reserved()
        fetching = set(self._futures)
        fetched: deque[tuple[Task, Fetched | ImageError]] = deque()
        decoding: set[Future] = set()
        items: list[LoadedImage] = []
        with ThreadPoolExecutor(max(1, decoders), thread_name_prefix="head-start-decode") as pool:
            while (fetching or fetched or decoding) and not stopped():
                while fetched and len(decoding) < max(1, decoders):
                    decoding.add(pool.submit(self._decode, *fetched.popleft()))
                done, _ = wait_for_futures(fetching | decoding, timeout=WAIT_POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    if future in fetching:
                        fetching.discard(future)
                        fetched.append((self._futures[future], future.result()))
                    else:
                        decoding.discard(future)
                        items.append(future.result())
                while len(items) >= batch_size:
                    yield self._hand_out(items[:batch_size])
                    items = items[batch_size:]
        if items and not stopped():
            yield self._hand_out(items)

    def _hand_out(self, items: list[LoadedImage]) -> Batch:
        self._handed.update(item.task.id for item in items)
        return Batch(items)

    def _decode(self, task: Task, fetched: Fetched | ImageError) -> LoadedImage:
        if isinstance(fetched, ImageError):
            return failed(task, fetched)
        try:
            decoded = self.images.decode(fetched, allocate=anonymous_image)
        except ImageError as error:
            return failed(task, error)
        finally:
            self.budget.free(len(fetched.data))
        return loaded(task, fetched, decoded)

    @property
    def done(self) -> bool:
        return len(self._handed) == len(self.tasks)

    def abandon(self) -> list[Task]:
        """Stop: downloads waiting for the budget end, the rest are left to finish on their own;
        returns the tasks no batch carried (for release)."""
        self.wait_reserved()
        self.settled = True
        self.budget.close()
        if self._pool is not None:
            for future in self._futures:
                future.cancel()
            self._pool.shutdown(wait=False)
        return [task for task in self.tasks if task.id not in self._handed]

    def close(self) -> None:
        """After every task was handed out: the threads are done."""
        self.settled = True
        self.budget.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

