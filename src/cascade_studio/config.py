"""Settings shared by every entry point (CLI, studio, API), read from `CASCADE_*` environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def shown(value: Any) -> str:
    """A given value as an error message quotes it: short, and 'nothing' for no value."""
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def bad_field(field: str, allowed: str, got: Any) -> str:
    """The one wording of a bad value, in the CLI, the studio and every API: the field, what it may be, what it got."""
    return f"{field}: must be {allowed} (got {shown(got)})"


def whole_number(low: int, high: int | None = None) -> str:
    return f"a whole number from {low} to {high}" if high is not None else f"a whole number of at least {low}"


def field_error(error: Mapping[str, Any], allowed: Mapping[str, str]) -> str:
    """One of pydantic's errors in that wording. `allowed` is keyed by field path without list indices
    (`loras.weight` for `loras.0.weight`); a field it does not name keeps pydantic's own message."""
    if not error["loc"]:  # a rule across fields; its message names the fields itself
        return error["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in error["loc"])
    kind = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
    if error["type"] == "missing":
        return f"{field}: required ({allowed.get(kind, 'a value')})"
    if kind in allowed:
        return bad_field(field, allowed[kind], error.get("input"))
    return f"{field}: {error['msg']}"


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


def _allowed_setting(metadata: list) -> str | None:
    low = next((m.ge for m in metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in metadata if hasattr(m, "le")), None)
    return whole_number(low, high) if low is not None else None


# The settings with bounds, worded as a bad field is (the CLI reports a bad --port or CASCADE_PORT this way).
SETTING_ALLOWED = {
    name: allowed for name, info in Settings.model_fields.items() if (allowed := _allowed_setting(info.metadata))
}
