"""All settings, read once from the environment (prefix ``AMI_``) and a ``.env`` file.

Names and defaults of the ADC worker's variables are kept so this is a drop-in replacement.
Library code receives a ``Settings`` object; nothing below the CLI reads ``os.environ``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "AMI_"


def default_user_data_path() -> Path:
    """The platform app dir ADC uses on Linux (XDG data home)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "AMI"


class SettingsError(ValueError):
    """A setting a user can fix: the message is one line naming the variable and the fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore",
        case_sensitive=False,
    )

    # --- the ADC worker's settings (names and defaults kept) ---
    antenna_api_base_url: str = "http://localhost:8000/api/v2"
    antenna_api_auth_token: Optional[SecretStr] = None
    antenna_service_name: str = "AMI Data Companion"
    antenna_api_batch_size: int = Field(24, ge=1)
    num_workers: int = Field(4, ge=0)
    localization_batch_size: int = Field(8, ge=1)
    classification_batch_size: int = Field(20, ge=1)
    classification_threshold: float = Field(0.6, ge=0.0, le=1.0)
    user_data_path: Path = Field(default_factory=default_user_data_path)
    database_url: Optional[str] = None

    # --- hard-coded in ADC, settings here ---
    antenna_api_dataloader_pin_memory: bool = True
    antenna_api_dataloader_prefetch_factor: int = Field(4, ge=1)
    antenna_api_dataloader_download_threads: int = Field(8, ge=1)
    antenna_api_dataloader_num_workers: Optional[int] = Field(None, ge=0)
    antenna_max_pending_posts: int = Field(5, ge=1)
    antenna_idle_sleep_seconds: float = Field(5.0, ge=0.0)

    # --- this worker's own ---
    antenna_pipelines: str = ""
    antenna_api_timeout_s: float = Field(30.0, gt=0)
    antenna_api_max_attempts: int = Field(6, ge=1)
    antenna_reservation_timeout_s: float = Field(300.0, gt=0)
    antenna_max_post_bytes: int = Field(32 * 1024 * 1024, ge=64 * 1024)
    max_image_bytes: int = Field(100_000_000, ge=1024)
    max_image_pixels: int = Field(80_000_000, ge=1)
    image_download_deadline_s: float = Field(120.0, gt=0)
    block_private_image_hosts: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    pipeline_torchscript_path: Optional[Path] = None
    pipeline_torchscript_slug: str = "torchscript"
    reference_pipeline_cost: int = Field(1, ge=1, le=100)
    nats_url: Optional[str] = None

    autotune: bool = True
    autotune_probe_tasks: int = Field(3, ge=1, le=32)
    memory_reserve_bytes: int = Field(1024**3, ge=0)
    memory_safety_factor: float = Field(0.85, gt=0.0, le=1.0)
    max_memory_bytes: Optional[int] = Field(None, ge=64 * 1024 * 1024)

    watchdog_enabled: bool = True
    watchdog_interval_s: float = Field(0.25, gt=0.0, le=60.0)
    watchdog_soft_cap_fraction: float = Field(0.70, gt=0.0, lt=1.0)
    watchdog_hard_cap_fraction: float = Field(0.85, gt=0.0, le=1.0)
    watchdog_hard_cap_deadline_s: float = Field(20.0, gt=0.0)

    metrics_addr: str = "127.0.0.1:9464"
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_grace_s: float = Field(60.0, gt=0.0)

    @field_validator("antenna_api_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("must be an http(s) URL such as http://localhost:8000/api/v2")
        return value.rstrip("/")

    @field_validator("metrics_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and (":" not in value or not value.rsplit(":", 1)[1].isdigit()):
            raise ValueError("must be HOST:PORT such as 127.0.0.1:9464, or empty to disable")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _caps_ordered(self) -> "Settings":
        if not self.watchdog_soft_cap_fraction < self.watchdog_hard_cap_fraction:
            raise ValueError(
                "AMI_WATCHDOG_SOFT_CAP_FRACTION must be below AMI_WATCHDOG_HARD_CAP_FRACTION "
                f"(got {self.watchdog_soft_cap_fraction} >= {self.watchdog_hard_cap_fraction})"
            )
        return self

    @property
    def dataloader_num_workers(self) -> int:
        """AMI_ANTENNA_API_DATALOADER_NUM_WORKERS wins; else ADC's AMI_NUM_WORKERS."""
        if self.antenna_api_dataloader_num_workers is not None:
            return self.antenna_api_dataloader_num_workers
        return self.num_workers

    @property
    def pipeline_slugs(self) -> list[str]:
        return [slug.strip() for slug in self.antenna_pipelines.split(",") if slug.strip()]

    @property
    def token(self) -> str:
        return self.antenna_api_auth_token.get_secret_value() if self.antenna_api_auth_token else ""

    def explicitly_set(self) -> set[str]:
        """Env variable names the operator set (env or .env), as opposed to defaults."""
        return {ENV_PREFIX + name.upper() for name in self.model_fields_set}

    def require_token(self) -> None:
        if not self.token:
            raise SettingsError(
                "AMI_ANTENNA_API_AUTH_TOKEN is not set: set it to the processing service token "
                "from the Antenna admin (Authorization: Token ...)"
            )


def load_settings(env_file: Optional[str] = ".env", **overrides: object) -> Settings:
    """Read settings; raise ``SettingsError`` with one line naming the variable on a bad value."""
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as error:
        raise SettingsError(_one_line(error)) from None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    if not first["loc"]:  # a cross-field check: its message names the variables itself
        return f"{first['msg'].removeprefix('Value error, ')}; fix it in the environment or .env"
    field = str(first["loc"][0])
    variable = ENV_PREFIX + field.upper()
    given = first.get("input")
    message = first["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(given, dict) else f"={given}"
    more = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{variable}{shown} is invalid: {message}; fix it in the environment or .env{more}"
