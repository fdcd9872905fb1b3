"""Download and decode one image, safely: size caps, decompression-bomb guard, no auth header.

JPEGs decode with simplejpeg (libjpeg-turbo); anything else, or a JPEG simplejpeg refuses, goes
through Pillow. Decoding never applies EXIF rotation: the contract wants boxes in the original
pixel grid. The decoder choice was measured: see docs/benchmarks.md ("JPEG decode").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import http.client
import io
import ipaddress
import logging
import math
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
import simplejpeg
import torch
import urllib3
from PIL import Image
from urllib3.util.retry import Retry

from autotune.memory_model import DOWNLOAD_READ_BYTES
from worker.results import Failure, FailureReason
from worker.sessions import EnvironmentSession

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8"
# At most this much per read (the memory model prices one such read per download in flight).
# A copied read (``_read_copied``) allocates its full size before the socket fills part of it.
# ``benchmarks/download_cost.py``: with copied reads a 1 MB image cost the client 1.70 ms of CPU on
# loopback against 2.95 with 1 MiB ones.
CHUNK_BYTES = DOWNLOAD_READ_BYTES
# Reads straight into the body (``_read_into``) last about this long at the rate seen so far, and
# are never smaller than this: the deadline is checked between reads.
PACED_READ_S = 0.25
MIN_PACED_READ_BYTES = 16 * 1024
ALLOWED_SCHEMES = ("http", "https")
MAX_REDIRECTS = 3  # presigned-URL hosts redirect once or twice; more is a loop or a trap
# Transient failures of an image GET (a reset or refused connection, a 5xx or 429 from a storage
# front end) are retried a few times with a short backoff; the last answer then stands. Only GET:
# nothing else is sent to image hosts. Retry-After is not honoured: the download deadline rules.
IMAGE_RETRY = Retry(total=3, connect=2, read=2, status=3, other=0, redirect=False, backoff_factor=0.25,
                    backoff_max=2.0, status_forcelist=(429, 500, 502, 503, 504), allowed_methods=frozenset({"GET"}),
                    raise_on_status=False, respect_retry_after_header=False)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
_mmap_threshold_fixed = False


def fix_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc serve allocations over ``threshold_bytes`` with mmap, always.

    By default glibc raises its mmap threshold after the first large free (up to 32 MiB), so
    later 24 MB JPEG buffers and 36 MiB decoded images land on the heap, and freed heap is only
    trimmed past twice that: tens of MiB per process stay resident after each large image.
    A fixed threshold returns each large buffer to the OS when it is freed. No-op off glibc.
    """
    global _mmap_threshold_fixed
    if _mmap_threshold_fixed:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _mmap_threshold_fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
    return _mmap_threshold_fixed


class ImageError(Exception):
    """One image cannot be used; the message becomes that image's error result, ``reason`` its
    reason code (``worker.results.FailureReason``)."""

    def __init__(self, message: str, reason: FailureReason) -> None:
        super().__init__(message)
        self.reason: FailureReason = reason

    def failure(self) -> Failure:
        return Failure(self.reason, str(self))


@dataclass(frozen=True)
class DecodedImage:
    tensor: torch.Tensor  # uint8, shape (3, height, width); a view, may be non-contiguous
    width: int
    height: int
    decode_s: float  # wall seconds
    decode_cpu_s: float = 0.0  # the decoding thread's CPU seconds


