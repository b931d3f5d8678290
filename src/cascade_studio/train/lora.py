"""Train a LoRA on a folder of captioned pictures, on the loaded model, and write it in the kohya/ComfyUI format.

    cascade-studio train-lora my_pictures/ --out my_style.safetensors --trigger mystyle

The dataset is read once: each picture (png, jpg, webp; EXIF rotation applied) is resized and centre-cropped to
the size its aspect ratio is nearest to among the sizes the model makes, and its caption is `name.txt` beside it
(kohya's convention) or, without one, the trigger word. Captions are encoded by the text encoder and pictures by
the model's image encoder (Stability's EfficientNet for the official models, the demo's own) to Stage C latents,
so a training step runs only the prior. peft adds the LoRA to the prior's attention (q, k, v, out and the
conditioning's kv_mapper) and feed-forward linears; `decoder=True` adapts Stage B too, on Stage A latents of the
same pictures. `trigger_embedding=True` also learns the trigger word's own token embeddings (textual inversion
beside the LoRA, as Stability's recipe trains its tokens), bundled in the file as `bundle_emb.<word>.clip_g`: a
prompt without the word reads exactly as before. The loss is the model's own target: v for the demo model, the
noise for the official ones.

Every `sample_every` steps a picture is made with a fixed seed; every `save_every` steps, and on Ctrl-C or a
cancelled job, a checkpoint is written with what resuming needs (`resume=`). At the end the LoRA file (with its
metadata: base model, rank, alpha, trigger words, steps, resolution, dataset hash, tool version), a loss plot
beside it, and the last sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, TrainableTokensConfig, inject_adapter_in_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import bad_field
from ..engine import CancelToken, CascadeEngine, GenerationCancelled, make_request
from ..models.image_encoder import encode
from ..models.lora import KOHYA_PREFIX, LoraStack, kohya_name, word_tokens
from ..models.schedulers import VPredictionWuerstchenScheduler
from .stages import alpha_cumprod, sample_t

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The layers the LoRA adapts, as regexes over diffusers' module names (peft matches each against the names).
# The text encoder's: CLIP's self-attention projections (kohya's text-encoder LoRA).
TARGETS = r".*\.(attention\.(to_q|to_k|to_v|to_out\.0)|kv_mapper\.1|channelwise\.(0|4)|self_attn\.(q|k|v|out)_proj)"
ADAPTER = "trained"  # not "training": that is a torch Module attribute
Log = Callable[[str], None]


# Each setting's allowed values, as every message words them (the API's training spec uses the same).
ALLOWED = {
    "rank": "a whole number from 1 to 256",
    "steps": "a whole number from 1 to 1000000",
    "lr": "above 0 and at most 0.1",
    "text_encoder_lr": "above 0 and at most 0.1",
    "batch": "a whole number from 1 to 256",
    "resolution": "a multiple of 128 from 128 to 2048",
    "alpha": "above 0 and at most 1024",
    "preserve": "a whole number from 0 to 1000",
    "preserve_weight": "above 0 and at most 100",
    "decoder_min_t": "from 0 up to (not including) 1",
    "optimizer": "adamw or adamw8bit",
    "trigger_embedding": "off without a trigger word, whose own tokens it learns",
}


class TrainingError(ValueError):
    """A dataset or setting that cannot train: the message names the file or the field."""


@dataclass
class LoraTrainConfig:
    images: Path
    out: Path
    trigger: str | None = None
    rank: int = 8
    alpha: float | None = None  # default: the rank (scale 1)
    steps: int | None = None  # default: the model's (see defaults_for)
    lr: float | None = None
    batch: int | None = None
    resolution: int | None = None  # the long side; default: the model's own size
    seed: int = 0
    resume: Path | None = None
    sample_every: int = 0  # 0: no samples during training
    save_every: int = 0  # 0: checkpoints only on Ctrl-C or cancel
    decoder: bool | None = None  # default: the model's (the demo: yes, it must learn to draw what is new)
    text_encoder: bool | None = None  # also adapt the text encoder (kohya's TE LoRA); default: the model's
    text_encoder_lr: float | None = None  # default: the model's (the demo: 2e-3), else a tenth of lr
    trigger_embedding: bool | None = None  # also learn the trigger word's own tokens (at lr); default: the model's
    preserve: int | None = None  # pictures the base model draws to train beside yours (0: none); see preservation
    preserve_prompts: list[str] | None = None  # what it draws them from (default: see preservation)
    preserve_weight: float | None = None  # preservation's loss against your pictures' (kohya's prior_loss_weight)
    decoder_min_t: float | None = None  # Stage B learns your pictures at noise levels t >= this; default: the model's
    optimizer: str = "adamw"  # or "adamw8bit": bitsandbytes' 8-bit AdamW, on CUDA (a quarter of the moments' memory)
    sample_prompt: str | None = None
    extra: dict = field(default_factory=dict)


def defaults_for(engine: CascadeEngine) -> dict:
    """Settings that work for the model loaded: the tiny demo model learns fast and needs its decoder and its text
    encoder taught too (its Stage B reads shape from the caption, and a new word must mean something there); the
    official ones follow Stability's LoRA recipe (lr 1e-4, small batches on one GPU, the prior alone). The demo's
    Stage B learns the user's pictures only where shape is decided (t >= 0.3): its last steps draw the corners and
    edges of its flat shapes, and a LoRA trained there too drew squares with softer corners (bench/lora_recipes.py).
    Learning the trigger word's own tokens in place of the text encoder's LoRA reads every other prompt as before,
    but showed teal less (82%, and 72% with preservation at 3, where the cross kept its 82%: the README's recipes)."""
    size = engine.pipelines.defaults.get("width", 1024)
    if size <= 256:
        return dict(
            steps=600,
            lr=2e-3,
            batch=16,
            resolution=size,
            decoder=True,
            text_encoder=True,
            text_encoder_lr=2e-3,
            trigger_embedding=False,
            preserve=40,
            preserve_weight=1.0,
            decoder_min_t=0.3,
        )
    return dict(
        steps=1000,
        lr=1e-4,
        batch=1,
        resolution=1024,
        decoder=False,
        text_encoder=False,
        text_encoder_lr=None,
        trigger_embedding=False,
        preserve=0,
        preserve_weight=1.0,
        decoder_min_t=0.0,
    )


def resolve(cfg: LoraTrainConfig, engine: CascadeEngine) -> LoraTrainConfig:
    d = defaults_for(engine)
    values = {k: (getattr(cfg, k) if getattr(cfg, k) is not None else d[k]) for k in d}
    cfg = LoraTrainConfig(**(asdict(cfg) | values))
    alpha_given = cfg.alpha is not None  # else the rank's: a bad rank is said once, as the rank
    if not alpha_given:
        cfg.alpha = float(cfg.rank)
    checks = [
        ("rank", 1 <= cfg.rank <= 256),
        ("steps", 1 <= cfg.steps <= 1_000_000),
        ("lr", 0 < cfg.lr <= 0.1),
        ("text_encoder_lr", cfg.text_encoder_lr is None or 0 < cfg.text_encoder_lr <= 0.1),
        ("batch", 1 <= cfg.batch <= 256),
        ("resolution", cfg.resolution % 128 == 0 and 128 <= cfg.resolution <= 2048),
        ("alpha", 0 < cfg.alpha <= 1024 or not alpha_given),
        ("preserve", 0 <= cfg.preserve <= 1000),
        ("preserve_weight", 0 < cfg.preserve_weight <= 100),
        ("decoder_min_t", 0 <= cfg.decoder_min_t < 1),
        ("optimizer", cfg.optimizer in ("adamw", "adamw8bit")),
        ("trigger_embedding", not cfg.trigger_embedding or bool(cfg.trigger)),
    ]
    bad = [bad_field(name, ALLOWED[name], getattr(cfg, name)) for name, ok in checks if not ok]
    if bad:
        raise TrainingError("; ".join(bad))
    return cfg


# --- the dataset -----------------------------------------------------------------------------------------------------


@dataclass
class Example:
    source: Path
    image: Image.Image  # at its bucket's size
    caption: str


def buckets(resolution: int) -> list[tuple[int, int]]:
    """Sizes (w, h) of about resolution² pixels, multiples of 128: the model's own aspect buckets."""
    out = {(resolution, resolution)}
    for w in range(128, 2 * resolution + 1, 128):
        h = round(resolution * resolution / w / 128) * 128
        if 128 <= h <= 2048 and 0.25 <= w / h <= 4:
            out.add((w, h))
    return sorted(out)


def load_dataset(folder: Path, trigger: str | None, resolution: int, square_only: bool, log: Log) -> list[Example]:
    """Pictures and captions; each resized and centre-cropped to its nearest bucket, the log saying to how many."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"images: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrainingError(f"images: {folder} holds no .png, .jpg or .webp pictures")
    sizes = [(resolution, resolution)] if square_only else buckets(resolution)
    examples, resized, cropped = [], 0, 0
    for path in files:
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        if not caption and not trigger:
            raise TrainingError(
                f"images: {path.name} has no caption ({caption_file.name}) and no --trigger word "
                "was given to caption it with"
            )
        if trigger and trigger not in caption.split():
            caption = f"{trigger} {caption}".strip()
        try:
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except Exception as exc:  # noqa: BLE001 - a picture that will not open, whatever the reason
            raise TrainingError(f"images: {path.name} is not a picture that can be read ({exc})") from exc
        w, h = min(sizes, key=lambda s: abs(math.log((s[0] / s[1]) / (image.width / image.height))))
        if image.size != (w, h):
            resized += 1
            if abs(image.width / image.height - w / h) > 0.01:
                cropped += 1
            image = ImageOps.fit(image, (w, h), Image.Resampling.LANCZOS)
        examples.append(Example(path, image, caption))
    log(
        f"dataset: {len(examples)} pictures from {folder}; {resized} resized ({cropped} of them cropped to their "
        f"size's shape), {len(examples) - resized} already the right size; sizes used: "
        f"{sorted({e.image.size for e in examples})}"
    )
    return examples


def preservation(engine: CascadeEngine, examples: list[Example], cfg: LoraTrainConfig, log: Log) -> list[Example]:
    """DreamBooth's prior preservation: pictures the base model itself draws (kohya's regularisation images, made
    here instead of collected), on which the adapted model is held to the base model's own predictions while it
    learns the user's (kept_loss), so the LoRA learns what the trigger word adds and leaves what the model drew
    before alone. Drawn from `preserve_prompts`, else the model's own domain where it has one (the demo model: its
    scene prompts, never its held-out pairs), else the captions without the trigger."""
    if not cfg.preserve:
        return []
    prompts = cfg.preserve_prompts or domain_prompts(engine, cfg.preserve, cfg.seed)
    if not prompts and not cfg.trigger:
        log("preservation: skipped (it needs a trigger word to take out of the captions, or --preserve-prompts)")
        return []
    if not prompts:
        trigger = (cfg.trigger or "").lower()
        prompts = [" ".join(w for w in e.caption.split() if w.strip(",.").lower() != trigger) for e in examples]
    started = time.perf_counter()
    kept = []
    for i in range(cfg.preserve):
        prompt, (w, h) = prompts[i % len(prompts)], examples[i % len(examples)].image.size
        image = engine(engine.request(prompt=prompt, seed=cfg.seed + i, width=w, height=h)).images[0]
        kept.append(Example(Path(f"preservation-{i}"), image, prompt))
    log(
        f"preservation: the base model drew {len(kept)} pictures (prompts such as {kept[0].caption!r}) in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return kept


def domain_prompts(engine: CascadeEngine, n: int, seed: int) -> list[str]:
    """Prompts from what the model was trained on, where we know it: the demo model's scenes, every other one in
    the model's own caption phrasings (partial, reordered) as well as fully specified, so that what preservation
    keeps covers prompts as people write them too (bench/lora_recipes.py: with all of them fully specified, the cross
    moved eval-demo's partial prompts most)."""
    if engine.identity.preset != "demo":
        return []
    from .scenes import caption, sample_scene

    rng = random.Random(f"preservation-{seed}")
    scenes = [sample_scene(rng) for _ in range(n)]
    return [caption(scene, rng) if i % 2 else scene.prompt() for i, scene in enumerate(scenes)]


def dataset_hash(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(e.source.read_bytes())
        digest.update(e.caption.encode())
    return digest.hexdigest()[:12]


@dataclass
class Encoded:
    """The dataset as training reads it: one entry per size, every tensor on the device."""

    prior_latents: dict[tuple[int, int], torch.Tensor]
    decoder_latents: dict[tuple[int, int], torch.Tensor]
    hidden: dict[tuple[int, int], torch.Tensor]
    pooled: dict[tuple[int, int], torch.Tensor]
    empty: tuple[torch.Tensor, torch.Tensor]
    captions: dict[tuple[int, int], list[str]]  # encoded again each step when the text encoder learns too


@torch.no_grad()
def encode_dataset(engine: CascadeEngine, examples: list[Example], with_decoder: bool) -> Encoded:
    p = engine.pipelines
    device, dtype = p.device, p.dtype
    encoder = engine.image_encoder()
    by_size: dict[tuple[int, int], list[Example]] = {}
    for e in examples:
        by_size.setdefault(e.image.size, []).append(e)

    prior, decoder, hidden, pooled, captions = {}, {}, {}, {}, {}
    for size, group in by_size.items():
        pixels = torch.from_numpy(np.stack([np.asarray(e.image, dtype=np.float32) / 255 for e in group]))
        pixels = pixels.permute(0, 3, 1, 2).to(device, dtype)
        prior[size] = encode(encoder, pixels, *size)
        if with_decoder:
            decoder[size] = p.decoder.vqgan.encode(pixels).latents / p.decoder.vqgan.config.scale_factor
        captions[size] = [e.caption for e in group]
        hidden[size], pooled[size] = encode_text(engine, captions[size])
    return Encoded(prior, decoder, hidden, pooled, encode_text(engine, [""]), captions)


def encode_text(engine: CascadeEngine, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as the prior reads them (hidden states and pooled embedding), with gradients where they learn."""
    hidden, pooled, _, _ = engine.pipelines.prior.encode_prompt(
        device=engine.pipelines.device,
        batch_size=len(captions),
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        prompt=captions,
    )
    return hidden, pooled


# --- the LoRA --------------------------------------------------------------------------------------------------------


def add_adapter(model: torch.nn.Module, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """The training adapter on `model`; returns its parameters (the only ones that learn)."""
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0), model, adapter_name=ADAPTER
    )
    model.requires_grad_(False)
    params = []
    for name, param in model.named_parameters():
        if f".{ADAPTER}." in name:
            param.requires_grad_(True)
            params.append(param)
    base = next(p for n, p in model.named_parameters() if f".{ADAPTER}." not in n)
    for param in params:
        param.data = param.data.to(base.device, torch.float32)  # the adapter learns in fp32 whatever the model's dtype
    return params


def add_adapters(cfg: LoraTrainConfig, models: dict[str, torch.nn.Module], tokenizer) -> list[dict]:
    """Every training adapter `cfg` asks for, as optimizer groups with their rates: a LoRA on each model (the text
    encoder's only with `text_encoder`), and the trigger word's tokens with `trigger_embedding`."""
    groups = [
        {"params": add_adapter(models[role], cfg.rank, cfg.alpha), "lr": _lr_of(cfg, role)} for role in _lora_roles(cfg)
    ]
    if cfg.trigger_embedding:
        groups.append({"params": add_trigger_tokens(models["text_encoder"], tokenizer, cfg.trigger), "lr": cfg.lr})
    return groups


def add_trigger_tokens(text_encoder: torch.nn.Module, tokenizer, word: str) -> list[torch.nn.Parameter]:
    """peft's trainable tokens on the rows `word` is read as, starting from their values (the rest stay frozen)."""
    ids = word_tokens(tokenizer, word)
    embedding = next(n for n, m in text_encoder.named_modules() if m is text_encoder.get_input_embeddings())
    config = TrainableTokensConfig(target_modules=[embedding], token_indices=ids)
    vars(text_encoder).pop("peft_config", None)  # peft's record of the LoRA, if any: the layers know their adapters
    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    vars(text_encoder).pop("peft_config", None)  # and of this one
    layer = text_encoder.get_input_embeddings()
    param = layer.trainable_tokens_delta[ADAPTER]  # peft's name; it holds the rows' values, not a difference
    param.data = param.data.float()
    param.requires_grad_(True)
    return [param]


def trigger_tokens_note(tokenizer, trigger: str, captions: list[str]) -> str:
    """What learning the trigger's own tokens touches: the tokens, and the captions' other words that share one
    (a prompt with such a word reads differently while the LoRA is loaded)."""
    ids = word_tokens(tokenizer, trigger)
    words = {w.strip(",.").lower() for c in captions for w in c.split()} - {trigger.lower(), ""}
    shared = sorted(w for w in words if set(word_tokens(tokenizer, w)) & set(ids))
    note = (
        f"trigger embedding: {trigger!r} is read as {len(ids)} token(s) "
        f"({' '.join(tokenizer.convert_ids_to_tokens(ids))}), learnt here; prompts without them read as before"
    )
    if shared:
        note += (
            f". Other words in the captions share some of them ({', '.join(shared[:5])}), so prompts with those "
            "words change too: a trigger read as pieces of its own avoids this"
        )
    return note


def adapter_state(models: dict[str, torch.nn.Module], alpha: float, trigger: str | None = None) -> dict:
    """The training adapter as kohya/ComfyUI keys, and the trigger word's tokens as `bundle_emb.<word>.clip_g`."""
    out = {}
    for role, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, TrainableTokensLayer) and ADAPTER in module.trainable_tokens_delta:
                out[f"bundle_emb.{trigger}.clip_g"] = module.trainable_tokens_delta[ADAPTER].detach().float().cpu()
            if hasattr(module, "lora_A") and ADAPTER in module.lora_A:
                key = kohya_name(name, role)
                out[f"{key}.lora_down.weight"] = module.lora_A[ADAPTER].weight.detach().float().cpu().contiguous()
                out[f"{key}.lora_up.weight"] = module.lora_B[ADAPTER].weight.detach().float().cpu().contiguous()
                out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def load_adapter_state(models: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    for role, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, TrainableTokensLayer) and ADAPTER in module.trainable_tokens_delta:
                values = next(v for k, v in state.items() if k.startswith("bundle_emb."))
                module.trainable_tokens_delta[ADAPTER].data.copy_(values)
            if hasattr(module, "lora_A") and ADAPTER in module.lora_A:
                key = kohya_name(name, role)
                module.lora_A[ADAPTER].weight.data.copy_(state[f"{key}.lora_down.weight"])
                module.lora_B[ADAPTER].weight.data.copy_(state[f"{key}.lora_up.weight"])


# --- the loop --------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    step: int
    total: int
    loss: float  # smoothed over the last steps (an exponential average), the way a progress bar shows it
    steps_per_second: float
    eta: float
    sample: Path | None = None


def train_lora(
    engine: CascadeEngine,
    cfg: LoraTrainConfig,
    log: Log = print,
    progress: Callable[[Progress], None] | None = None,
    cancel: CancelToken | None = None,
) -> dict:
    """Train, write the LoRA file and its plot; return a summary (JSON-ready). The engine's model is adapted while
    this runs and is exactly as before once it returns (or fails)."""
    cfg = resolve(cfg, engine)
    cancel = cancel or CancelToken()
    p = engine.pipelines
    engine.remove_loras()
    parts = {"prior": p.prior.prior, "decoder": p.decoder.decoder, "text_encoder": p.prior.text_encoder}
    models = {role: parts[role] for role in _roles(cfg)}
    square = engine.pipelines.defaults.get("width", 1024) <= 256  # the demo model makes one size only
    examples = load_dataset(cfg.images, cfg.trigger, cfg.resolution, square, log)
    kept = preservation(engine, examples, cfg, log)
    started = time.perf_counter()
    data = encode_dataset(engine, examples, bool(cfg.decoder))
    keep = encode_dataset(engine, kept, bool(cfg.decoder)) if kept else None
    log(f"encoded {len(examples) + len(kept)} pictures and captions in {time.perf_counter() - started:.1f} s")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stack = LoraStack(models)
    try:
        with torch.random.fork_rng(devices=[]), engine.layers_lock:  # starting values from the seed: runs repeat
            torch.manual_seed(cfg.seed)
            groups = add_adapters(cfg, models, p.prior.tokenizer)
        if cfg.trigger_embedding:
            log(trigger_tokens_note(p.prior.tokenizer, cfg.trigger, [e.caption for e in examples + kept]))
        return _loop(engine, cfg, models, groups, data, keep, examples, out, log, progress, cancel)
    finally:
        with engine.layers_lock:
            stack.unload()  # the very same base layers back, whatever happened
        engine.clear_caches()
        for model in models.values():
            model.eval()


def _lr_of(cfg: LoraTrainConfig, role: str) -> float:
    """The text encoder learns at its own rate (a tenth of the rest unless told): it reads every prompt."""
    if role != "text_encoder":
        return cfg.lr
    return cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.lr / 10


def _loop(engine, cfg, models, groups, data, keep, examples, out, log, progress, cancel) -> dict:
    p = engine.pipelines
    device = p.device
    v_target = isinstance(p.prior.scheduler, VPredictionWuerstchenScheduler)
    optimizer = make_optimizer(cfg, groups, device)
    params = [q for group in groups for q in group["params"]]
    rates = [group["lr"] for group in groups]
    start_step, losses = 0, []
    if cfg.resume:
        start_step, losses = _resume(cfg, models, optimizer, log)
    generator = torch.Generator().manual_seed(cfg.seed + start_step)
    rng = random.Random(cfg.seed + start_step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nothing()
    for model in models.values():
        model.train()
        if device.type == "cuda" and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
    window, t0, last_sample, smooth = [], time.perf_counter(), None, None
    step = start_step
    try:
        for step in range(start_step, cfg.steps):
            if cancel.cancelled:
                raise GenerationCancelled
            with autocast:
                # Without preservation a tenth of the captions are dropped, so guidance's empty caption learns the
                # pictures too; with it the empty caption stays the base model's (kept_loss pins it).
                drop_share = 0.1 if keep is None else 0.0
                loss = _batch_loss(engine, models, data, rng, cfg, generator, v_target, drop_share)
                if keep is not None:
                    loss = loss + cfg.preserve_weight * kept_loss(engine, models, keep, rng, cfg, generator, v_target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for group, rate in zip(optimizer.param_groups, rates):
                group["lr"] = rate * min(1.0, (step + 1) / 50)  # a short warm-up, then the rate as given
            optimizer.step()
            window.append(loss.item())
            smooth = window[-1] if smooth is None else 0.9 * smooth + 0.1 * window[-1]  # what the progress shows
            done = step + 1
            if done % 10 == 0 or done == cfg.steps:
                losses.append(sum(window) / len(window))
                window = []
            if cfg.sample_every and done % cfg.sample_every == 0:
                last_sample = _sample(engine, cfg, examples, out, done)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                _checkpoint(cfg, models, optimizer, done, losses, out, engine, examples, log)
            if progress is not None:
                rate = (done - start_step) / max(1e-9, time.perf_counter() - t0)
                progress(
                    Progress(
                        done,
                        cfg.steps,
                        smooth,
                        rate,
                        (cfg.steps - done) / max(rate, 1e-9),
                        last_sample,
                    )
                )
    except (KeyboardInterrupt, GenerationCancelled):
        path = _checkpoint(cfg, models, optimizer, step, losses, out, engine, examples, log)
        log(
            f"stopped at step {step} of {cfg.steps}; the LoRA so far is in {path}. Resume with: cascade-studio "
            f"train-lora {cfg.images} --out {cfg.out} --resume {path.with_suffix('.resume.safetensors')} "
            f"--steps {cfg.steps}"
        )
        raise
    seconds = time.perf_counter() - t0
    write_lora(out, adapter_state(models, cfg.alpha, cfg.trigger), _metadata(cfg, engine, examples, cfg.steps))
    plot_losses(losses, out.with_suffix(".loss.png"))
    sample = _sample(engine, cfg, examples, out, cfg.steps)
    log(
        f"trained {cfg.steps - start_step} steps in {seconds:.0f} s -> {out} (loss plot {out.with_suffix('.loss.png')})"
    )
    return {
        "file": str(out),
        "steps": cfg.steps,
        "seconds": round(seconds, 1),
        "final_loss": losses[-1],
        "losses": losses,
        "sample": str(sample),
        "pictures": len(examples),
    }


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _noised(x0: torch.Tensor, generator: torch.Generator, v_target: bool, high_noise_share: float, lowest_t=0.0):
    t = sample_t(x0.shape[0], generator, high_noise_share, lowest_t).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    a = alpha_cumprod(t).to(x0.device).view(-1, *[1] * (x0.dim() - 1))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_target else noise
    return x_t, t, target


def make_optimizer(cfg: LoraTrainConfig, params: list, device: torch.device):
    """AdamW; or bitsandbytes' 8-bit AdamW on CUDA (TrainingError, saying what is missing, anywhere else). `params`:
    parameters, or parameter groups with their own rates."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    if device.type != "cuda":
        raise TrainingError(f"optimizer: adamw8bit runs on CUDA only (this model is on {device.type}); use adamw")
    try:
        import bitsandbytes
    except ImportError:
        raise TrainingError("optimizer: adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
    return bitsandbytes.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=1e-2)


def _pick(data: Encoded, rng: random.Random, batch: int) -> tuple[tuple[int, int], list[int]]:
    size = rng.choice(sorted(data.prior_latents))
    return size, [rng.randrange(len(data.prior_latents[size])) for _ in range(batch)]


def _text(engine, data: Encoded, size, idx, drop: torch.Tensor, live: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's captions as the prior reads them, those in `drop` replaced by the empty caption (as guidance uses
    it). `live`: through the text encoder as it is now (it learns too), else as encoded at the start."""
    if live:
        return encode_text(engine, ["" if d else data.captions[size][i] for i, d in zip(idx, drop.tolist())])
    hidden, pooled = data.hidden[size][idx], data.pooled[size][idx]
    if drop.any():
        hidden, pooled = hidden.clone(), pooled.clone()
        hidden[drop], pooled[drop] = data.empty[0].to(hidden.dtype), data.empty[1].to(pooled.dtype)
    return hidden, pooled


def _drop(n: int, generator: torch.Generator, share: float) -> torch.Tensor:
    return torch.rand(n, generator=generator) < share


def _batch_loss(engine, models, data: Encoded, rng, cfg, generator, v_target, drop_share: float) -> torch.Tensor:
    """The user's pictures: the model's own target (v or the noise) for the prior, and Stage B when it learns."""
    size, idx = _pick(data, rng, cfg.batch)
    drop = _drop(len(idx), generator, drop_share)
    text = _text(engine, data, size, idx, drop, "text_encoder" in models)
    loss = prior_loss(models["prior"], data, size, idx, generator, v_target, text)
    if "decoder" in models:
        x_t, t, target, effnet = _decoder_inputs(data, size, idx, drop, generator, v_target, cfg.decoder_min_t)
        pred = models["decoder"](x_t, t, clip_text_pooled=text[1], effnet=effnet).sample
        loss = loss + F.mse_loss(pred.float(), target.float())
    return loss


def prior_loss(prior, data: Encoded, size, idx, generator, v_target, text=None) -> torch.Tensor:
    x0 = data.prior_latents[size][idx]
    hidden, pooled = text or _text(None, data, size, idx, _drop(len(idx), generator, 0.1), live=False)
    x_t, t, target = _noised(x0, generator, v_target, 0.5)
    pred = prior(x_t, t.to(x0.dtype), clip_text_pooled=pooled, clip_text=hidden, clip_img=_no_image(prior, x0)).sample
    return F.mse_loss(pred.float(), target.float())


def _no_image(prior, x0: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x0.shape[0], 1, prior.config.clip_image_in_channels, device=x0.device, dtype=x0.dtype)


def _decoder_inputs(data: Encoded, size, idx, drop: torch.Tensor, generator, v_target, min_t=0.0) -> tuple:
    """Stage B's noised latents, time, target and its Stage C condition (jittered; zero in `drop`'s rows, which is
    what the decoder's guidance runs with beside the empty caption). `min_t` (the user's pictures: the setting
    decoder_min_t): noised to t >= min_t only, so that Stage B's adapters leave the last steps to the base model;
    preservation still covers every step. At 0, a quarter of the batch from the upper half, as the prior's."""
    x0 = data.decoder_latents[size][idx]
    effnet = data.prior_latents[size][idx]
    effnet = effnet + 0.1 * torch.randn(effnet.shape, generator=generator).to(effnet.device, effnet.dtype)
    effnet = effnet * (~drop).to(effnet.device, effnet.dtype).view(-1, 1, 1, 1)
    x_t, t, target = _noised(x0, generator, v_target, 0.0 if min_t else 0.25, min_t)
    return x_t, t.to(x0.dtype), target, effnet


def kept_loss(engine, models, keep: Encoded, rng, cfg, generator, v_target) -> torch.Tensor:
    """Preservation as distillation: on the base model's own pictures, noised to any step and with their captions (a
    quarter of them empty, with Stage B's condition zeroed too: what guidance reads), the adapted model is pulled to
    predict what the base model (the adapters switched off) predicts there. This pins the model's output itself on
    what it already draws, where training on the pictures alone only pins it near them; the LoRA is left free only
    where the trigger word is."""
    size, idx = _pick(keep, rng, max(1, cfg.batch // 2))
    drop, live = _drop(len(idx), generator, 0.25), "text_encoder" in models
    x0 = keep.prior_latents[size][idx]
    x_t, t, _ = _noised(x0, generator, v_target, 0.5)
    dec = _decoder_inputs(keep, size, idx, drop, generator, v_target) if "decoder" in models else None

    def predict() -> list[torch.Tensor]:
        hidden, pooled = _text(engine, keep, size, idx, drop, live)
        prior = models["prior"]
        out = [prior(x_t, t.to(x0.dtype), clip_text_pooled=pooled, clip_text=hidden, clip_img=_no_image(prior, x0))]
        if dec is not None:
            out.append(models["decoder"](dec[0], dec[1], clip_text_pooled=pooled, effnet=dec[3]))
        return [o.sample.float() for o in out]

    with torch.no_grad(), adapters_off(models):
        want = predict()
    return sum(F.mse_loss(got, w) for got, w in zip(predict(), want))


@contextmanager
def adapters_off(models: dict[str, torch.nn.Module]):
    """The base model, for as long as the block runs: every adapter layer switched off (peft's own switch)."""
    layers = [m for model in models.values() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _metadata(cfg: LoraTrainConfig, engine: CascadeEngine, examples: list[Example], steps: int) -> dict[str, str]:
    ident = engine.identity
    return {
        "cascade_studio.version": __version__,
        "cascade_studio.base_model": ident.name,
        "cascade_studio.base_identity": ident.model_dump_json(),
        "cascade_studio.rank": str(cfg.rank),
        "cascade_studio.alpha": str(cfg.alpha),
        "cascade_studio.trigger_words": cfg.trigger or "",
        "cascade_studio.caption_words": " ".join(
            sorted({w for e in examples for w in e.caption.lower().split()})[:500]
        ),
        "cascade_studio.steps": str(steps),
        "cascade_studio.resolution": str(cfg.resolution),
        "cascade_studio.learning_rate": str(cfg.lr),
        "cascade_studio.dataset_hash": dataset_hash(examples),
        "cascade_studio.pictures": str(len(examples)),
        "cascade_studio.preservation_pictures": str(cfg.preserve),
        "cascade_studio.preservation_weight": str(cfg.preserve_weight),
        "cascade_studio.decoder_min_t": str(cfg.decoder_min_t),  # Stage B learnt your pictures at t >= this
        "cascade_studio.adapts": ",".join(  # the key prefixes of the parts trained, not every part a LoRA may have
            KOHYA_PREFIX[role].removesuffix("_") for role in _lora_roles(cfg)
        ),
        "cascade_studio.trigger_embedding": str(bool(cfg.trigger_embedding)).lower(),
        "ss_network_dim": str(cfg.rank),  # kohya's names for the same, which other tools show
        "ss_network_alpha": str(cfg.alpha),
        "ss_prior_loss_weight": str(cfg.preserve_weight),
    }


def _lora_roles(cfg: LoraTrainConfig) -> list[str]:
    """The models a LoRA adapts: the prior, Stage B with `decoder`, the text encoder with `text_encoder`."""
    return ["prior"] + ["decoder"] * bool(cfg.decoder) + ["text_encoder"] * bool(cfg.text_encoder)


def _roles(cfg: LoraTrainConfig) -> list[str]:
    """The models that learn: those a LoRA adapts, and the text encoder when the trigger word's tokens learn."""
    return _lora_roles(cfg) + ["text_encoder"] * bool(cfg.trigger_embedding and not cfg.text_encoder)


def write_lora(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """The LoRA file, atomically (a checkpoint never leaves a half-written file under its name)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _checkpoint(cfg, models, optimizer, step: int, losses, out: Path, engine, examples, log) -> Path:
    """The LoRA at `step` (a usable file), and beside it what resuming needs: optimizer moments and the losses."""
    path = out.with_name(f"{out.stem}-step{step}.safetensors")
    write_lora(path, adapter_state(models, cfg.alpha, cfg.trigger), _metadata(cfg, engine, examples, step))
    moments = {}
    for i, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                moments[f"{i}.{key}"] = state[key].detach().cpu().contiguous()
    resume = {"step": str(step), "losses": json.dumps(losses), "lora": path.name}
    save_file(moments or {"none": torch.zeros(1)}, str(path.with_suffix(".resume.safetensors")), metadata=resume)
    log(f"checkpoint at step {step}: {path}")
    return path


def _resume(cfg: LoraTrainConfig, models, optimizer, log) -> tuple[int, list[float]]:
    path = Path(cfg.resume)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "step" not in meta:
        raise TrainingError(f"resume: {path.name} is not a checkpoint's .resume.safetensors file")
    lora = path.with_name(meta["lora"])
    state = load_file(str(lora))
    _check_resumable(cfg, models, state, lora)
    load_adapter_state(models, state)
    moments = load_file(str(path))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, param in enumerate(params):
        if f"{i}.exp_avg" in moments:
            optimizer.state[param] = {
                "step": torch.tensor(float(meta["step"])),
                "exp_avg": moments[f"{i}.exp_avg"].to(param.device),
                "exp_avg_sq": moments[f"{i}.exp_avg_sq"].to(param.device),
            }
    log(f"resuming from step {meta['step']} ({path.name})")
    return int(meta["step"]), json.loads(meta["losses"])


def _check_resumable(cfg: LoraTrainConfig, models, state: dict[str, torch.Tensor], lora: Path) -> None:
    """A checkpoint resumes only a training set up as it was: the same tensors, of the same shapes. Otherwise say
    which settings it was trained with, rather than fail on the first tensor that does not fit."""
    want = {k: tuple(v.shape) for k, v in adapter_state(models, cfg.alpha, cfg.trigger).items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want == got:
        return
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata() or {}
    said = {"rank": "rank", "trigger": "trigger_words", "parts": "adapts", "trigger_embedding": "trigger_embedding"}
    theirs = ", ".join(f"{name} {meta.get('cascade_studio.' + key) or '(none)'}" for name, key in said.items())
    misfits = len(want.keys() ^ got.keys()) + sum(want[k] != got[k] for k in want.keys() & got.keys())
    raise TrainingError(
        f"resume: {lora.name} was trained with other settings ({theirs}): resume with those "
        f"({misfits} tensors differ between it and this run's LoRA)"
    )


def _sample(engine: CascadeEngine, cfg: LoraTrainConfig, examples: list[Example], out: Path, step: int) -> Path:
    """A picture from the LoRA as it is now: the first caption (or --sample-prompt), a fixed seed."""
    prompt = cfg.sample_prompt or examples[0].caption
    engine.clear_caches()
    for model in (engine.pipelines.prior.prior, engine.pipelines.decoder.decoder):
        model.eval()
    image = engine(make_request(**(engine.pipelines.defaults | {"prompt": prompt, "seed": cfg.seed}))).images[0]
    for model in (engine.pipelines.prior.prior, engine.pipelines.decoder.decoder):
        model.train()
    path = out.with_name(f"{out.stem}.sample-{step}.png")
    image.save(path)
    return path


def plot_losses(losses: list[float], path: Path) -> None:
    from .run import plot_losses as plot

    plot({"LoRA loss (mean of 10 steps)": losses or [0.0]}, path)
