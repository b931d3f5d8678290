"""The three stages of the demo model and how each is trained, on 2 CPU cores.

Recipe (see ../../../../shared/notes/demo-model-calibration.md for what failed before and why):
- all denoisers predict v, on the same cosine schedule the sampler uses (t ~ U(0, 1) given as timestep_ratio);
- Stage A (PaellaVQModel) is a plain autoencoder: the pipeline decodes unquantised latents; its decoder half can
  train on alone later (`train-demo --from DIR --stage a-decoder`), which leaves the latents as they were;
- Stage B (decoder) learns jointly with a small image encoder, the stand-in for EfficientNet, whose output ends
  in a non-affine BatchNorm so that Stage C latents have unit variance; its loss weighs the positions in and
  around a shape 11x (with a plain mean it learnt backgrounds only; with shapes alone weighted, it drew swollen,
  merged blobs); here the decoder ignores text (its pooled-text mapper is frozen at zero), so it does not depend
  on a text encoder that is trained later;
- Stage C (prior) learns on precomputed image-encoder latents, so its steps touch no pixels; its text encoder is
  trained with it, helped by a small auxiliary loss that reads the caption's attributes off the pooled embedding;
- Stage B text: the decoder trained further with C's pooled text (both encoders frozen), as the official decoder
  reads the prompt (measured: the trained demo decoder's pixels barely depend on it; the steps are what help);
- the image tower (image prompts): a small CLIP vision tower taught through the frozen prior, whose image mapper's
  weight alone learns with it, so prompts without a picture give what they gave before;
- Stage C low noise: the prior trained on at little noise with a few captions naming the wrong colour, so that
  image-to-image at low strength keeps the picture's colours (train_prior_low_noise says why).
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.image_encoder import ImageEncoder  # noqa: F401 - trained here, used by models/ and train/
from .scenes import PALETTE, POSITIONS, SHAPES, SIZES, Scene, caption, mentioned, render, sample_scene

Log = Callable[[str], None]


def alpha_cumprod(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """The cosine schedule of DDPMWuerstchenScheduler, so training noise matches sampling noise exactly."""
    s_t = torch.tensor(s)
    init = torch.cos(s_t / (1 + s_t) * math.pi * 0.5) ** 2
    return (torch.cos((t + s_t) / (1 + s_t) * math.pi * 0.5) ** 2 / init).clamp(1e-4, 0.9999)


def sample_t(n: int, generator: torch.Generator, high_noise_share: float = 0.0, lowest: float = 0.0) -> torch.Tensor:
    """t ~ U(lowest, 1); a share of the batch (with lowest 0) from U(0.5, 1), where conditioning matters most."""
    t = lowest + (1 - lowest) * torch.rand(n, generator=generator)
    k = int(n * high_noise_share)
    t[:k] = 0.5 + 0.5 * t[:k]
    return t


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def v_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """v-prediction loss, optionally a weighted mean over positions (weight: B x 1 x H x W). Noise comes from the
    CPU generator on every device, so a seed means the same data."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = t.to(x0.device)
    a = alpha_cumprod(t).view(-1, *[1] * (x0.dim() - 1))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    if weight is None:
        return F.mse_loss(model(x_t, t), v)
    return ((model(x_t, t) - v) ** 2 * weight).sum() / (weight.sum() * x0.shape[1])