def download(session: requests.Session, url: str, *, max_bytes: int, timeout_s: float,
             deadline_s: float = math.inf, block_private_hosts: bool = False,
             on_headers: Optional[Callable[[], None]] = None,
             admit: Optional[Callable[[Optional[int]], None]] = None,
             on_read: Optional[Callable[[int], None]] = None,
             body_buffer: Optional[Callable[[int], Any]] = None) -> bytearray | memoryview:
    """GET ``url`` (the session carries no Authorization header) and return at most ``max_bytes``.

    ``timeout_s`` bounds the connect and each read; ``deadline_s`` the whole download (a host
    sending one byte a second passes every read timeout). The body is read as it arrives, so the
    deadline is checked after every read, and no single read waits longer than the deadline.
    Only http(s) URLs are fetched, through at most ``MAX_REDIRECTS`` redirects, each checked
    like the first (``check_image_url``). Transient failures are retried by the session
    (``image_session``). ``on_headers`` is called as each response's headers arrive (a redirect's
    too), before its body is read. ``admit`` is called with the body's declared length (None:
    undeclared) before it is read, and may wait (a byte budget); the deadline counts from its
    return. ``on_read`` is called with the size of each read into the body. ``body_buffer(n)``
    gives the writable buffer a declared body of ``n`` bytes is read into (default a bytearray).
    """
    started_s = time.monotonic()
    wait_s = min(timeout_s, deadline_s)
    try:
        with _get_following_redirects(session, url, wait_s, block_private_hosts, on_headers) as response:
            _check_response(response, url, max_bytes)
            declared = _declared_length(response)
            if admit is not None:
                admit(declared)
                started_s = time.monotonic()
            if declared is None:
                body = _read_unsized(response, url, max_bytes, started_s, deadline_s, on_read)
            else:
                body = _read_sized(response, url, declared, started_s, deadline_s, on_read, body_buffer)
    except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError):  # the last: a read into the body
        if time.monotonic() - started_s >= deadline_s:
            raise over_deadline(url, deadline_s) from None
        raise ImageError(f"download failed: a read took over {timeout_s:g} s for {url}", "timeout") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
        raise ImageError(f"image URL {url!r} is not a valid http(s) URL", "bad_url") from None
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError,
            requests.exceptions.RetryError, http.client.HTTPException, OSError) as error:
        raise ImageError(f"download failed: {type(error).__name__} for {url}", "connection") from None
    if not body:
        raise ImageError(f"download returned an empty body for {url}", "empty")
    return body  # a bytearray: decoders take it as is, and a bytes() copy would double the peak


def _declared_length(response: requests.Response) -> Optional[int]:
    """The body's length as sent (Content-Length) when it arrives as it is sent (no
    Content-Encoding to undo); None otherwise."""
    declared = response.headers.get("Content-Length", "")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    return int(declared) if declared.isdigit() and encoding in ("", "identity") else None


def _read_sized(response: requests.Response, url: str, length: int, started_s: float,
                deadline_s: float, on_read: Optional[Callable[[int], None]] = None,
                body_buffer: Optional[Callable[[int], Any]] = None) -> bytearray | memoryview:
    """The declared ``length`` bytes, in one buffer of that size.

    A growing buffer reallocated and copied the whole body as it grew (half of a download
    thread's interpreter time on a 300 ms, 5 MB/s link, py-spy) and held up to 1.125x of it.
    Where the response is http.client's under urllib3 (always, with the supported versions) the
    socket reads land in the buffer itself (``_read_into``); otherwise each read is copied in.
    A body that ends short of its length is a connection failure (the peer hung up mid-body).
    """
    body = bytearray(length) if body_buffer is None else body_buffer(length)
    plain = getattr(response.raw, "_fp", None)
    if isinstance(plain, http.client.HTTPResponse) and not plain.chunked:
        filled = _read_into(body, plain, url, started_s, deadline_s, on_read)
        if filled == length:
            response.raw.release_conn()  # the body is whole: the connection goes back to the pool
    else:
        filled = _read_copied(body, response, url, started_s, deadline_s, on_read)
    if filled < length:
        raise ImageError(f"download failed: the body ended after {filled} of its {length} bytes for {url}",
                         "connection")
    return body


def _read_into(body: bytearray, plain: http.client.HTTPResponse, url: str, started_s: float,
               deadline_s: float, on_read: Optional[Callable[[int], None]] = None) -> int:
    """Fill ``body`` from ``plain`` with no copy in between; returns the bytes read.

    Each read waits until its whole size has arrived, so its size follows the rate seen so far:
    about ``PACED_READ_S`` of it, from ``MIN_PACED_READ_BYTES`` to ``CHUNK_BYTES``. The deadline is
    then checked every quarter second or so on a steady link; a host that slows down mid-body
    holds the read in progress until its size has come at the new rate (the read timeout still
    bounds each wait for bytes, and the loader's own deadline watch does not wait). ``benchmarks/
    download_cost.py``: a 23 MB image on a 100 ms, 10 MB/s link cost the client 51 ms of CPU with
    the copied reads and 37 ms with these; a 1 MB one on loopback 2.1 and 1.5-1.8.
    """
    filled = 0
    reading_since_s = time.monotonic()
    with memoryview(body) as view:
        while filled < len(body):
            elapsed_s = time.monotonic() - reading_since_s
            paced = filled / elapsed_s * PACED_READ_S if elapsed_s > 0 else 0.0
            want = int(min(CHUNK_BYTES, len(body) - filled, max(MIN_PACED_READ_BYTES, paced)))
            got = plain.readinto(view[filled:filled + want])
            if not got:
                break
            filled += got
            if on_read is not None:
                on_read(got)
            if time.monotonic() - started_s > deadline_s:
                raise over_deadline(url, deadline_s)
    return filled


