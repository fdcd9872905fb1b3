"""The Antenna API v2 client (pull mode): list jobs, reserve tasks, post results, register pipelines.

Every call has a timeout. What is retried (with ``backoff_delay_s``) depends on whether the call may
be repeated: listings, result posts (the server acknowledges by reply subject, so a repeat is a
harmless duplicate) and registrations retry connection errors, timeouts, resets mid-response,
malformed bodies, 429 (honouring Retry-After) and 5xx. A reserve is retried only where no
reservation can have happened: the connection was refused or never opened, or the server itself
answered 429 or 503. After a read timeout, a reset, a broken body or a 500/502/504 the server may
have reserved tasks whose answer was lost; a retry would orphan them (each then costs one of its
two deliveries), so the reserve fails at once. Other 4xx raise ``AntennaRejected`` at once, and so
does a redirect that would turn a POST into a GET or lead to another origin (a wrong base URL).
Every failure carries a reason code. The token lives only in the session's headers and is never logged.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence
from urllib.parse import urlsplit

import requests
from pydantic import ValidationError
from urllib3.exceptions import NewConnectionError

from worker import __version__
from worker.backoff import backoff_delay_s
from worker.schema import Task
from worker.sessions import EnvironmentSession

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_PAGES = 1000  # a guard against a server whose ``next`` never ends
# Statuses after which no reservation can have happened: the server refused before reserving.
NOTHING_DONE_STATUSES = frozenset({429, 503})
SUPERUSER_HINT = "task and result calls need a superuser's token on Antenna"

UnavailableReason = Literal["refused", "connect_timeout", "read_timeout", "connection", "bad_response", "http"]
RejectedReason = Literal["unauthorized", "forbidden", "not_found", "too_large", "invalid", "other"]
_REJECTED_REASONS: dict[int, RejectedReason] = {
    400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "too_large"}


class AntennaError(Exception):
    """Base for API failures."""


class AntennaUnavailable(AntennaError):
    """The API stayed unreachable (or 5xx/429, or answered garbage) through every attempt allowed."""

    def __init__(self, message: str, reason: UnavailableReason = "http") -> None:
        super().__init__(message)
        self.reason: UnavailableReason = reason


class AntennaRejected(AntennaError):
    """The API answered a 4xx that retrying cannot fix (400 validation, 401/403 auth, 404, 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.reason: RejectedReason = _REJECTED_REASONS.get(status, "other")

    @property
    def auth(self) -> bool:
        return self.reason in ("unauthorized", "forbidden")


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
        sleep: Optional[Callable[[float], object]] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_cap_s = backoff_cap_s
        self._no_more_retries = threading.Event()
        # The default sleep between retries wakes at once when ``stop_retrying`` is called.
        self._sleep = sleep if sleep is not None else self._no_more_retries.wait
        self._session = EnvironmentSession()  # a netrc entry for the host cannot replace the token
        self._session.headers["Authorization"] = f"Token {token}"
        self._session.headers["User-Agent"] = f"antenna-worker/{__version__}"
        self.retries_total = 0
        self.last_call_s = time.monotonic()  # when the last attempt started (the server's liveness clock)
        # Called after every attempt with (method, path, status): the HTTP code as text, or
        # "connection" / "timeout". Set by whoever watches the API (the metrics middleware).
        self.on_attempt: Optional[Callable[[str, str, str], None]] = None
        self.auth_failures_total = 0
        self.auth_rejected = False  # the last answer was 401/403 (cleared by any success)

    def close(self) -> None:
        self._session.close()

    def stop_retrying(self) -> None:
        """From now on a failed attempt is final (calls in flight finish their current attempt): a
        shutdown past its deadline spools what it could not post instead of retrying for minutes."""
        self._no_more_retries.set()

    # --- the contract's calls ---

    def list_jobs(self, pipeline_slugs: Optional[Sequence[str]], *, limit: Optional[int] = None,
                  every_page: bool = False) -> list[JobRef]:
        """Incomplete pull-mode jobs of ``pipeline_slugs`` (None: of every pipeline); without
        ``limit`` the server hands out ONE at random.

        ``every_page``: follow the listing's ``next`` links too. The server pages with limit and
        offset and may cap a page below ``limit``; a job listed twice (the offsets move as jobs
        complete between pages) is kept once."""
        params: dict[str, Any] = {"ids_only": 1, "incomplete_only": 1, "dispatch_mode": "async_api"}
        if pipeline_slugs is not None:
            params["pipeline__slug__in"] = ",".join(pipeline_slugs)
        if limit is not None:
            params["limit"] = limit
        if not every_page:
            return self._call("GET", "/jobs/", parse=_job_refs, params=params)
        jobs: dict[int, JobRef] = {}
        for body in self._pages("/jobs/", _job_page, params):
            for job in body["results"]:
                jobs.setdefault(job.id, job)
        return list(jobs.values())

    def reserve_tasks(self, job_id: int, batch_size: int, info: Optional[dict] = None) -> list[Task]:
        """Reserve up to ``batch_size`` tasks; ``[]`` means nothing deliverable right now."""
        payload: dict[str, Any] = {"batch_size": int(batch_size)}
        if info:
            payload["client_info"] = info
        return self._call("POST", f"/jobs/{job_id}/tasks/", parse=_tasks, replay_safe=False, json=payload)

    def post_results(self, job_id: int, items: list[dict], *, body_bytes: Optional[bytes] = None) -> dict:
        """POST ``{"results": items}``; ``body_bytes`` passes a pre-serialised body (the poster sizes it)."""
        # A 2xx is the acceptance; its body is informative only, so a broken one is not a failure
        # (retrying would post the results twice).
        if body_bytes is None:
            return self._call("POST", f"/jobs/{job_id}/result/", parse=_lenient, json={"results": items})
        return self._call(
            "POST", f"/jobs/{job_id}/result/", parse=_lenient, data=body_bytes,
            headers={"Content-Type": "application/json"},
        )

    def list_projects(self) -> list[dict]:
        """Every project the token sees, following ``next`` (the server pages them 10 at a time)."""
        return [project for body in self._pages("/projects/", _page) for project in body["results"]]

    def _pages(self, path: str, parse: Callable[[requests.Response], dict],
               params: Optional[dict[str, Any]] = None) -> Iterator[dict]:
        """Each page of a paginated listing (``parse``d: a page that cannot be read is retried and
        then unavailable, as any call), following ``next`` (it carries the query), at most
        ``MAX_PAGES`` of them and never one page twice."""
        page: Optional[str] = path
        seen: set[str] = set()
        while page and page not in seen and len(seen) < MAX_PAGES:
            seen.add(page)
            body = self._call("GET", page, parse=parse, params=params if page == path else None)
            yield body
            page = _next_page(path, body.get("next"))

    def register_pipelines(self, project_id: int, service_name: str, pipelines: list[dict]) -> dict:
        payload = {"processing_service_name": f"{service_name} ({socket.gethostname()})", "pipelines": pipelines}
        return self._call("POST", f"/projects/{project_id}/pipelines/", json=payload)

    # --- mechanism ---

    def _call(self, method: str, path: str, *, parse: Optional[Callable[[requests.Response], Any]] = None,
              replay_safe: bool = True, **kwargs: Any) -> Any:
        """One API call with retries; ``parse`` turns a 2xx response into the value (raising
        ``_BadResponse`` on a body it cannot read). ``replay_safe=False``: retry only where the
        server cannot have acted (see the module docstring)."""
        parse = parse or _json_object
        url = self.base_url + path
        for attempt in range(1, self.max_attempts + 1):
            retry_after_s: Optional[float] = None
            self.last_call_s = time.monotonic()
            try:
                response = self._session.request(method, url, timeout=self.timeout_s, **kwargs)
                self._attempted(method, path, str(response.status_code))
                _raise_if_redirected_away(method, path, response)
                if response.status_code < 400:
                    value = parse(response)
                    self.auth_rejected = False
                    return value
            except requests.RequestException as error:
                reason, problem = _transport_failure(error)
                self._attempted(method, path, "timeout" if isinstance(error, requests.Timeout) else "connection")
                retryable = replay_safe or reason in ("refused", "connect_timeout")
            except _BadResponse as error:
                reason, problem, retryable = "bad_response", str(error), replay_safe
            else:
                self._raise_if_rejected(response, method, path)
                reason, problem = "http", f"HTTP {response.status_code}"
                retryable = replay_safe or response.status_code in NOTHING_DONE_STATUSES
                retry_after_s = _retry_after_s(response)
            if not retryable:
                raise AntennaUnavailable(f"{method} {path}: {problem}; not retried, the server may have "
                                         "acted on it", reason)
            if attempt == self.max_attempts or self._no_more_retries.is_set():
                raise AntennaUnavailable(f"{method} {path}: {problem} after {attempt} attempts", reason)
            delay_s = backoff_delay_s(attempt, cap_s=self.backoff_cap_s, retry_after_s=retry_after_s)
            self.retries_total += 1
            log.warning(
                "%s %s: %s; retry in %.2f s (%d attempts left)",
                method, path, problem, delay_s, self.max_attempts - attempt,
            )
            self._sleep(delay_s)
            if self._no_more_retries.is_set():  # stopped while waiting: the wait was the last try's
                raise AntennaUnavailable(f"{method} {path}: {problem} after {attempt} attempts (no more retries: "
                                         "the worker is stopping)", reason)
        raise AssertionError("unreachable")

    def _attempted(self, method: str, path: str, status: str) -> None:
        if self.on_attempt is not None:
            self.on_attempt(method, path, status)

    def _raise_if_rejected(self, response: requests.Response, method: str, path: str) -> None:
        if response.status_code in RETRY_STATUSES:
            return
        error = AntennaRejected(response.status_code, f"{method} {path}: {_error_text(response)}")
        if error.auth:
            self.auth_failures_total += 1
            self.auth_rejected = True
            if error.reason == "forbidden" and ("/tasks/" in path or "/result/" in path):
                error = AntennaRejected(response.status_code, f"{error.message} ({SUPERUSER_HINT})")
        raise error


class _BadResponse(Exception):
    """A 2xx whose body is not what the contract says."""


def _raise_if_redirected_away(method: str, path: str, response: requests.Response) -> None:
    """Refuse an answer reached through a redirect that changed the call: one that turned ``method``
    into another (a 301, 302 or 303 to a POST is followed as a GET), or one to another origin, where
    the token is not sent (its 401 there says nothing of the token). Either way the call was never
    made as meant, and the redirect names the URL to configure."""
    if not response.history:
        return
    if response.request.method != method:
        where = f"where it would be a {response.request.method}"
    elif "Authorization" not in response.request.headers:
        where = "another origin, where the token is not sent"
    else:
        return
    first = response.history[0]
    raise AntennaRejected(first.status_code, f"{method} {path}: redirected to {first.headers.get('Location', '?')}, "
                                             f"{where}: set AMI_ANTENNA_API_BASE_URL to the URL the server "
                                             "redirects to")


def _transport_failure(error: requests.RequestException) -> tuple[UnavailableReason, str]:
    """Reason code and text of a failure below HTTP; "refused" and "connect_timeout" mean the
    request never reached the server."""
    if isinstance(error, requests.ConnectTimeout):
        return "connect_timeout", "ConnectTimeout"
    if isinstance(error, requests.Timeout):
        return "read_timeout", type(error).__name__
    cause = error.args[0] if error.args else None
    if isinstance(getattr(cause, "reason", None), NewConnectionError):
        return "refused", "connection refused or host unreachable"
    return "connection", type(error).__name__


def _json_object(response: requests.Response) -> dict:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError as error:
        raise _BadResponse(f"response is not JSON ({str(error)[:100]})") from None
    if isinstance(body, list):
        return {"results": body}
    if not isinstance(body, dict):
        raise _BadResponse(f"response is JSON {type(body).__name__}, not an object")
    return body


def _lenient(response: requests.Response) -> dict:
    try:
        return _json_object(response)
    except _BadResponse as error:
        log.warning("%s answered %d with a body it could not read (%s); taken as accepted",
                    response.request.path_url.split("?")[0], response.status_code, error)
        return {}


def _rows(body: dict, key: str) -> list:
    rows = body.get(key, [])
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise _BadResponse(f"'{key}' is not a list of objects")
    return rows


def _job_refs(response: requests.Response) -> list[JobRef]:
    return _job_page(response)["results"]


def _job_page(response: requests.Response) -> dict:
    """A listing page with its rows as ``JobRef``s."""
    body = _page(response)
    body["results"] = _job_rows(body["results"])
    return body


def _job_rows(rows: list) -> list[JobRef]:
    try:
        return [JobRef(int(row["id"]), str(row.get("pipeline_slug", ""))) for row in rows]
    except (KeyError, TypeError, ValueError) as error:
        raise _BadResponse(f"a job row has no integer id ({error!r})") from None


def _tasks(response: requests.Response) -> list[Task]:
    """The reserved tasks. A row with a broken field is not a broken response: the server has
    reserved every row, so refusing them all held the good ones until their reservation timed
    out, and each came back with the same row until its deliveries ran out. A row that can be
    answered (it has a ``reply_subject``) becomes a task carrying its problem, never fetched, so
    its image gets an error result (``bad_task``); one that cannot stays held, and is logged."""
    body = _json_object(response)
    if "tasks" not in body:  # a proxy's or a wrong endpoint's object is not "nothing deliverable"
        raise _BadResponse("a reserve answer has no 'tasks'")
    rows = body["tasks"]
    if not isinstance(rows, list):
        raise _BadResponse("'tasks' is not a list")
    tasks = []
    for row in rows:
        if isinstance(row, dict) and "problem" in row:  # the worker's own field, never the server's
            row = {key: value for key, value in row.items() if key != "problem"}
        try:
            tasks.append(Task.model_validate(row))
        except ValidationError as error:
            task = _answerable(row, error)
            if task is not None:
                tasks.append(task)
    if rows and not tasks:
        raise _BadResponse(f"none of its {len(rows)} task rows has a reply_subject")
    return tasks


def _answerable(row: Any, error: ValidationError) -> Optional[Task]:
    """A malformed task row as a task whose image URL fails (the field's problem logged), or None
    where the row has no ``reply_subject`` to answer it by."""
    fields = row if isinstance(row, dict) else {}
    subject = fields.get("reply_subject")
    if not isinstance(subject, str) or not subject:
        log.error("a reserved task row has no reply_subject, so no result can answer it; the server "
                  "redelivers it after its reservation timeout: %.200r", row)
        return None
    image_id, url = fields.get("image_id"), fields.get("image_url")
    problem = "; ".join(f"{name} {_field_problem(fields, name)}" for name in ("id", "image_id", "image_url")
                        if _field_problem(fields, name)) or f"{error.error_count()} validation errors"
    log.warning("task row with image_id %r: %s; it gets an error result", image_id, problem)
    # With no id its reply subject stands in: task ids key what a head start has handed on.
    return Task(id=_as_text(fields.get("id")) or subject, image_id=_as_text(image_id),
                image_url=url if isinstance(url, str) else "", reply_subject=subject,
                problem=f"the server sent this task malformed: {problem}")


def _field_problem(fields: dict, name: str) -> str:
    """What is wrong with a task row's string field, '' when nothing."""
    if name not in fields:
        return "is missing"
    value = fields[name]
    if value is None:
        return "is null"
    return "" if isinstance(value, str) else f"is not a string ({value!r:.60})"


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


def _page(response: requests.Response) -> dict:
    """A listing page; one without ``results`` (an empty body, a proxy's object) is not a page of no
    rows: a burst would take it for an empty queue."""
    body = _json_object(response)
    if "results" not in body:
        raise _BadResponse("a listing page has no 'results'")
    body["results"] = _rows(body, "results")
    return body


def _next_page(path: str, link: Optional[str]) -> Optional[str]:
    """A listing's ``next`` link as ``path`` (under the configured base URL) with the link's query.

    Page links keep the listing's path and change only the query, but the server writes them as it
    sees itself: behind a proxy another scheme or host, or no path prefix where the proxy adds one
    (``https://host/antenna/api/v2`` proxied to a server at ``/api/v2``). Only the query is taken,
    so the token only ever goes to the configured origin. A link to another listing is not followed."""
    if not link:
        return None
    parts = urlsplit(link)
    if not parts.path.endswith(path):
        log.warning("not following a page link to another path than %s: %s", path, parts.path)
        return None
    return path + (f"?{parts.query}" if parts.query else "")


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
