"""Weights and labels files of ADC's models: where they come from, where they are kept, and how
they are fetched so that no partial file is ever used.

- URLs are ADC's; ``base_url`` (``AMI_MODELS_BASE_URL``) replaces their common prefix
  ``https://object-arbutus.cloud.computecanada.ca/ami-models`` with a mirror, ``http(s)://`` or
  ``file://``.
- The cache is ``models_dir`` (``AMI_MODELS_DIR``, default ``<AMI_USER_DATA_PATH>/models``), one
  file per URL named by its last path segment. A file ADC already downloaded into its torch-hub
  cache (``<torch.hub.get_dir()>/models/<name>``) is used where it is, so nothing is fetched twice.
- A fetch writes ``.<name>.<pid>.part`` beside the final file, checks its size against
  Content-Length (or the mirror file's size), fsyncs, then renames it into place: a file under its
  final name is always whole. An ``fcntl`` lock per file makes two processes on a host download it
  once; the second waits and finds it there. Connection errors, timeouts, 5xx and short bodies are
  retried with backoff (``worker.backoff``); a 4xx is not.
- What came back must look like the file asked for before it is renamed into place: a page (a
  captive portal or a wrong mirror URL answers 200 with HTML) would otherwise be kept under the
  model's name and never fetched again. A file in the cache that fails the same check (kept by an
  older version) is ``bad``: ``fetch`` replaces it. Files in ADC's hub cache are used as they are.
- An OS error writing into the cache folder is a ``cache_unwritable`` error naming AMI_MODELS_DIR.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional
from urllib.parse import unquote, urlparse

import requests

from worker import __version__
from worker.backoff import backoff_delay_s
from worker.pipelines.catalog import ADC_MODELS_BASE_URL, ModelSpec

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0  # longest silence between two chunks of a download
MAX_ATTEMPTS = 4
UNREACHABLE_MEMORY_S = 60.0  # a host that refused every attempt fails later fetches at once for this long

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOL = b"\x80"  # the first byte of torch's legacy format, a pickle of protocol 2 or later

FileProblem = Literal["download_failed", "bad_labels", "missing", "wrong_content", "cache_unwritable"]
FileOrigin = Literal["cache", "adc_hub", "absent", "bad"]  # bad: in our cache, but not a file of its kind


class ModelFileError(RuntimeError):
    """A weights or labels file that cannot be had or read; ``str()`` is one line with the fix."""

    def __init__(self, problem: FileProblem, message: str) -> None:
        self.problem = problem
        super().__init__(message)


class _RetryableDownload(Exception):
    def __init__(self, message: str, *, connection: bool = False) -> None:
        super().__init__(message)
        self.connection = connection  # no connection at all (name resolution, refused), not a broken body


# host -> (monotonic time, reason): sources that could not be reached at all, so the next file from
# the same host (a start-up checks a dozen) fails at once instead of after its own retries
_UNREACHABLE: dict[str, tuple[float, str]] = {}


def file_name(url: str) -> str:
    return Path(unquote(urlparse(url).path)).name


@dataclass(frozen=True)
class ModelFiles:
    weights: Path
    labels: Optional[Path]


@dataclass(frozen=True)
class ModelStore:
    """Where model files come from (``base_url``) and where they live (``models_dir``, ``hub_dir``)."""

    models_dir: Path
    base_url: str = ADC_MODELS_BASE_URL
    hub_dir: Optional[Path] = None  # ADC's cache: <torch.hub.get_dir()>/models
    max_attempts: int = MAX_ATTEMPTS
    read_timeout_s: float = READ_TIMEOUT_S

    def source_url(self, adc_url: str) -> str:
        """``adc_url`` with ADC's prefix replaced by ``base_url``."""
        if not adc_url.startswith(ADC_MODELS_BASE_URL + "/"):
            return adc_url
        return self.base_url.rstrip("/") + adc_url[len(ADC_MODELS_BASE_URL):]

    def locate(self, adc_url: str) -> tuple[FileOrigin, Path]:
        """Where the file is now (our cache first, then ADC's hub cache), or where it would go."""
        cached = self.models_dir / file_name(adc_url)
        if cached.is_file():
            return ("cache" if content_problem(cached, adc_url) is None else "bad"), cached
        if self.hub_dir is not None and (self.hub_dir / file_name(adc_url)).is_file():
            return "adc_hub", self.hub_dir / file_name(adc_url)
        return "absent", cached

    def fetch(self, adc_url: str) -> Path:
        """The local path of ``adc_url``'s file, downloading it first if no cache has it (or ours has
        a bad one)."""
        origin, path = self.locate(adc_url)
        if origin in ("cache", "adc_hub"):
            return path
        if origin == "bad":
            log.warning("%s is %s; fetching it again", path, content_problem(path, adc_url))
        return self._download_locked(self.source_url(adc_url), path)

    def fetch_model(self, spec: ModelSpec) -> ModelFiles:
        labels = self.fetch(spec.labels_url) if spec.labels_url else None
        return ModelFiles(weights=self.fetch(spec.weights_url), labels=labels)

    def _download_locked(self, url: str, path: Path) -> Path:
        """Every OS error in here is about the cache folder: the source's are turned into
        ``ModelFileError``s where they happen."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(path.with_name(f".{path.name}.lock")):
                return self._download(url, path)
        except OSError as error:
            raise _unwritable(path.parent, error) from None

    def _download(self, url: str, path: Path) -> Path:
        if path.is_file() and content_problem(path, url) is None:  # fetched by another process meanwhile
            log.info("%s was fetched by another process", path.name)
            return path
        for stale in path.parent.glob(f".{path.name}.*.part"):  # left by a process that died
            stale.unlink(missing_ok=True)
        host = urlparse(url).netloc
        noted = _UNREACHABLE.get(host)
        if noted is not None and time.monotonic() - noted[0] < UNREACHABLE_MEMORY_S:
            raise ModelFileError("download_failed", f"cannot fetch {url}: {host} was unreachable "
                                 f"moments ago ({noted[1]}); check AMI_MODELS_BASE_URL, or run "
                                 "`worker models fetch` where there is internet")
        for attempt in range(1, self.max_attempts + 1):
            try:
                size_bytes, seconds = _fetch_once(url, path, self.read_timeout_s)
            except _RetryableDownload as error:
                if attempt == self.max_attempts:
                    if error.connection:
                        _UNREACHABLE[host] = (time.monotonic(), str(error)[:120])
                    raise ModelFileError("download_failed", f"cannot fetch {url}: {error} "
                                         f"(after {attempt} attempts); check AMI_MODELS_BASE_URL") from None
                delay_s = backoff_delay_s(attempt, base_s=1.0, cap_s=30.0)
                log.warning("fetching %s failed (%s); retry in %.1f s, %d attempts left",
                            url, error, delay_s, self.max_attempts - attempt)
                time.sleep(delay_s)
                continue
            log.info("fetched %s (%d bytes in %.1f s) into %s", url, size_bytes, seconds, path)
            return path
        raise AssertionError("unreachable")


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fetch_once(url: str, path: Path, read_timeout_s: float) -> tuple[int, float]:
    """One attempt: into a temporary file, size- and content-checked, then renamed into place."""
    started_s = time.monotonic()
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        if urlparse(url).scheme == "file":
            size_bytes, content_type = _copy_file(Path(unquote(urlparse(url).path)), part), ""
        else:
            size_bytes, content_type = _download_http(url, part, read_timeout_s)
        problem = content_problem(part, url, content_type)
        if problem is not None:  # the same answer comes again: not retried
            raise ModelFileError("wrong_content", f"cannot fetch {url}: what came back is {problem}; "
                                 "check AMI_MODELS_BASE_URL")
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return size_bytes, time.monotonic() - started_s


def _copy_file(source: Path, part: Path) -> int:
    if not source.is_file():
        raise ModelFileError("missing", f"{source} does not exist in the mirror; check AMI_MODELS_BASE_URL")
    try:
        reader = open(source, "rb")
    except OSError as error:  # not the cache's fault: keep it apart from the OS errors of writing
        raise ModelFileError("download_failed", f"cannot read {source} ({error.strerror}); "
                             "check AMI_MODELS_BASE_URL") from None
    with reader, open(part, "wb") as writer:
        expected_bytes = os.fstat(reader.fileno()).st_size
        shutil.copyfileobj(reader, writer, CHUNK_BYTES)
        writer.flush()
        os.fsync(writer.fileno())
    got_bytes = part.stat().st_size
    if got_bytes != expected_bytes:
        raise _RetryableDownload(f"copied {got_bytes} of {expected_bytes} bytes")
    return got_bytes


def _download_http(url: str, part: Path, read_timeout_s: float) -> tuple[int, str]:
    """Bytes received and the Content-Type."""
    got_bytes = 0
    try:
        with requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, read_timeout_s),
                          headers={"User-Agent": f"antenna-worker/{__version__}"}) as response:
            if response.status_code >= 500 or response.status_code in (408, 429):
                raise _RetryableDownload(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise ModelFileError("download_failed", f"cannot fetch {url}: HTTP {response.status_code}; "
                                     "check AMI_MODELS_BASE_URL")
            expected = response.headers.get("Content-Length")
            content_type = response.headers.get("Content-Type", "")
            with open(part, "wb") as writer:
                for chunk in response.iter_content(CHUNK_BYTES):
                    writer.write(chunk)
                    got_bytes += len(chunk)
                writer.flush()
                os.fsync(writer.fileno())
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
        no_connection = isinstance(error, requests.ConnectionError) and not isinstance(
            error, requests.exceptions.ChunkedEncodingError) and got_bytes == 0
        raise _RetryableDownload(f"{type(error).__name__}: {str(error)[:160]}", connection=no_connection) from None
    except requests.RequestException as error:  # an OSError too, but not the cache's
        raise ModelFileError("download_failed", f"cannot fetch {url}: {type(error).__name__}: {str(error)[:160]}; "
                             "check AMI_MODELS_BASE_URL") from None
    if expected is not None and expected.isdigit() and got_bytes != int(expected):
        raise _RetryableDownload(f"received {got_bytes} of {expected} bytes")
    return got_bytes, content_type


def content_problem(path: Path, url: str, content_type: str = "") -> Optional[str]:
    """What ``path`` holds instead of ``url``'s file (``"an HTML page (text/html), not a checkpoint"``),
    or None when it looks right.

    A ``.json`` file is a labels file and must parse as ``read_labels`` needs; anything else is a
    checkpoint, which ``torch.load`` reads only as a zip archive or a legacy pickle, so its first
    bytes tell. ``content_type`` is the server's, where there was one."""
    kind = "labels file" if file_name(url).endswith(".json") else "checkpoint"
    try:
        with open(path, "rb") as reader:
            head = reader.read(64)
            if "text/html" in content_type.lower() or head.lstrip()[:1] == b"<":
                return f"an HTML page ({content_type.split(';')[0].strip() or 'starts with <'}), not a {kind}"
            if kind == "labels file":
                _labels_in_order((head + reader.read()).decode("utf-8"))
    except OSError as error:
        return f"unreadable ({error.strerror})"
    except UnicodeDecodeError:
        return "not a labels file (not UTF-8 text)"
    except json.JSONDecodeError as error:
        return f"not a labels file (not JSON: {error.msg} at line {error.lineno} column {error.colno})"
    except ValueError as error:
        return f"not a labels file ({error})"
    if kind == "checkpoint" and not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOL)):
        return f"not a checkpoint (it starts with {head[:8]!r})"
    return None


