"""One task's image from its URL (or, for ``worker tune --images``, a local file) to a ``LoadedImage``.

The loader lane (``worker.ingest``), the probe (``worker.probing``) and ``worker tune --images``
all load through ``ImageLoader``: the same limits (``AMI_MAX_IMAGE_BYTES``, ``AMI_MAX_IMAGE_PIXELS``,
the read timeout, ``AMI_IMAGE_DOWNLOAD_DEADLINE_S``, ``AMI_BLOCK_PRIVATE_IMAGE_HOSTS``), the same
timings and the same mapping of every fault to a ``Failure``: an ``ImageError`` keeps its reason
code, anything else (a bug in a decoder, a malformed redirect) is reason ``other``.

The steps stay separate because the callers schedule them differently: the lane downloads on
threads of its own under a total deadline and decodes into shared memory; the probe downloads all
its tasks side by side, then decodes them side by side; ``tune`` does one image after another
(``ImageLoader.load``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import requests
import torch

from worker.imaging import Allocate, DecodedImage, ImageError, decode, download, image_session, over_deadline
from worker.results import Failure
from worker.schema import Task

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

URL_PREFIXES = ("http://", "https://")


@dataclass
class LoadedImage:
    """One task's image, or the reason it has none.

    ``download_s`` and ``decode_s`` are wall seconds; ``download_cpu_s`` and ``decode_cpu_s`` the
    CPU seconds of the thread that did each step (what the probe fits its model from: another
    decode on a shared core does not inflate them). ``first_byte_s``: seconds to the first
    response's headers, None for a local file or a failed image.
    """

    task: Task
    image: Optional[torch.Tensor]  # uint8 (3, H, W), or float32 when the plan says so
    error: Optional[Failure] = None
    jpeg_bytes: int = 0
    width: int = 0
    height: int = 0
    download_s: float = 0.0
    decode_s: float = 0.0
    worker_id: int = -1
    first_byte_s: Optional[float] = None
    download_cpu_s: Optional[float] = None
    decode_cpu_s: float = 0.0


@dataclass(frozen=True)
class Fetched:
    """An image's compressed bytes and what fetching them took."""

    source: str  # the URL or path, for messages
    data: bytearray | memoryview  # a memoryview: a lane's reused body buffer, read no more once given back
    download_s: float  # wall, retries and redirects included
    download_cpu_s: Optional[float]  # the fetching thread's CPU; None for a local file
    first_byte_s: Optional[float] = None  # to the first response's headers; None for a local file
    size_bytes: int = field(init=False)  # the body's length, kept when its buffer goes back

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_bytes", len(self.data))


