"""Logging set-up: readable lines on a terminal, JSON lines for journald (AMI_LOG_FORMAT=json).

A redaction filter replaces the API token in every record (its message and any traceback) as a
last line of defence; the code never logs it on purpose. Loader worker processes apply the same
set-up (``current_setup``, passed to them at start), so their lines are redacted and formatted
like the main process's.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

REDACTED = "***"
MIN_SECRET_CHARS = 4  # shorter strings would redact ordinary words

LogFormat = Literal["text", "json"]


class RedactFilter(logging.Filter):
    """Replaces each secret in a record's message, traceback and stack text with ``REDACTED``."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= MIN_SECRET_CHARS]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if self._has_secret(message):
            record.msg, record.args = self._redact(message), None
        if record.exc_info and not record.exc_text:
            # Formatted here so the text is redacted before any handler formats it (they reuse exc_text).
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and self._has_secret(record.exc_text):
            record.exc_text = self._redact(record.exc_text)
        if record.stack_info and self._has_secret(record.stack_info):
            record.stack_info = self._redact(record.stack_info)
        return True

    def _has_secret(self, text: str) -> bool:
        return any(secret in text for secret in self.secrets)

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info or record.exc_text:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


@dataclass(frozen=True)
class LogSetup:
    """What ``configure_logging`` was given: enough to set up another process the same way."""

    level: str = "INFO"
    fmt: LogFormat = "text"
    secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:  # the secrets never reach a log through a repr
        return f"LogSetup(level={self.level!r}, fmt={self.fmt!r}, secrets={len(self.secrets)})"

    def with_secrets(self, *secrets: str) -> "LogSetup":
        return LogSetup(self.level, self.fmt, tuple(dict.fromkeys((*self.secrets, *secrets))))


_current: Optional[LogSetup] = None


def current_setup() -> Optional[LogSetup]:
    """The set-up of this process's last ``configure_logging`` call (None: never called)."""
    return _current


def configure_logging(level: str = "INFO", fmt: LogFormat = "text", secrets: Iterable[str] = ()) -> None:
    global _current
    _current = LogSetup(level, fmt, tuple(secrets))
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactFilter(_current.secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # urllib3 at DEBUG prints request lines; keep it at WARNING unless asked for.
    logging.getLogger("urllib3").setLevel(max(logging.WARNING, root.level))


def apply_setup(setup: LogSetup) -> None:
    """Configure this process (a loader worker) as ``setup`` describes."""
    configure_logging(setup.level, setup.fmt, setup.secrets)
