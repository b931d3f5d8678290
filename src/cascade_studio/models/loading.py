"""Load Stable Cascade component by component and build diffusers' two pipelines from them.

Why not `DiffusionPipeline.from_pretrained`: diffusers froze Stable Cascade after 0.35.2, moved PaellaVQModel to
`diffusers.pipelines.deprecated.wuerstchen`, and in 0.42.1 loading a saved Stable Cascade pipeline folder fails
("diffusers has no class PaellaVQModel"). Loading each component ourselves also lets the two pipelines share ONE
text encoder (about 1.4 GB for the official model) and guarantees that only safetensors are read.
"""

from __future__ import annotations

import json
import logging
import warnings
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
    image_encoder_path: Path | None = None  # loaded when first needed (image inputs, LoRA training)
    image_tower_path: Path | None = None  # the prior's CLIP image tower (image prompts), loaded when first needed


log = logging.getLogger(__name__)


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
    source: ModelSource, device: torch.device, dtype: torch.dtype, cpu_offload: bool = False, progress=None
) -> CascadePipelines:
    """Read every component from its folder (safetensors only) and assemble the prior and decoder pipelines.

    A component without the bf16 variant is read from its plain file and cast to `dtype` (said in the log); a
    single-file checkpoint in the source replaces the prior or decoder. `progress(done, total, what)` is told as
    each component has loaded (the studio's model switch shows it)."""
    d, names = source.dirs, ("prior", "decoder", "text_encoder", "vqgan", "tokenizer", "scheduler")

    def step(i: int, what: str) -> None:
        if progress is not None:
            progress(i, len(names), what)

    def variant(role: str) -> str | None:
        weights = source.weights.get(role)
        wanted = "bf16" if dtype == torch.bfloat16 else None
        if weights is not None and weights.variant is None and dtype == torch.bfloat16:
            log.info("%s: no bf16 weights in %s; loading the full-precision file and casting it to bf16", role, d[role])
        return weights.variant if weights is not None else wanted

    def unet(role: str) -> StableCascadeUNet:
        if role in source.single_files:
            return _single_file_unet(source, role, dtype)
        with warnings.catch_warnings():  # legacy shard names load fine; diffusers' advice to re-save is not the user's
            warnings.filterwarnings("ignore", "This serialization format is now deprecated", FutureWarning)
            return StableCascadeUNet.from_pretrained(
                d[role], variant=variant(role), torch_dtype=dtype, use_safetensors=True
            )

    prior = unet("prior")
    step(1, "prior")
    decoder = unet("decoder")
    step(2, "decoder")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        d["text_encoder"], variant=variant("text_encoder"), dtype=dtype, use_safetensors=True
    )
    step(3, "text encoder")
    vqgan = PaellaVQModel.from_pretrained(d["vqgan"], variant=variant("vqgan"), torch_dtype=dtype, use_safetensors=True)
    step(4, "Stage A")
    tokenizer = CLIPTokenizer.from_pretrained(d["tokenizer"])
    scheduler = load_scheduler(d["scheduler"])
    step(5, "tokenizer and scheduler")
    previewer = None
    if source.previewer_dir is not None:
        previewer = Previewer.from_pretrained(source.previewer_dir, use_safetensors=True, torch_dtype=torch.float32)
    pipelines = assemble_pipelines(
        prior=prior,
        decoder=decoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vqgan=vqgan,
        scheduler=scheduler,
        identity=source.identity,
        device=device,
        dtype=dtype,
        previewer=previewer,
        defaults=source.defaults,
        prompt_help=source.prompt_help,
        cpu_offload=cpu_offload,
    )
    pipelines.image_encoder_path = source.image_encoder
    pipelines.image_tower_path = source.image_tower
    step(6, f"on {device}")
    return pipelines


def _single_file_unet(source: ModelSource, role: str, dtype: torch.dtype) -> StableCascadeUNet:
    """A prior or decoder from an original-format file; its architecture is whichever candidate fits the file: the
    official full or lite, or the model folder's own."""
    from .architectures import OFFICIAL
    from .single_file import load_unet

    candidates = dict(OFFICIAL[role])
    config_file = source.dirs[role] / "config.json" if role in source.dirs else None
    if config_file is not None and config_file.is_file():
        own = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
        candidates = {"this model's": own} | candidates
    model, matched = load_unet(source.single_files[role], role, candidates, dtype)
    log.info("%s: %s read as the %s architecture", role, source.single_files[role].name, matched)
    return model


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