@dataclass(frozen=True)
class ImageLoader:
    """The limits and the steps of loading one image; picklable (loader workers get a copy).

    ``timeout_s`` bounds the connect and each read, ``deadline_s`` the whole download.
    ``local_files``: a source that is not an http(s) URL is read as a path (``worker tune
    --images`` only; a task's URL never is).
    """

    max_bytes: int
    max_pixels: int
    timeout_s: float
    deadline_s: float = math.inf
    block_private_hosts: bool = False
    local_files: bool = False

    @classmethod
    def from_settings(cls, settings: "Settings", *, local_files: bool = False) -> "ImageLoader":
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                   timeout_s=image_timeout_s(settings), deadline_s=settings.image_download_deadline_s,
                   block_private_hosts=settings.block_private_image_hosts, local_files=local_files)

    def fetch(self, session: requests.Session, source: str, *,
              admit: Optional[Callable[[Optional[int]], None]] = None,
              on_read: Optional[Callable[[int], None]] = None,
              body_buffer: Optional[Callable[[int], Any]] = None) -> Fetched:
        """The compressed image at ``source``, timed; raises only ``ImageError``. ``admit``,
        ``on_read`` and ``body_buffer``: see ``worker.imaging.download`` (a local file is read
        without them)."""
        try:
            if self.local_files and not source.startswith(URL_PREFIXES):
                return self._read_file(source)
            return self._download(session, source, admit, on_read, body_buffer)
        except ImageError:
            raise
        except Exception as error:
            raise _unexpected(source, error) from None

    def fetch_task(self, session: requests.Session, task: Task, **options: Any) -> Fetched:
        """``fetch`` of the task's image; a task the server sent malformed fails with its problem."""
        if task.problem is not None:
            raise ImageError(task.problem, "bad_task")
        return self.fetch(session, task.image_url, **options)

    def fetch_alone(self, source: str, **options: Any) -> Fetched | ImageError:
        """``fetch`` on a connection of its own (a session opened and closed here), or why not;
        ``options``: ``fetch``'s."""
        session = image_session(1)
        try:
            return self.fetch(session, source, **options)
        except ImageError as error:
            return error
        finally:
            session.close()

    def decode(self, fetched: Fetched, *, allocate: Optional[Allocate] = None) -> DecodedImage:
        """Decode ``fetched`` (into ``allocate(height, width)`` for a JPEG); raises only ``ImageError``."""
        try:
            return decode(fetched.data, max_pixels=self.max_pixels, allocate=allocate)
        except ImageError:
            raise
        except Exception as error:
            raise _unexpected(fetched.source, error) from None

    def load(self, session: requests.Session, task: Task, *, worker_id: int = -1) -> LoadedImage:
        """Fetch and decode ``task``'s image on this thread; never raises: a fault is an error item."""
        try:
            fetched = self.fetch_task(session, task)
            decoded = self.decode(fetched)
        except ImageError as error:
            return failed(task, error, worker_id=worker_id)
        return loaded(task, fetched, decoded, worker_id=worker_id)

    def over_deadline(self, url: str) -> ImageError:
        """The error of a download still running past ``deadline_s`` (for a caller's own watch)."""
        return over_deadline(url, self.deadline_s)

    def _download(self, session: requests.Session, url: str,
                  admit: Optional[Callable[[Optional[int]], None]] = None,
                  on_read: Optional[Callable[[int], None]] = None,
                  body_buffer: Optional[Callable[[int], Any]] = None) -> Fetched:
        headers_at_s: list[float] = []
        started_s, started_cpu_s = time.perf_counter(), time.thread_time()
        data = download(session, url, max_bytes=self.max_bytes, timeout_s=self.timeout_s,
                        deadline_s=self.deadline_s, block_private_hosts=self.block_private_hosts,
                        on_headers=lambda: headers_at_s.append(time.perf_counter()), admit=admit, on_read=on_read,
                        body_buffer=body_buffer)
        first_byte_s = headers_at_s[0] - started_s if headers_at_s else None
        return Fetched(url, data, time.perf_counter() - started_s, time.thread_time() - started_cpu_s, first_byte_s)

    def _read_file(self, path: str) -> Fetched:
        started_s = time.perf_counter()
        try:
            size_bytes = Path(path).stat().st_size
            if size_bytes > self.max_bytes:
                raise ImageError(f"image is {size_bytes} bytes, over AMI_MAX_IMAGE_BYTES={self.max_bytes}", "too_large")
            data = bytearray(Path(path).read_bytes())
        except OSError as error:
            raise ImageError(f"cannot read {path}: {error.strerror or error}", "other") from None
        if not data:
            raise ImageError(f"{path} is empty", "empty")
        return Fetched(path, data, time.perf_counter() - started_s, None)


def image_timeout_s(settings: "Settings") -> float:
    """Seconds for an image host's connect and each read: twice the API's timeout."""
    return settings.antenna_api_timeout_s * 2


def loaded(task: Task, fetched: Fetched, decoded: DecodedImage, *, image: Optional[torch.Tensor] = None,
           worker_id: int = -1) -> LoadedImage:
    """The item for a loaded image; ``image`` replaces ``decoded.tensor`` (a converted copy)."""
    return LoadedImage(task, decoded.tensor if image is None else image, None, fetched.size_bytes, decoded.width,
                       decoded.height, fetched.download_s, decoded.decode_s, worker_id, fetched.first_byte_s,
                       fetched.download_cpu_s, decoded.decode_cpu_s)


def failure_of(error: BaseException) -> Failure:
    """The one mapping of a fault to a result's failure: an ``ImageError`` keeps its reason."""
    if isinstance(error, ImageError):
        return error.failure()
    return Failure("other", f"{type(error).__name__}: {error}")


def failed(task: Task, error: BaseException, *, worker_id: int = -1) -> LoadedImage:
    """The error item for ``task``."""
    return LoadedImage(task, None, failure_of(error), worker_id=worker_id)


def _unexpected(where: str, error: Exception) -> ImageError:
    """An exception no step maps (a bug, a library's surprise) costs this image alone: logged with
    its traceback, reason ``other``."""
    log.error("image %s failed unexpectedly", where, exc_info=error)
    return ImageError(f"{type(error).__name__}: {error}", "other")