def _read_copied(body: bytearray, response: requests.Response, url: str, started_s: float,
                 deadline_s: float, on_read: Optional[Callable[[int], None]] = None) -> int:
    """Fill ``body`` with reads of what has arrived, each copied in; returns the bytes read."""
    filled = 0
    while filled < len(body):
        chunk = response.raw.read1(min(CHUNK_BYTES, len(body) - filled), decode_content=True)
        if not chunk:
            break
        body[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
        if on_read is not None:
            on_read(len(chunk))
        del chunk
        if time.monotonic() - started_s > deadline_s:
            raise over_deadline(url, deadline_s)
    return filled


def _read_unsized(response: requests.Response, url: str, max_bytes: int, started_s: float,
                  deadline_s: float, on_read: Optional[Callable[[int], None]] = None) -> bytearray:
    """A body of no declared length (chunked, or compressed on the wire), read to its end."""
    body = bytearray()
    while chunk := response.raw.read1(CHUNK_BYTES, decode_content=True):
        body += chunk
        if on_read is not None:
            on_read(len(chunk))
        del chunk
        if len(body) > max_bytes:
            raise ImageError(f"image exceeds AMI_MAX_IMAGE_BYTES={max_bytes}", "too_large")
        if time.monotonic() - started_s > deadline_s:
            raise over_deadline(url, deadline_s)
    return body


def _get_following_redirects(session: requests.Session, url: str, wait_s: float, block_private_hosts: bool,
                             on_headers: Optional[Callable[[], None]]) -> requests.Response:
    """The streamed response at the end of at most ``MAX_REDIRECTS`` redirects from ``url``."""
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        check_image_url(current, block_private_hosts=block_private_hosts)
        response = session.get(current, stream=True, timeout=(wait_s, wait_s), allow_redirects=False)
        if on_headers is not None:
            on_headers()
        if not response.is_redirect:
            return response
        current = urljoin(current, response.headers["Location"])
        response.close()
    raise ImageError(f"more than {MAX_REDIRECTS} redirects from {url}", "bad_url")


def check_image_url(url: str, *, block_private_hosts: bool = False) -> None:
    """Refuse (``ImageError``, reason ``bad_url``) a URL that is not http(s) with a host, and with
    ``block_private_hosts`` one whose host resolves to a loopback, private, link-local or other
    non-global address (cloud metadata services live there). The check resolves the name itself,
    so a host whose DNS answer changes between this check and the connection is not caught."""
    if not url:
        raise ImageError("the task has no image URL", "bad_url")
    parts = urlsplit(url)
    if parts.scheme not in ALLOWED_SCHEMES or not parts.hostname:
        raise ImageError(f"image URL {url!r} is not an http(s) URL with a host", "bad_url")
    if not block_private_hosts:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError) as error:
        raise ImageError(f"image host {parts.hostname!r} does not resolve: {error}", "connection") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%", 1)[0]).is_global:
            raise ImageError(f"image host {parts.hostname!r} is a non-public address {address} "
                             "(AMI_BLOCK_PRIVATE_IMAGE_HOSTS=true)", "bad_url")


def _check_response(response: requests.Response, url: str, max_bytes: int) -> None:
    if response.status_code != 200:
        raise ImageError(f"download failed: HTTP {response.status_code} for {url}",
                         "not_found" if response.status_code == 404 else "http_error")
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"image is {int(declared)} bytes, over AMI_MAX_IMAGE_BYTES={max_bytes}", "too_large")


def over_deadline(url: str, deadline_s: float) -> ImageError:
    return ImageError(f"download exceeded AMI_IMAGE_DOWNLOAD_DEADLINE_S={deadline_s:g} s for {url}", "timeout")


Allocate = Callable[[int, int], torch.Tensor]  # (height, width) -> uint8 (height, width, 3)


def decode(data: bytes | bytearray | memoryview, *, max_pixels: int, allocate: Optional[Allocate] = None) -> DecodedImage:
    """Decode to a uint8 CHW tensor; refuses images over ``max_pixels`` before allocating them.

    JPEGs decode straight into the tensor ``allocate(height, width)`` returns (inside DataLoader
    worker processes: a shared-memory buffer, so handing it to the main process copies nothing).
    """
    started_s, started_cpu_s = time.perf_counter(), time.thread_time()
    if data[:2] == JPEG_MAGIC:
        hwc = _decode_jpeg(data, max_pixels, allocate or _allocate_private)
    else:
        hwc = torch.from_numpy(_decode_pillow(data, max_pixels))
    height, width = hwc.shape[:2]
    return DecodedImage(hwc.permute(2, 0, 1), width, height, time.perf_counter() - started_s,
                        time.thread_time() - started_cpu_s)


