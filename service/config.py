"""Settings, read from the environment with the prefix FEATUREMAP_ (e.g. FEATUREMAP_MAX_BODY_BYTES)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.classifiers import MODELS_DIR
from service.pipeline import Limits


class Settings(BaseSettings):
    """Every limit a client could push against, with defaults that keep a 2-core, 24 GiB host safe."""

    model_config = SettingsConfigDict(env_prefix="FEATUREMAP_", frozen=True, extra="ignore")

    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest request body (413 above).")
    max_image_pixels: int = Field(16_000_000, ge=1, description="Largest decoded image, width x height (413).")
    max_layers: int = Field(16, ge=1, description="Most stages in one pipeline.")
    max_filters_per_conv: int = Field(64, ge=1, description="Most filters in one conv stage.")
    max_kernel_size: int = Field(31, ge=1, description="Largest kernel side.")
    max_output_elements: int = Field(50_000_000, ge=1, description="Most float values over all stages (413).")
    max_macs: int = Field(20_000_000_000, ge=1, description="Most multiply-adds one request may cost (413).")
    max_batch: int = Field(64, ge=1, description="Most digits in one /v1/predict batch (413).")
    models_dir: Path = Field(MODELS_DIR, description="Where mnist-{name}.safetensors and .json live.")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default.")
    warmup: bool = Field(True, description="Run a small pipeline at start-up before /readyz turns 200.")

    def limits(self) -> Limits:
        return Limits(
            max_layers=self.max_layers,
            max_filters_per_conv=self.max_filters_per_conv,
            max_kernel_size=self.max_kernel_size,
            max_output_elements=self.max_output_elements,
            max_macs=self.max_macs,
        )
