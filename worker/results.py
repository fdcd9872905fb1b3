"""The typed outcome of one task: a success or an error result, with the failure's reason code.

A result is built once, here, as the wire schema's models (``worker.schema``) and serialised only
by the poster. A failure carries its reason code from the place it was raised (``ImageError``,
an inference failure, a server rejection), so nothing classifies failures by their text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from worker.schema import PipelineResultsError, PipelineResultsResponse, ResultItem, Task

FailureReason = Literal[
    "not_found",        # the image URL answered 404
    "http_error",       # any other HTTP error status for the image
    "too_large",        # over AMI_MAX_IMAGE_BYTES
    "too_many_pixels",  # over AMI_MAX_IMAGE_PIXELS, or an impossible declared size
    "empty",            # an empty body
    "not_an_image",     # not decodable as an image (HTML error page, unknown format)
    "corrupt",          # a JPEG that starts decoding and breaks
    "connection",       # the connection failed or was reset
    "timeout",          # the download exceeded its deadline
    "bad_url",          # a URL the worker will not fetch (scheme, redirects, blocked host)
    "bad_task",         # a task row the server sent malformed (a field missing, null or not text)
    "inference",        # the pipeline raised on this image alone
    "pipeline",         # the pipeline broke its contract on the whole batch (a bug, flagged in the log)
    "rejected",         # the server rejected this result as invalid
    "other",
]


@dataclass(frozen=True)
class Failure:
    """Why a task has no image or no success result: a reason code and a human message."""

    reason: FailureReason
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ImageResult:
    """One task's result as it will be posted; ``failure`` is set exactly when it is an error."""

    task: Task
    result: Union[PipelineResultsResponse, PipelineResultsError]
    failure: Optional[Failure] = None

    @classmethod
    def error(cls, task: Task, failure: Failure) -> "ImageResult":
        return cls(task, PipelineResultsError(error=failure.message, image_id=task.image_id or None), failure)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def item(self) -> ResultItem:
        return ResultItem(reply_subject=self.task.reply_subject, result=self.result)
