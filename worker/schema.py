"""The Antenna wire contract's bodies as pydantic models (API v2, pull mode).

Used on both sides: the worker builds results with them, the local server validates
posted results with them (all-or-nothing, like the real server).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class _Model(BaseModel):
    # NaN and Infinity are not JSON: the server's parser refuses the whole post for one of them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Task(_Model):
    """One reserved task as the server hands it out."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    id: str
    image_id: str
    image_url: str
    reply_subject: str
    # Set by the client on a row it could not read whole (``worker.antenna``): the task is answered
    # with this as its error, never fetched.
    problem: Optional[str] = None

    @field_validator("id", "image_id", mode="before")
    @classmethod
    def _integer_ids_as_text(cls, value: object) -> object:
        """Ids sent as numbers (the server's keys are integers) are read as their text."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class AlgorithmReference(_Model):
    name: str
    key: str


class BoundingBox(_Model):
    x1: float
    y1: float
    x2: float
    y2: float


class ClassificationResponse(_Model):
    classification: str
    labels: Optional[list[str]] = None
    scores: list[float]
    logits: Optional[list[float]] = None
    inference_time: Optional[float] = None
    algorithm: AlgorithmReference
    terminal: bool = True
    timestamp: str


class DetectionResponse(_Model):
    source_image_id: str
    bbox: BoundingBox
    inference_time: Optional[float] = None
    algorithm: AlgorithmReference
    timestamp: str
    crop_image_url: Optional[str] = None
    classifications: list[ClassificationResponse] = Field(default_factory=list)


class SourceImageResponse(_Model):
    id: str
    url: str


class PipelineResultsResponse(_Model):
    # Antenna's model ignores unknown fields, and ADC's worker sends one (``config``).
    model_config = ConfigDict(extra="ignore")
    pipeline: str
    algorithms: dict[str, dict] = Field(default_factory=dict)
    total_time: float
    source_images: list[SourceImageResponse]
    detections: list[DetectionResponse]
    errors: Optional[Union[str, list[str]]] = None


class PipelineResultsError(_Model):
    error: str
    # Optional in the contract, but without it the server never marks the image failed: always set,
    # except for a task the server sent with no image id.
    image_id: Optional[str] = None


class ResultItem(_Model):
    reply_subject: str = Field(min_length=1)
    result: Union[PipelineResultsResponse, PipelineResultsError]


class ResultsPost(_Model):
    results: list[ResultItem]


class AlgorithmConfig(_Model):
    model_config = ConfigDict(extra="allow")
    name: str
    key: str
    task_type: str
    description: str = ""
    version: int = 1
    category_map: Optional[dict] = None


class PipelineConfig(_Model):
    model_config = ConfigDict(extra="allow")
    name: str
    slug: str
    version: int = 1
    description: str = ""
    algorithms: list[AlgorithmConfig]
    stages: list[dict] = Field(default_factory=list)


class RegisterPipelines(_Model):
    processing_service_name: str
    pipelines: list[PipelineConfig]


ResultKind = Literal["ok", "error"]


def result_kind(result: Union[PipelineResultsResponse, PipelineResultsError]) -> ResultKind:
    return "error" if isinstance(result, PipelineResultsError) else "ok"
