"""The /v1 API's response bodies, as pydantic models: they are the OpenAPI schema at /docs, and what the routes
return is checked against them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine import GenerationRequest


class Problem(BaseModel):
    """Every 4xx/5xx answer: one readable line per problem, naming the field or the cause."""

    detail: list[str] = Field(examples=[["width: must be a multiple of 128 from 128 to 2048 (got 720)"]])


class ImageView(BaseModel):
    id: str
    seed: int
    url: str = Field(description="the PNG, metadata included")


class ProgressView(BaseModel):
    stage: Literal["prior", "decoder"]
    step: int
    total: int
    elapsed: float = Field(description="seconds since the job started")


class GenerationView(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    request: GenerationRequest
    seeds: list[int] = Field(description="image i uses seed + i")
    model: str
    position: int | None = Field(description="0 while running, 1 for the next to run, ...; null once ended")
    images: list[ImageView]
    timings: dict[str, float] | None = Field(description="seconds: text, prior, decoder, total")
    prior_cached: bool | None = None
    warnings: list[str] = Field(default=[], description="e.g. the words of a prompt that the text encoder cuts")
    error: str | None = None
    progress: ProgressView | None = None
    created: float
    finished: float | None = None


class HistoryPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[GenerationView]


class Cancelling(BaseModel):
    id: str
    cancelling: bool


class Health(BaseModel):
    model_config = ConfigDict(extra="allow")  # a deployment may add its own fields (Ray Serve: replicas_used)

    status: Literal["ok", "degraded"]
    reasons: list[str] = Field(description="why the status is degraded, e.g. image writes failing")
    version: str
    model: str
    device: str
    dtype: str
    speedups: str
    queue: dict[str, int]


class TaskView(BaseModel):
    """A job that is not a generation: a model switch, a LoRA training."""

    id: str
    kind: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    spec: dict
    position: int | None = Field(description="0 while running, 1 for the next to run, ...; null once ended")
    progress: dict | None = Field(None, description="e.g. {'stage': 'loading prior', 'step': 2, 'total': 7}")
    result: dict | None = None
    error: str | None = None
    created: float
    finished: float | None = None


class ModelEntry(BaseModel):
    """One model this server can run (OpenAI's model object, with our label and whether it is loaded)."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "cascade-studio"
    label: str
    loaded: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


class ModelState(BaseModel):
    loaded: ModelEntry
    device: str
    dtype: str
    switchable: bool = Field(description="false when the server was started with --no-model-switch")
    switches: list[TaskView] = Field(description="model switches waiting or running")


class SwitchRequest(BaseModel):
    model: str = Field(description="an id from GET /v1/models", examples=["lite"])


class LoraEntry(BaseModel):
    """A LoRA file in the LoRA folder, as its header describes it."""

    name: str = Field(description='what requests call it: {"loras": [{"name": ...}]} or <lora:name:0.8>')
    sha256: str = Field(description="the first 12 hex digits of the file's SHA-256 (A1111's short hash)")
    format: str = Field(description="kohya, peft or stability")
    adapts: str = Field(description="the parts of the model it changes: prior, decoder, text_encoder")
    trigger_words: str = Field(description="from its header, or its user's activation text (A1111's <name>.json)")
    preferred_weight: float | None = Field(
        description="the weight its user prefers, from A1111's <name>.json beside the file; the studio's picker "
        "starts there (a request without a weight still gets 1)"
    )
    base_model: str
    rank: str


class LoraList(BaseModel):
    folder: str | None
    data: list[LoraEntry]