def jpeg_size(data: bytes | bytearray | memoryview) -> Optional[tuple[int, int]]:
    """(height, width) from a JPEG's header; None for anything else or a header simplejpeg refuses."""
    if data[:2] != JPEG_MAGIC:
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"image declares an impossible size {width}x{height}", "too_many_pixels")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over AMI_MAX_IMAGE_PIXELS={max_pixels} "
            "(decompression-bomb guard)", "too_many_pixels",
        )


def _allocate_private(height: int, width: int) -> torch.Tensor:
    return torch.empty((height, width, 3), dtype=torch.uint8)


def _decode_jpeg(data: bytes, max_pixels: int, allocate: Allocate) -> torch.Tensor:
    """simplejpeg into ``allocate``'s buffer; a JPEG it refuses goes through Pillow, ADC's decoder.

    Strict decoding refuses what libjpeg only warns about (stray bytes before a marker, a damaged
    data segment), which Pillow decodes as ADC's worker does; a JPEG that Pillow refuses too
    (truncated, corrupt) fails with simplejpeg's reason. CMYK and YCCK JPEGs go to Pillow at once:
    libjpeg-turbo's conversion to RGB rounds otherwise (most pixels one level off ADC's)."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as error:
        return torch.from_numpy(_pillow_instead(data, max_pixels, ImageError(f"not a decodable JPEG: {error}",
                                                                              "not_an_image")))
    _check_pixels(width, height, max_pixels)
    hwc = allocate(height, width)
    if colorspace in ("CMYK", "YCCK"):
        refused = ImageError(f"not a decodable {colorspace} JPEG", "corrupt")
    else:
        try:
            simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, buffer=hwc.numpy())
            return hwc
        except ValueError as error:
            refused = ImageError(f"corrupt JPEG: {error}", "corrupt")
    pixels = _pillow_instead(data, max_pixels, refused)
    if tuple(pixels.shape) != tuple(hwc.shape):
        return torch.from_numpy(pixels)
    hwc.numpy()[...] = pixels
    return hwc


def _pillow_instead(data: bytes | bytearray | memoryview, max_pixels: int, refused: ImageError) -> np.ndarray:
    """Pillow's RGB pixels of a JPEG simplejpeg refused; ``refused`` where Pillow fails as well."""
    try:
        return _decode_pillow(data, max_pixels)
    except ImageError as error:
        if error.reason == "too_many_pixels":
            raise
        raise refused from None


def _decode_pillow(data: bytes | bytearray | memoryview, max_pixels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image.width, image.height, max_pixels)
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                return _grey_to_rgb8(image)
            return np.array(image.convert("RGB"))  # writable: torch.from_numpy warns on a read-only array
    except ImageError:
        raise
    except Exception as error:  # Pillow raises many types for bad input
        hint = " (looks like an HTML page)" if bytes(data[:4096]).lstrip()[:1] == b"<" else ""
        raise ImageError(f"not a decodable image{hint}: {type(error).__name__}: {error}", "not_an_image") from None


def _grey_to_rgb8(image: Image.Image) -> np.ndarray:
    """16-bit greyscale (modes I;16*, and I holding 16-bit values) to 8-bit RGB by its high byte.

    Pillow's convert("RGB") clips these to 0..255, which turns a 16-bit image all but white.
    Floating-point and wider integer pixels have no agreed scale: they are refused.
    """
    pixels = np.asarray(image)
    if image.mode == "F" or (image.mode == "I" and (pixels.min() < 0 or pixels.max() > 0xFFFF)):
        raise ImageError(f"unsupported pixel format {image.mode} (not 8- or 16-bit)", "not_an_image")
    grey = (pixels.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def image_session(pool_connections: int = 8) -> requests.Session:
    """A session for image hosts: never carries the API token or netrc credentials; GETs are
    retried (``IMAGE_RETRY``); proxies from the environment (``worker.sessions``)."""
    session = EnvironmentSession()
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_connections, pool_maxsize=pool_connections,
                                            max_retries=IMAGE_RETRY)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


