"""The Antenna API v2 client (pull mode): list jobs, reserve tasks, post results, register pipelines.

Every call has a timeout. Connection errors, 429 (honouring Retry-After) and 5xx are retried with
``backoff_delay_s``; other 4xx raise ``AntennaRejected`` at once. The token lives only in the
session's headers and is never logged.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qsl, urlsplit

import requests

from worker import __version__
from worker.backoff import backoff_delay_s
from worker.schema import Task

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_PAGES = 1000  # a guard against a server whose next link never ends


class AntennaError(Exception):
    """Base for API failures."""


class AntennaUnavailable(AntennaError):
    """The API stayed unreachable (or 5xx/429) through every attempt."""


class AntennaRejected(AntennaError):
    """The API answered a 4xx that retrying cannot fix (400 validation, 401 auth, 404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class JobRef:
    id: int
    pipeline_slug: str


def client_info(pipeline_slugs: Sequence[str] = ()) -> dict[str, Any]:
    """Free-form identity sent with each reserve, shown by the server."""
    return {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "software": "antenna-worker",
        "version": __version__,
        "platform": platform.platform(terse=True),
        "pipelines": list(pipeline_slugs),
    }


class AntennaClient:
    """A thread-safe-enough client: one ``requests.Session`` per instance, per process."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        max_attempts: int = 6,
        backoff_cap_s: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_cap_s = backoff_cap_s
        self._sleep = sleep
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Token {token}"
        self._session.headers["User-Agent"] = f"antenna-worker/{__version__}"
        self.retries_total = 0
        # Called after every attempt with (method, path, status): the HTTP code as text, or
        # "connection" / "timeout". Set by whoever watches the API (the metrics middleware).
        self.on_attempt: Optional[Callable[[str, str, str], None]] = None

    def close(self) -> None:
        self._session.close()

    # --- the contract's calls ---

    def list_jobs(self, pipeline_slugs: Sequence[str], *, limit: Optional[int] = None) -> list[JobRef]:
        """Incomplete pull-mode jobs; without ``limit`` the server hands out ONE at random."""
        params: dict[str, Any] = {
            "pipeline__slug__in": ",".join(pipeline_slugs),
            "ids_only": 1,
            "incomplete_only": 1,
            "dispatch_mode": "async_api",
        }
        if limit is not None:
            params["limit"] = limit
        body = self._call("GET", "/jobs/", params=params)
        return [JobRef(int(row["id"]), str(row.get("pipeline_slug", ""))) for row in body.get("results", [])]

    def reserve_tasks(self, job_id: int, batch_size: int, info: Optional[dict] = None) -> list[Task]:
        """Reserve up to ``batch_size`` tasks; ``[]`` means nothing deliverable right now."""
        payload: dict[str, Any] = {"batch_size": int(batch_size)}
        if info:
            payload["client_info"] = info
        body = self._call("POST", f"/jobs/{job_id}/tasks/", json=payload)
        return [Task.model_validate(task) for task in body.get("tasks", [])]

    def post_results(self, job_id: int, items: list[dict], *, body_bytes: Optional[bytes] = None) -> dict:
        """POST ``{"results": items}``; ``body_bytes`` passes a pre-serialised body (the poster sizes it)."""
        if body_bytes is None:
            return self._call("POST", f"/jobs/{job_id}/result/", json={"results": items})
        return self._call(
            "POST", f"/jobs/{job_id}/result/", data=body_bytes,
            headers={"Content-Type": "application/json"},
        )

    def list_projects(self) -> list[dict]:
        """Every project the token sees, across pages (the server pages 10 at a time). Only the
        query of each ``next`` link is used, so a proxy that rewrites hosts cannot misdirect it."""
        projects: list[dict] = []
        params: dict[str, Any] = {}
        for _ in range(MAX_PAGES):
            body = self._call("GET", "/projects/", params=params)
            projects += body.get("results", [])
            if not body.get("next"):
                return projects
            params = dict(parse_qsl(urlsplit(str(body["next"])).query))
        raise AntennaUnavailable(f"GET /projects/: more than {MAX_PAGES} pages")

    def register_pipelines(self, project_id: int, service_name: str, pipelines: list[dict]) -> dict:
        payload = {"processing_service_name": f"{service_name} ({socket.gethostname()})", "pipelines": pipelines}
        return self._call("POST", f"/projects/{project_id}/pipelines/", json=payload)

    # --- mechanism ---

    def _call(self, method: str, path: str, **kwargs: Any) -> dict:
        url = self.base_url + path
        for attempt in range(1, self.max_attempts + 1):
            retry_after_s: Optional[float] = None
            try:
                response = self._session.request(method, url, timeout=self.timeout_s, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as error:
                problem = f"{type(error).__name__}"
                self._attempted(method, path, "timeout" if isinstance(error, requests.Timeout) else "connection")
            else:
                self._attempted(method, path, str(response.status_code))
                if response.status_code < 400:
                    return _json_body(response)
                if response.status_code not in RETRY_STATUSES:
                    raise AntennaRejected(response.status_code, f"{method} {path}: {_error_text(response)}")
                problem = f"HTTP {response.status_code}"
                retry_after_s = _retry_after_s(response)
            if attempt == self.max_attempts:
                raise AntennaUnavailable(f"{method} {path}: {problem} after {attempt} attempts")
            delay_s = backoff_delay_s(attempt, cap_s=self.backoff_cap_s, retry_after_s=retry_after_s)
            self.retries_total += 1
            log.warning(
                "%s %s: %s; retry in %.2f s (%d attempts left)",
                method, path, problem, delay_s, self.max_attempts - attempt,
            )
            self._sleep(delay_s)
        raise AssertionError("unreachable")

    def _attempted(self, method: str, path: str, status: str) -> None:
        if self.on_attempt is not None:
            self.on_attempt(method, path, status)


def _json_body(response: requests.Response) -> dict:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError as error:
        raise AntennaUnavailable(f"{response.url}: response is not JSON ({error})") from None
    return body if isinstance(body, dict) else {"results": body}


def _error_text(response: requests.Response) -> str:
    return response.text[:500].replace("\n", " ")


def _retry_after_s(response: requests.Response) -> Optional[float]:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP-date: rare from this API; fall back to our own backoff
