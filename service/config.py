"""Settings, read from the environment with the prefix FEATUREMAP_ (e.g. FEATUREMAP_MAX_BODY_BYTES)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.classifiers import MODELS_DIR
from service.cpus import usable_cpus, worker_processes
from service.pipeline import Limits


class Settings(BaseSettings):
    """Every limit a client could push against, with defaults that keep a 2-core, 24 GiB host safe."""

    model_config = SettingsConfigDict(env_prefix="FEATUREMAP_", frozen=True, extra="ignore")

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest request body (413 above).")
    max_body_bytes_in_flight: int = Field(
        128 * 1024 * 1024,
        ge=1,
        description="Request body bytes one worker holds at once, over all its requests (503 above); at least "
        "max_body_bytes.",
    )
    max_response_bytes_in_flight: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="Bytes of /v1/featuremaps responses over 1 MiB one worker holds at once, until each is sent "
        "(503 above); one response always fits while the worker holds no other.",
    )
    send_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest time a client may take none of a response's bytes before its connection is reset "
        "(`python -m service`; looked at every quarter of it).",
    )
    max_image_pixels: int = Field(16_000_000, ge=1, description="Largest decoded image, width x height (413).")
    max_layers: int = Field(16, ge=1, description="Most stages in one pipeline.")
    max_filters_per_conv: int = Field(64, ge=1, description="Most filters in one conv stage.")
    max_kernel_size: int = Field(31, ge=1, description="Largest kernel side.")
    max_output_elements: int = Field(50_000_000, ge=1, description="Most float values over all stages (413).")
    max_macs: int = Field(20_000_000_000, ge=1, description="Most multiply-adds one request may cost (413).")
    max_batch: int = Field(64, ge=1, description="Most digits in one /v1/predict batch (413).")
    models_dir: Path = Field(MODELS_DIR, description="Where mnist-{name}.safetensors and .json live.")
    batch_max_size: int = Field(
        16, ge=1, description="Most concurrent single-digit predictions run as one forward pass; 1 turns batching off."
    )
    max_concurrency: int = Field(
        0,
        ge=0,
        description="Requests computing at once in each worker (the rest wait in the queue); 0 = the usable CPUs "
        "divided by the worker processes (2 in one worker on 2 cores, 1 in each of 2 workers).",
    )
    max_queue: int = Field(32, ge=0, description="Requests that may wait for a compute slot; more get 503.")
    queue_wait_s: float = Field(10.0, gt=0, description="Longest wait for a compute slot before a 503.")
    compute_timeout_s: float = Field(30.0, gt=0, description="Longest compute of one request before a 504.")
    body_timeout_s: float = Field(
        60.0, gt=0, description="Longest time for a request body, or a head not sent in one read, to arrive (408)."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated API keys; when set, every /v1 route needs one."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS (`*` for any); none by default."
    )
    shutdown_delay_s: float = Field(
        0.0, ge=0, description="On SIGTERM, seconds to keep serving with /readyz at 503 before shutting down."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch threads per computing request; 0 = the usable CPUs divided by all workers' slots.",
    )
    pin_workers: bool = Field(
        True,
        description="With one worker per CPU (and one torch thread each), run each worker on a CPU of its own.",
    )
    warmup: bool = Field(True, description="Run a small pipeline at start-up before /readyz turns 200.")

    @model_validator(mode="after")
    def _one_body_fits(self) -> Settings:
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"FEATUREMAP_MAX_BODY_BYTES_IN_FLIGHT ({self.max_body_bytes_in_flight}) is below "
                f"FEATUREMAP_MAX_BODY_BYTES ({self.max_body_bytes}): one body of the allowed size would fill it"
            )
        return self

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def limits(self) -> Limits:
        return Limits(
            max_layers=self.max_layers,
            max_filters_per_conv=self.max_filters_per_conv,
            max_kernel_size=self.max_kernel_size,
            max_output_elements=self.max_output_elements,
            max_macs=self.max_macs,
        )

    @property
    def compute_slots(self) -> int:
        """`max_concurrency`, or when 0 this worker's share of the usable CPUs: one compute slot per core."""
        return self.max_concurrency or max(1, usable_cpus() // worker_processes())
