"""Load Stable Cascade component by component and build diffusers' two pipelines from them.

Why not `DiffusionPipeline.from_pretrained`: diffusers froze Stable Cascade after 0.35.2, moved PaellaVQModel to
`diffusers.pipelines.deprecated.wuerstchen`, and in 0.42.1 loading a saved Stable Cascade pipeline folder fails
("diffusers has no class PaellaVQModel"). Loading each component ourselves also lets the two pipelines share ONE
text encoder (about 1.4 GB for the official model) and guarantees that only safetensors are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from .errors import ModelConfigError
from .previewer import Previewer
from .schedulers import VPredictionWuerstchenScheduler, WuerstchenScheduler
from .source import ModelIdentity, ModelSource

# Scheduler classes a model folder may name. Anything else is refused: a folder never chooses code to run. The
# official folders name diffusers' DDPMWuerstchenScheduler; ours computes the same steps without host waits.
SCHEDULERS: dict[str, type] = {
    "DDPMWuerstchenScheduler": WuerstchenScheduler,
    "VPredictionWuerstchenScheduler": VPredictionWuerstchenScheduler,
}


@dataclass
class CascadePipelines:
    """The loaded model: both diffusers pipelines (sharing tokenizer and text encoder) and where they run."""

    prior: StableCascadePriorPipeline
    decoder: StableCascadeDecoderPipeline
    identity: ModelIdentity
    device: torch.device
    dtype: torch.dtype
    previewer: Previewer | None = None
    defaults: dict = field(default_factory=dict)
    prompt_help: dict = field(default_factory=dict)
    cpu_offload: bool = False


def _variant(folder: Path) -> str | None:
    return "bf16" if any(folder.glob("*.bf16.safetensors")) else None


def load_scheduler(folder: Path):
    """Instantiate the scheduler a folder names, from the allowlist only."""
    config = json.loads((folder / "scheduler_config.json").read_text())
    name = config.get("_class_name", "DDPMWuerstchenScheduler")
    if name not in SCHEDULERS:
        raise ModelConfigError(
            f"scheduler: {folder} names {name!r}, which is not one of the known schedulers ({', '.join(SCHEDULERS)})"
        )
    return SCHEDULERS[name].from_config(config)


def load_pipelines(
    source: ModelSource, device: torch.device, dtype: torch.dtype, cpu_offload: bool = False
) -> CascadePipelines:
    """Read every component from its folder (safetensors only) and assemble the prior and decoder pipelines."""
    d = source.dirs

    def unet(folder: Path) -> StableCascadeUNet:
        return StableCascadeUNet.from_pretrained(
            folder, variant=_variant(folder), torch_dtype=dtype, use_safetensors=True
        )

    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        d["text_encoder"], variant=_variant(d["text_encoder"]), dtype=dtype, use_safetensors=True
    )
    vqgan = PaellaVQModel.from_pretrained(
        d["vqgan"], variant=_variant(d["vqgan"]), torch_dtype=dtype, use_safetensors=True
    )
    previewer = None
    if source.previewer_dir is not None:
        previewer = Previewer.from_pretrained(source.previewer_dir, use_safetensors=True, torch_dtype=torch.float32)
    return assemble_pipelines(
        prior=unet(d["prior"]),
        decoder=unet(d["decoder"]),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(d["tokenizer"]),
        vqgan=vqgan,
        scheduler=load_scheduler(d["scheduler"]),
        identity=source.identity,
        device=device,
        dtype=dtype,
        previewer=previewer,
        defaults=source.defaults,
        prompt_help=source.prompt_help,
        cpu_offload=cpu_offload,
    )


def assemble_pipelines(
    *,
    prior: StableCascadeUNet,
    decoder: StableCascadeUNet,
    text_encoder: CLIPTextModelWithProjection,
    tokenizer: CLIPTokenizer,
    vqgan: PaellaVQModel,
    scheduler,
    identity: ModelIdentity,
    device: torch.device,
    dtype: torch.dtype,
    previewer: Previewer | None = None,
    defaults: dict | None = None,
    prompt_help: dict | None = None,
    cpu_offload: bool = False,
) -> CascadePipelines:
    """Both diffusers pipelines from components in memory, sharing tokenizer and text encoder; each pipeline gets
    its own copy of the scheduler (schedulers keep state while sampling)."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the deprecation notice is ours to handle, not the user's
    try:
        prior_pipe = StableCascadePriorPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            prior=prior,
            scheduler=scheduler.from_config(scheduler.config),
        )
        decoder_pipe = StableCascadeDecoderPipeline(
            decoder=decoder,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            scheduler=scheduler.from_config(scheduler.config),
            vqgan=vqgan,
        )
    finally:
        diffusers_logging.set_verbosity(verbosity)

    for pipe in (prior_pipe, decoder_pipe):
        pipe.set_progress_bar_config(disable=True)
        if cpu_offload:
            if device.type != "cuda":
                raise ModelConfigError("cpu_offload: needs a CUDA device; on the CPU the model is already in RAM")
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
    if previewer is not None:
        previewer = previewer.to(device).eval()
    return CascadePipelines(
        prior_pipe, decoder_pipe, identity, device, dtype, previewer, defaults or {}, prompt_help or {}, cpu_offload
    )
