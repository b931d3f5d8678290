"""Settings shared by every entry point (CLI, studio, API), read from `CASCADE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where models come from, where they run and where images go.

    Every field can be set in the environment, e.g. `CASCADE_MODEL=lite` or `CASCADE_OUTPUT_DIR=~/pictures`.
    """

    model_config = SettingsConfigDict(env_prefix="CASCADE_", extra="ignore")

    model: str = Field(
        "auto",
        description="auto (full when its weights are on disk, else demo), demo, full, lite, or a local folder.",
    )
    revision: str | None = Field(None, description="A branch or tag of both official repos (commits differ per repo).")
    prior_revision: str | None = Field(None, description="Revision (commit, tag, branch) of the prior repo.")
    decoder_revision: str | None = Field(None, description="Revision (commit, tag, branch) of the decoder repo.")
    prior_file: Path | None = Field(None, description="Stability's original-format Stage C file, for the prior.")
    decoder_file: Path | None = Field(None, description="Stability's original-format Stage B file, for the decoder.")
    lora_dir: Path | None = Field(
        None,
        description="Folder of LoRA files (.safetensors); a LoRA is asked for by its file name without the suffix.",
    )
    model_dir: Path | None = Field(
        None,
        description="Folder of local models (model folders, single-file checkpoints) the studio and API can switch to.",
    )
    model_switch: bool = Field(
        True, description="Let studio and API users switch the loaded model (--no-model-switch)."
    )
    cache_dir: Path | None = Field(None, description="Hugging Face Hub cache; None uses the library default.")
    device: str = Field("auto", description="auto (cuda > mps > cpu), or a torch device such as cuda:1.")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    cpu_offload: bool = Field(False, description="Keep models on the CPU and move each to the GPU when used.")
    speedup: Literal["auto", "off", "graphs", "compile"] = Field(
        "auto",
        description="graphs: replay each denoising step as a CUDA graph (same pixels as eager); compile: compiled "
        "UNet blocks too (faster, first image waits ~1 min, pixels move slightly); auto: graphs on CUDA without "
        "offload, else off. See engine/speed.py and bench/gpu_speed.py.",
    )
    output_dir: Path = Path("outputs")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for torch; None keeps torch's choice.")
    history_db: Path | None = Field(None, description="SQLite history; default: <output_dir>/history.sqlite.")
    host: str = Field("127.0.0.1", description="Address the server binds; 0.0.0.0 exposes it to the network.")
    port: int = Field(7860, ge=1, le=65535)
    share: bool = Field(False, description="Also open a public gradio.live link to the studio (needs the internet).")
    max_queued: int = Field(16, ge=1, le=1000, description="Jobs that may wait; more are refused (queue full).")
    per_client_jobs: int = Field(4, ge=1, le=100, description="Unfinished jobs one client may have at once.")
    api_token: str | None = Field(None, description="If set, /v1 requests need 'Authorization: Bearer <token>'.")

    @property
    def lora_folder(self) -> Path:
        """Where LoRAs are found by name and trained LoRAs land: lora_dir, else <output_dir>/loras."""
        return Path(self.lora_dir or self.output_dir / "loras").expanduser()