def prior_loss(
    prior: nn.Module,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    clip_img: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Stage C's v-loss on latents `x0` under their captions (hidden states and pooled embedding) and image embeddings
    `clip_img` (B x 1 x D; zeros where there is no image prompt)."""

    def model(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return prior(x, r, clip_text_pooled=pooled.unsqueeze(1), clip_text=hidden, clip_img=clip_img).sample

    return v_loss(model, x0, t, generator)


SIDE = 128  # training images: Stage C latents 16x3x3 (one cell per named place), Stage B latents 4x32x32
ENCODER_SIDE = 96  # the image encoder sees scenes at 3/4 size: four stride-2 convs give 6x6, pooled evenly to 3x3


def encoder_view(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, size=(ENCODER_SIDE, ENCODER_SIDE), mode="area")


class EMA:
    """Exponential moving average of a model's weights, for sampling."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, p in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(p, 1 - self.decay)
        for ema, b in zip(self.model.buffers(), model.buffers()):
            ema.copy_(b)


def schedule(
    optimizer: torch.optim.Optimizer, steps: int, lr: float, warmup: int = 100
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 10%."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    for group in optimizer.param_groups:
        group["lr"] = lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimise(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, clip: list[nn.Parameter] | None = None) -> None:
    """One optimiser step: backward, optional gradient clipping at 1.0, step, learning-rate schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


def scene_images(
    rng: random.Random, n: int, side: int = SIDE, any_colour: float = 0.0
) -> tuple[torch.Tensor, list[Scene]]:
    """n scenes as a B x 3 x side x side batch in 0-1. `any_colour`: the share whose two colours are replaced by two
    random ones (a scene is drawn in exactly two colours, so the swap is exact)."""
    scenes = [sample_scene(rng) for _ in range(n)]
    arrays = [np.asarray(render(s, side, rng), dtype=np.float32) / 255 for s in scenes]
    for i, scene in enumerate(scenes):
        if any_colour and rng.random() < any_colour:
            shape = (arrays[i] == np.array(PALETTE[scene.colour], dtype=np.float32) / 255).all(axis=2, keepdims=True)
            colours = [np.array([rng.random() for _ in range(3)], dtype=np.float32) for _ in range(2)]
            arrays[i] = np.where(shape, colours[0], colours[1])
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), scenes


def run_steps(name: str, steps: int, step_fn: Callable[[int], float], log: Log, every: int) -> list[float]:
    """Call step_fn(step) `steps` times; log and return the mean loss of every `every` steps (the loss curve)."""
    losses, start, window = [], time.perf_counter(), []
    for step in range(steps):
        window.append(step_fn(step))
        if (step + 1) % every == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            window = []
            log(f"{name} step {step + 1}/{steps} loss {losses[-1]:.4f} ({time.perf_counter() - start:.0f}s)")
    return losses


def train_stage_a(
    vqgan: nn.Module,
    steps: int,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    batch: int = 16,
    crop: int = 64,
    decoder_only: bool = False,
    any_colour: float = 0.0,
) -> list[float]:
    """Autoencoder on random crops; latents get light noise so the decoder's imperfect output still decodes.

    `decoder_only` trains the decoder half alone, its encoder frozen: the latents, and every stage trained on them,
    keep their meaning while the reconstructions sharpen (measured: corners and tips were what a short stage A
    lost, and the shape scores with them). `any_colour`: the share of pictures in random colours, so that Stage A
    draws colours the scenes never use, as the official Stage A does (a LoRA's new colour needs it)."""
    if decoder_only:
        vqgan.eval().requires_grad_(False)  # the encoder's BatchNorm keeps its statistics
        parts = [vqgan.up_blocks, vqgan.out_block]
        for part in parts:
            part.train().requires_grad_(True)
        params = [p for part in parts for p in part.parameters()]
    else:
        params = list(vqgan.parameters())
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = schedule(opt, steps, 1e-3 if decoder_only else 2e-3)
    device = device_of(vqgan)

    def step(_: int) -> float:
        images, _ = scene_images(rng, batch, any_colour=any_colour)
        y, x = rng.randrange(0, SIDE - crop + 1, 8), rng.randrange(0, SIDE - crop + 1, 8)
        images = images[:, :, y : y + crop, x : x + crop].to(device)
        with torch.set_grad_enabled(not decoder_only):
            h = vqgan.encode(images).latents
        h = h + 0.05 * h.detach().std() * torch.randn(h.shape, generator=gen).to(device)
        loss = F.mse_loss(vqgan.decode(h).sample, images)
        optimise(opt, sched, loss)
        return loss.item()

    name = "stage A decoder" if decoder_only else "stage A"
    return run_steps(name, steps, step, log, every=max(1, steps // 20))


def foreground(images: torch.Tensor, scenes: list[Scene], side: int) -> torch.Tensor:
    """B x 1 x side x side, 1 where any pixel of that latent position differs from the scene's background."""
    background = torch.tensor([PALETTE[s.background] for s in scenes], dtype=images.dtype).view(-1, 3, 1, 1) / 255
    differs = ((images - background).abs().sum(1, keepdim=True) > 0.1).float()
    return F.adaptive_max_pool2d(differs, side).to(torch.uint8)


@dataclass
class DecoderData:
    """Scenes encoded once for Stage B, so its steps are cheap."""

    latents: torch.Tensor  # Stage A latents divided by `scale` (unit variance)
    small: torch.Tensor  # the image encoder's view, uint8
    masks: torch.Tensor  # 1 where a latent position shows a shape
    scenes: list[Scene]  # for captions
    scale: float


@torch.no_grad()
def decoder_dataset(vqgan: nn.Module, n: int, rng: random.Random, log: Log, scale: float | None = None) -> DecoderData:
    """n scenes for the decoder; `scale` defaults to the latents' own std (a trained model keeps its own)."""
    latents, small, masks, all_scenes = [], [], [], []
    for i in range(0, n, 64):
        images, scenes = scene_images(rng, min(64, n - i))
        latents.append(vqgan.encode(images.to(device_of(vqgan))).latents.cpu())
        small.append((encoder_view(images) * 255).round().to(torch.uint8))
        masks.append(foreground(images, scenes, latents[-1].shape[-1]))
        all_scenes += scenes
    latents_t = torch.cat(latents)
    scale = float(latents_t.std()) if scale is None else scale
    log(f"encoded {n} scenes for the decoder; Stage A latent std {float(latents_t.std()):.3f}")
    return DecoderData(latents_t / scale, torch.cat(small), torch.cat(masks), all_scenes, scale)


def train_stage_b(
    decoder: nn.Module,
    encoder: ImageEncoder,
    data: DecoderData,
    steps: int,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    batch: int = 16,
    foreground_weight: float = 10.0,
    extra: tuple[list[nn.Parameter], Callable[[], torch.Tensor]] | None = None,
) -> list[float]:
    """Decoder + image encoder, jointly, with v-loss on unit-variance Stage A latents. Shapes cover a few percent of
    the latent, so a plain mean lets the decoder learn the background and little else: positions in and around a
    shape weigh 1 + foreground_weight (see `decoder_loss`). `extra`: more parameters, and a loss added to every
    step's (bench/frozen_encoder.py keeps an encoder's label head learning so); the losses returned are the v-loss's."""
    mapper = text_blind(decoder)
    params = [p for p in decoder.parameters() if p.requires_grad] + list(encoder.parameters())
    params += extra[0] if extra else []
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = schedule(opt, steps, 1e-3)
    device = device_of(decoder)
    no_text = torch.zeros(batch, 1, mapper.in_features, device=device)

    def step(_: int) -> float:
        idx = [rng.randrange(len(data.latents)) for _ in range(batch)]
        effnet, _ = noisy_effnet(encoder(data.small[idx].to(device).float() / 255), gen)
        loss = decoder_loss(decoder, data, idx, effnet, no_text, gen, foreground_weight)
        optimise(opt, sched, (loss + extra[1]()) if extra else loss, clip=params)
        return loss.item()

    return run_steps("stage B", steps, step, log, every=max(1, steps // 20))


def text_blind(decoder: nn.Module) -> nn.Module:
    """Freeze the decoder's pooled-text mapper at zero, so it draws from the image latent alone; returns the mapper
    (stage B text later unfreezes it and starts from this text-blind decoder)."""
    mapper = decoder.clip_txt_pooled_mapper
    mapper.weight.data.zero_()
    mapper.weight.requires_grad_(False)
    return mapper


def decoder_loss(
    decoder: nn.Module,
    data: DecoderData,
    idx: list[int],
    effnet: torch.Tensor,
    pooled: torch.Tensor,
    gen: torch.Generator,
    foreground_weight: float,
    margin: int = 2,
) -> torch.Tensor:
    """v-loss on the chosen scenes; positions that show a shape, or lie within `margin` positions of one, weigh
    1 + foreground_weight. The margin keeps the weight even across a shape's edge: weighting the shape alone makes
    the best guess, wherever the decoder is unsure, "shape", and it drew every shape as a swollen round blob."""
    device = effnet.device
    t = sample_t(len(idx), gen, high_noise_share=0.25)
    near = F.max_pool2d(data.masks[idx].to(device).float(), 2 * margin + 1, stride=1, padding=margin)
    weight = 1 + foreground_weight * near
    return v_loss(
        lambda x, r: decoder(x, r, clip_text_pooled=pooled, effnet=effnet).sample,
        data.latents[idx].to(device),
        t,
        gen,
        weight,
    )


def noisy_effnet(effnet: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Jitter (std up to 0.15) so the decoder tolerates the prior's errors; 10% zeroed: the unconditional branch
    of decoder guidance. Returns the latents and which rows kept their conditioning."""
    batch = effnet.shape[0]
    jitter = torch.rand(batch, 1, 1, 1, generator=gen) * 0.15 * torch.randn(effnet.shape, generator=gen)
    keep = (torch.rand(batch, 1, 1, 1, generator=gen) > 0.1).to(effnet.device)
    return (effnet + jitter.to(effnet.device)) * keep, keep.flatten()


def train_decoder_text(
    decoder: nn.Module,
    encoder: ImageEncoder,
    text_encoder: nn.Module,
    tokenizer,
    data: DecoderData,
    steps: int,
    lr: float,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    batch: int = 16,
    foreground_weight: float = 10.0,
) -> list[float]:
    """Stage B again, now also reading the caption, as the official decoder does through its pooled-text mapper.

    Runs after Stage C because it needs C's text encoder (frozen here, like the image encoder, so the prior's
    latents keep their meaning). The Stage C latent is 3x3, so the caption could tell the decoder what the latent
    holds only roughly (which shape, how many); measured on the trained demo decoders, they barely use it
    (changing the shape word moves their pixels by 0.2-0.4%, `eval-demo --stage decoder`). The mapper starts at
    zero, so training starts from the text-blind decoder. Rows whose image latent is dropped (the unconditional
    branch of guidance) get the empty caption, as the pipeline's negative prompt; 10% more drop the caption alone.
    """
    mapper = decoder.clip_txt_pooled_mapper
    mapper.weight.requires_grad_(True)
    encoder.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    params = [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = schedule(opt, steps, lr)
    device = device_of(decoder)

    def step(_: int) -> float:
        idx = [rng.randrange(len(data.latents)) for _ in range(batch)]
        with torch.no_grad():
            effnet, keep = noisy_effnet(encoder(data.small[idx].to(device).float() / 255), gen)
            texts = [caption(data.scenes[i], rng) if k and rng.random() > 0.1 else "" for i, k in zip(idx, keep)]
            pooled = encode_captions(text_encoder, tokenizer, texts)[1].unsqueeze(1)
        loss = decoder_loss(decoder, data, idx, effnet, pooled, gen, foreground_weight)
        optimise(opt, sched, loss, clip=params)
        return loss.item()

    return run_steps("stage B text", steps, step, log, every=max(1, steps // 20))


@torch.no_grad()
def encode_dataset(encoder: ImageEncoder, n: int, rng: random.Random, log: Log) -> tuple[torch.Tensor, list[Scene]]:
    """Stage C training data: the frozen image encoder's latent for n fresh scenes."""
    encoder.eval()
    latents, scenes = [], []
    for i in range(0, n, 256):
        images, batch_scenes = scene_images(rng, min(256, n - i))
        latents.append(encoder(encoder_view(images.to(device_of(encoder)))).cpu())
        scenes += batch_scenes
    log(f"encoded {n} scenes for the prior")
    return torch.cat(latents), scenes


def encode_captions(text_encoder: nn.Module, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states and pooled embedding of captions padded to the tokenizer's length: what the pipelines
    feed the prior (both) and the decoder (the pooled one)."""
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).to(device_of(text_encoder))
    out = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    return out.hidden_states[-1], out.text_embeds


# Attributes the text encoder's pooled output is taught to carry (auxiliary heads, dropped after training).
AUX_LABELS = {
    "background": list(PALETTE),
    "colour": list(PALETTE),
    "shape": list(SHAPES),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "count": [1, 2, 3],
}


def _aux_targets(scenes: list[Scene], texts: list[str]) -> dict[str, torch.Tensor]:
    targets = {k: [] for k in AUX_LABELS}
    for scene, text in zip(scenes, texts):
        said = mentioned(scene, text) if text else dict.fromkeys(("background", "size", "position"), False)
        for key, labels in AUX_LABELS.items():
            known = bool(text) and said.get(key, True)
            targets[key].append(labels.index(getattr(scene, key)) if known else -100)
    return {k: torch.tensor(v) for k, v in targets.items()}


def train_stage_c(
    prior: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    latents: torch.Tensor,
    scenes: list[Scene],
    steps: int,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    batch: int = 128,
    ema_decay: float = 0.998,
) -> tuple[list[float], EMA, EMA]:
    """Prior + text encoder with v-loss on image-encoder latents; 10% empty captions for guidance."""
    dim = text_encoder.config.projection_dim
    device = device_of(prior)
    heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in AUX_LABELS.items()}).to(device)
    params = list(prior.parameters()) + list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    sched = schedule(opt, steps, 1e-3, warmup=200)
    ema_prior, ema_text = EMA(prior, ema_decay), EMA(text_encoder, ema_decay)
    no_image = torch.zeros(batch, 1, prior.config.clip_image_in_channels, device=device)

    def step(_: int) -> float:
        idx = [rng.randrange(len(scenes)) for _ in range(batch)]
        texts = [caption(scenes[i], rng) if rng.random() > 0.1 else "" for i in idx]
        hidden, pooled = encode_captions(text_encoder, tokenizer, texts)
        t = sample_t(batch, gen, high_noise_share=0.5)
        loss = prior_loss(prior, hidden, pooled, no_image, latents[idx].to(device), t, gen)
        targets = {k: v.to(device) for k, v in _aux_targets([scenes[i] for i in idx], texts).items()}
        aux = sum(
            F.cross_entropy(heads[k](pooled), targets[k], ignore_index=-100)
            for k in AUX_LABELS
            if (targets[k] != -100).any()
        )
        optimise(opt, sched, loss + 0.1 * aux, clip=params)
        ema_prior.update(prior)
        ema_text.update(text_encoder)
        return loss.item()

    return run_steps("stage C", steps, step, log, every=max(1, steps // 40)), ema_prior, ema_text


def train_prior_low_noise(
    prior: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    latents: torch.Tensor,
    scenes: list[Scene],
    steps: int,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    wrong_colour: float = 0.05,
    batch: int = 128,
) -> tuple[list[float], EMA]:
    """Stage C trained on, its text encoder frozen: half of each batch at little noise (t < 0.3), and `wrong_colour`
    of the captions naming another shape colour than the picture's. Trained on captions that are always right, the
    prior learnt that the prompt fixes every colour, so image-to-image at strength 0.15 with a prompt naming a new
    colour took the prompt's colour (the input's stayed in 10%). Where a caption is sometimes wrong, a picture under
    little noise outweighs the prompt, and from pure noise the prompt still decides."""
    colours = list(PALETTE)

    def told(scene: Scene) -> str:
        if rng.random() < wrong_colour:
            scene = replace(scene, colour=rng.choice([c for c in colours if c not in (scene.colour, scene.background)]))
        return caption(scene, rng)

    def low_noise(n: int) -> torch.Tensor:
        t = torch.rand(n, generator=gen)
        t[: n // 2] *= 0.3
        return t

    data = (latents, scenes, told, low_noise)
    return _train_prior_alone("stage C low noise", prior, text_encoder, tokenizer, data, steps, rng, gen, log, batch)


def train_prior_words(
    prior: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    latents: torch.Tensor,
    scenes: list[Scene],
    steps: int,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    batch: int = 128,
) -> tuple[list[float], EMA]:
    """Stage C trained on, its text encoder frozen, on captions in every phrasing `caption` writes (the background
    first, after a comma or not at all; other words; capitals and full stops), at stage C's noise levels, a low
    constant learning rate and a fast EMA, as the low-noise stage: scene prompts score as before. (The text encoder
    trained instead, alone or with the prior, learnt the phrasings too but cost held-out shape 8 to 11 points: see
    the model card.) 10% empty captions, as in stage C."""
    data = (latents, scenes, lambda scene: caption(scene, rng), lambda n: sample_t(n, gen, high_noise_share=0.5))
    return _train_prior_alone("stage C words", prior, text_encoder, tokenizer, data, steps, rng, gen, log, batch)


def _train_prior_alone(
    name: str,
    prior: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    data: tuple[torch.Tensor, list[Scene], Callable[[Scene], str], Callable[[int], torch.Tensor]],
    steps: int,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    batch: int,
) -> tuple[list[float], EMA]:
    """The prior alone on (latents, scenes, a caption per scene, noise levels per batch), its text encoder frozen:
    lr 1e-4 constant, an EMA of 0.99, 10% empty captions (the runs that train a shipped prior on)."""
    latents, scenes, told, noise_levels = data
    device = device_of(prior)
    text_encoder.eval().requires_grad_(False)
    params = list(prior.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    constant, ema = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), EMA(prior, 0.99)
    no_image = torch.zeros(batch, 1, prior.config.clip_image_in_channels, device=device)

    def step(_: int) -> float:
        idx = [rng.randrange(len(scenes)) for _ in range(batch)]
        texts = [told(scenes[i]) if rng.random() > 0.1 else "" for i in idx]
        with torch.no_grad():
            hidden, pooled = encode_captions(text_encoder, tokenizer, texts)
        t = noise_levels(batch)
        loss = prior_loss(prior, hidden, pooled, no_image, latents[idx].to(device), t, gen)
        optimise(opt, constant, loss, clip=params)
        ema.update(prior)
        return loss.item()

    return run_steps(name, steps, step, log, every=max(1, steps // 20)), ema


# The demo's CLIP image tower: a small ViT (CLIPVisionModelWithProjection, as the official prior repo's
# image_encoder/) that sees the picture at 64 px through a CLIPImageProcessor, as the pipelines feed it.
TOWER_SIDE = 64
DEMO_VISION = dict(
    image_size=TOWER_SIDE,
    patch_size=8,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    projection_dim=16,  # the demo prior's clip_image_in_channels
)


def image_prompt_dataset(
    encoder: ImageEncoder, processor, n: int, rng: random.Random, log: Log
) -> tuple[torch.Tensor, torch.Tensor, list[Scene]]:
    """n fresh scenes as (Stage C latents, the tower's pixel values, scenes): each picture is both what the prior
    makes and the image prompt it is made from."""
    encoder.eval()
    latents, pixels, scenes = [], [], []
    for i in range(0, n, 256):
        batch = [sample_scene(rng) for _ in range(min(256, n - i))]
        pictures = [render(s, SIDE, rng) for s in batch]
        arrays = np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pictures])
        images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().to(device_of(encoder))
        with torch.no_grad():
            latents.append(encoder(encoder_view(images)).cpu())
        pixels.append(processor(images=pictures, return_tensors="pt").pixel_values)
        scenes += batch
    log(f"encoded {n} scenes for the image tower")
    return torch.cat(latents), torch.cat(pixels), scenes


def train_image_tower(
    prior: nn.Module,
    tower: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    data: tuple[torch.Tensor, torch.Tensor, list[Scene]],
    steps: int,
    rng: random.Random,
    gen: torch.Generator,
    log: Log,
    batch: int = 128,
    lr: float = 1e-3,
) -> list[float]:
    """The CLIP image tower, end to end through the prior's v-loss: the prior makes each scene from the tower's
    embedding of that scene, with the empty caption (three rows in four: an image prompt alone) or its own, as
    image prompts come alone or beside text. As with the text encoder in stage C, small heads read the scene's
    attributes off the embedding (dropped after training). Only the tower and the weight of the prior's image
    mapper learn: the mapper's bias and every other weight stay, so a zero embedding (no image prompt, or weight 0)
    gives the prior exactly as it was."""
    latents, pixels, scenes = data
    device = device_of(prior)
    prior.requires_grad_(False)
    text_encoder.requires_grad_(False)
    mapper = prior.clip_img_mapper.weight.requires_grad_(True)
    dim = tower.config.projection_dim
    heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in AUX_LABELS.items()}).to(device)
    params = [mapper, *tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    sched = schedule(opt, steps, lr, warmup=min(100, steps // 10 + 1))

    def step(_: int) -> float:
        idx = [rng.randrange(len(scenes)) for _ in range(batch)]
        texts = [caption(scenes[i], rng) if rng.random() < 0.25 else "" for i in idx]
        with torch.no_grad():
            hidden, pooled = encode_captions(text_encoder, tokenizer, texts)
        embeds = tower(pixels[idx].to(device)).image_embeds
        t = sample_t(batch, gen, high_noise_share=0.5)
        loss = prior_loss(prior, hidden, pooled, embeds.unsqueeze(1), latents[idx].to(device), t, gen)
        aux = sum(
            F.cross_entropy(
                heads[k](embeds), torch.tensor([labels.index(getattr(scenes[i], k)) for i in idx], device=device)
            )
            for k, labels in AUX_LABELS.items()
        )
        optimise(opt, sched, loss + 0.1 * aux, clip=params)
        return loss.item()

    losses = run_steps("image tower", steps, step, log, every=max(1, steps // 20))
    prior.requires_grad_(True)
    return losses


def train_previewer(
    previewer: nn.Module, encoder: ImageEncoder, steps: int, rng: random.Random, log: Log, batch: int = 32
) -> list[float]:
    """Stage C latent -> small RGB image (48x48 for a 128 image), for live previews."""
    opt = torch.optim.AdamW(previewer.parameters())
    sched = schedule(opt, steps, 2e-3)
    encoder.eval()

    def step(_: int) -> float:
        images = scene_images(rng, batch)[0].to(device_of(previewer))
        with torch.no_grad():
            z = encoder(encoder_view(images))
        pred = previewer(z)
        loss = F.mse_loss(pred, F.interpolate(images, size=pred.shape[-2:], mode="area"))
        optimise(opt, sched, loss)
        return loss.item()

    return run_steps("previewer", steps, step, log, every=max(1, steps // 10))