def _unwritable(folder: Path, error: OSError) -> ModelFileError:
    in_the_way = isinstance(error, (FileExistsError, NotADirectoryError))
    reason = "a file is in the way of the folder" if in_the_way else error.strerror or type(error).__name__
    return ModelFileError("cache_unwritable", f"AMI_MODELS_DIR={folder} cannot hold the model files ({reason}); "
                          "set it to a folder this user can write")


def read_labels(path: Path) -> tuple[str, ...]:
    """ADC's labels file: a JSON object label -> index, indices exactly 0..N-1 (an index given twice
    keeps its last label, as ADC's inversion does). Labels in index order."""
    try:
        return _labels_in_order(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError("bad_labels", f"{path}: labels file is unreadable ({type(error).__name__}); "
                             "delete it and run `worker models fetch`") from None
    except ValueError as error:
        raise ModelFileError("bad_labels", f"{path}: labels file: {error}") from None


def _labels_in_order(text: str, source: Optional[str] = None) -> tuple[str, ...]:
    """Raises ``ValueError`` (``json.JSONDecodeError`` is one) saying what is wrong; a repeated
    index is logged naming ``source`` (None: a check of a download, which stays quiet)."""
    mapping = json.loads(text)
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError("not a non-empty JSON object label -> index")
    by_index: dict[int, str] = {}
    for label, index in mapping.items():
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"label {label!r} has index {index!r}: indices must be integers")
        # ADC inverts the file to index -> label: the last label of an index wins
        if index in by_index and source is not None:
            log.warning("%s: index %d has labels %r and %r; %r is kept, as ADC does",
                        source, index, by_index[index], label, label)
        by_index[index] = label
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"indices are not exactly 0..{len(by_index) - 1}")
    return tuple(by_index[i] for i in range(len(by_index)))
