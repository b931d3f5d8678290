"""Train the demo model: every stage from a fixed seed, in one command, into the official folder layout.

    cascade-studio train-demo --out demo-model             # the shipped recipe (SHIPPED_RECIPE: hours)
    cascade-studio train-demo --out demo-model --quick     # the short recipe: its first Stage B text round alone
    cascade-studio train-demo --out smoke --quick --scale 0.05   # a smoke test in a couple of minutes
    cascade-studio train-demo --out demo-model --resume    # go on with a stopped run (train/checkpoint.py)

`--from DIR` trains one stage of a trained model on: the decoder with text (Stage B text, the default: it adds the
stage to a model trained before the stage existed, or trains the decoder on from where it stopped; give another
--seed for fresh scenes), or with `--stage a-decoder` Stage A's decoder half, its encoder frozen.
`--scale` multiplies every stage's step count: above 1 for better weights; `--device cuda` trains on a GPU (all
random numbers still come from CPU generators, so a seed picks the same data and noise on every device).
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from diffusers import StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .. import __version__
from ..models.architectures import RES, RES_ATTN, extend_word_tokenizer, write_word_tokenizer
from ..models.previewer import Previewer
from ..models.schedulers import VPredictionWuerstchenScheduler
from ..models.source import DEMO_TOWER
from . import checkpoint, stages
from .scenes import caption, sample_scene

# What the studio tells a person writing a prompt for this model (see models/source.py, prompt_help).
DEMO_PROMPT_HELP = {
    "closed_vocabulary": True,
    "hint": "it draws 1-3 circles, squares or triangles in red, green, blue, yellow, orange, purple, white or black, "
    "at a place (left, top right, centre...), on a plain background",
    "trained_size": [128, 128],  # it draws at this size whatever is asked for (engine.drawing_size)
}
TEXT_LENGTH = 24  # tokens: the longest caption is 19, and the pipeline pads every prompt to this length

DEMO_VQGAN = dict(
    in_channels=3,
    out_channels=3,
    up_down_scale_factor=2,
    levels=2,
    bottleneck_blocks=2,
    embed_dim=64,
    latent_channels=4,
    num_vq_embeddings=256,
    scale_factor=1.0,
)
DEMO_DECODER = dict(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    conditioning_dim=64,
    block_out_channels=[64, 128],
    num_attention_heads=[0, 4],
    down_num_layers_per_block=[2, 2],
    up_num_layers_per_block=[2, 2],
    down_blocks_repeat_mappers=[1, 1],
    up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[RES, RES_ATTN],
    clip_text_pooled_in_channels=64,
    clip_seq=4,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    dropout=[0.0, 0.0],
    timestep_conditioning_type=["sca"],
    switch_level=None,
)
DEMO_PRIOR = dict(
    in_channels=16,
    out_channels=16,
    conditioning_dim=128,
    block_out_channels=[128, 256],
    num_attention_heads=[4, 8],
    down_num_layers_per_block=[1, 1],
    up_num_layers_per_block=[1, 1],
    down_blocks_repeat_mappers=[1, 1],
    up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[RES_ATTN, RES_ATTN],
    clip_text_in_channels=64,
    clip_text_pooled_in_channels=64,
    clip_image_in_channels=16,
    clip_seq=4,
    dropout=[0.0, 0.0],
    timestep_conditioning_type=["sca", "crp"],
    switch_level=[False],
)
DEMO_TEXT = dict(
    hidden_size=64,
    intermediate_size=256,
    num_attention_heads=4,
    num_hidden_layers=3,
    projection_dim=64,
    max_position_embeddings=TEXT_LENGTH,
)
# The folder's own settings: the size it was trained at, and the sampling settings that measured best.
DEMO_DEFAULTS = dict(
    width=stages.SIDE, height=stages.SIDE, prior_steps=20, prior_guidance=2.0, decoder_steps=6, decoder_guidance=3.0
)


@dataclass
class TrainConfig:
    seed: int = 0
    steps_a: int = 1000
    steps_a_decoder: int = 3000
    steps_a_decoder_plain: int = 0  # Stage A decoder steps on the scenes' own colours, before the steps above
    a_any_colour: float = 0.5  # the share of Stage A decoder pictures in random colours (see stages.train_stage_a)
    steps_b: int = 4500
    steps_b_text: int = 2500
    b_text_rounds: tuple[int, ...] = ()  # Stage B text rounds after the first: fresh scenes each (4 a step)
    lr_b_text: float = 3e-4
    steps_c: int = 5000
    steps_c_image: int = 1500
    steps_c_low_noise: int = 600
    steps_c_words: int = 600
    words_scenes: int = 20000
    c_wrong_colour: float = 0.05  # the share of low-noise captions naming another colour (stages.train_prior_low_noise)
    low_noise_scenes: int = 20000
    steps_previewer: int = 400
    decoder_scenes: int = 10000
    prior_scenes: int = 40000
    image_scenes: int = 8000
    batch_c: int = 128
    scale: float = 1.0
    threads: int = 2
    device: str = "cpu"

    def steps(self, n: int) -> int:
        return max(2, round(n * self.scale))


# What a fresh `train-demo` runs unless told --quick: the steps the shipped model was trained for, in the order its
# card lists them (`added_later`: it was made run by run with --from). Its runs took 8.0 h on 2 CPU threads (the
# card's seconds; 6-8 h as fast as the shared machine was), nearly all of it Stage B text. --quick runs the
# TrainConfig defaults: the first Stage B text round alone.
SHIPPED_RECIPE = dict(
    b_text_rounds=(5000, 8000, 12000, 8000, 24000, 12000, 24000, 8000),  # with the first 2,500: 103,500 steps
    steps_a_decoder_plain=8000,  # then 3,000 in any colour: 11,000 steps
)


def caption_words(rng: random.Random, n: int = 20000) -> list[str]:
    """Every word the captions use (sampled widely enough to hit every template and phrase)."""
    words: set[str] = set()
    for _ in range(n):
        words.update(
            caption(sample_scene(rng, held_out=rng.random() < 0.2), rng).lower().replace(",", " ").rstrip(".").split()
        )
    return sorted(words)


def plot_losses(curves: dict[str, list[float]], path: Path) -> None:
    """One panel per stage, loss on a log scale; drawn with PIL to avoid a plotting dependency."""
    w, h, pad = 320, 200, 30
    image = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(image)
    for k, (name, values) in enumerate(curves.items()):
        x0 = k * w
        draw.text((x0 + pad, 8), f"{name}: {values[0]:.3g} -> {values[-1]:.3g}", fill="black")
        draw.rectangle((x0 + pad, pad, x0 + w - 10, h - pad), outline="gray")
        logs = [torch.tensor(max(v, 1e-8)).log10().item() for v in values]
        lo, hi = min(logs), max(logs) + 1e-9
        pts = [
            (x0 + pad + i * (w - pad - 10) / max(1, len(logs) - 1), h - pad - (v - lo) / (hi - lo) * (h - 2 * pad))
            for i, v in enumerate(logs)
        ]
        draw.line(pts, fill=(40, 80, 220), width=2)
    image.save(path)


def train_demo(out: Path, cfg: TrainConfig, log=print, resume: bool = False) -> dict:
    """Every stage from `cfg.seed` into `out`, in parts: after each, the run's state goes to `out/checkpoint/`, and
    `resume` goes on from there (`cfg` should then be the config it was started with: checkpoint.saved_config)."""
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        run = checkpoint.Progress.load(out, cfg.device)
        log(f"resuming {out}: done {', '.join(run.done) or 'nothing'}")
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        run.resumed.append(
            {"after": run.done[-1] if run.done else None, "at": at, "device": cfg.device, "threads": cfg.threads}
        )
    else:
        torch.manual_seed(cfg.seed)
        run = checkpoint.Progress(random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed), config=asdict(cfg))
        write_word_tokenizer(out / "tokenizer", caption_words(run.rng), model_max_length=TEXT_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    rng, gen, m = run.rng, run.gen, run.models

    def part(name: str, train, stage: str | None = None) -> None:
        """Run one part unless the checkpoint has it; its time and losses add to its stage's."""
        if name in run.done:
            return
        t, stage = time.perf_counter(), stage or name
        losses = train()
        run.seconds[stage] = run.seconds.get(stage, 0.0) + time.perf_counter() - t
        run.losses[stage] = run.losses.get(stage, []) + losses
        run.done.append(name)
        run.save(out)

    def stage_a() -> list[float]:
        m["vqgan"] = PaellaVQModel(**DEMO_VQGAN).to(cfg.device)
        losses = stages.train_stage_a(m["vqgan"], cfg.steps(cfg.steps_a), rng, gen, log)
        m["vqgan"].eval().requires_grad_(False)
        return losses

    def stage_b() -> list[float]:
        run.data_b = stages.decoder_dataset(m["vqgan"], cfg.steps(cfg.decoder_scenes), rng, log)
        m["vqgan"].register_to_config(scale_factor=run.data_b.scale)  # the pipeline multiplies latents by it
        m["image_encoder"] = stages.ImageEncoder().to(cfg.device)
        m["decoder"] = StableCascadeUNet(**DEMO_DECODER).to(cfg.device)
        return stages.train_stage_b(m["decoder"], m["image_encoder"], run.data_b, cfg.steps(cfg.steps_b), rng, gen, log)

    def stage_c() -> list[float]:
        latents, scenes = stages.encode_dataset(m["image_encoder"], cfg.steps(cfg.prior_scenes), rng, log)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **DEMO_TEXT
        )
        prior = StableCascadeUNet(**DEMO_PRIOR).to(cfg.device)
        text_encoder = CLIPTextModelWithProjection(text_config).to(cfg.device)
        losses, ema_prior, ema_text = stages.train_stage_c(
            prior, text_encoder, tokenizer, latents, scenes, cfg.steps(cfg.steps_c), rng, gen, log, batch=cfg.batch_c
        )
        m["prior"], m["text_encoder"] = ema_prior.model, ema_text.model
        return losses

    def stage_b_text(steps: int) -> list[float]:
        """One round of Stage B text: the first on Stage B's scenes, each later one on fresh scenes (4 a step), each
        with its own warm-up and cosine, as the shipped model's runs had."""
        data = run.data_b
        if data is None:
            scale = m["vqgan"].config.scale_factor
            data = stages.decoder_dataset(m["vqgan"], cfg.steps(4 * steps), rng, log, scale=scale)
        run.data_b = None  # no later part reads Stage B's scenes: the checkpoints after this one leave them out
        return stages.train_decoder_text(
            m["decoder"],
            m["image_encoder"],
            m["text_encoder"],
            tokenizer,
            data,
            cfg.steps(steps),
            cfg.lr_b_text,
            rng,
            gen,
            log,
        )

    def previewer() -> list[float]:
        m["previewer"] = Previewer(in_channels=16, hidden_channels=32, upsamples=4).to(cfg.device)
        return stages.train_previewer(m["previewer"], m["image_encoder"], cfg.steps(cfg.steps_previewer), rng, log)

    def stage_a_decoder() -> list[float]:
        """Last of the parts, so that it draws no random numbers before the others: they are as they were without it."""
        losses = []
        if cfg.steps_a_decoder_plain:
            plain = cfg.steps(cfg.steps_a_decoder_plain)
            losses = stages.train_stage_a(m["vqgan"], plain, rng, gen, log, decoder_only=True)
        return losses + stages.train_stage_a(
            m["vqgan"], cfg.steps(cfg.steps_a_decoder), rng, gen, log, decoder_only=True, any_colour=cfg.a_any_colour
        )

    part("stage A", stage_a)
    part("stage B", stage_b)
    part("stage C", stage_c)
    for k, steps in enumerate((cfg.steps_b_text, *cfg.b_text_rounds)):
        part(f"stage B text round {k + 1}", lambda steps=steps: stage_b_text(steps), stage="stage B text")
    part("previewer", previewer)
    part("stage A decoder", stage_a_decoder)
    for name, model in m.items():
        model.eval().cpu().save_pretrained(out / name)
    VPredictionWuerstchenScheduler().save_pretrained(out / "scheduler")
    seconds, losses = run.seconds, run.losses

    t = time.perf_counter()  # after the others, on the saved prior: they draw the random numbers they drew before
    losses["image tower"], _ = train_image_prompts(out, cfg, rng, gen, log)
    seconds["image tower"] = time.perf_counter() - t

    t = time.perf_counter()  # last, with random numbers of its own: every stage before it is as it was without it
    low_rng, low_gen = random.Random(f"{cfg.seed}-low-noise"), torch.Generator().manual_seed(cfg.seed + 1)
    losses["stage C low noise"], _ = train_low_noise(out, cfg, low_rng, low_gen, log)
    seconds["stage C low noise"] = time.perf_counter() - t

    plot_losses(losses, out / "loss.png")
    seconds["total"] = sum(seconds.values())  # the parts' times: a resumed run's pause is not training
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in m.items()}
    params["image_tower"] = sum(
        t.numel() for t in load_file(out / DEMO_TOWER / "image_encoder" / "model.safetensors").values()
    )
    report = {
        "name": "cascade-studio-demo",
        "defaults": DEMO_DEFAULTS,
        "prompt": DEMO_PROMPT_HELP,
        "config": asdict(cfg),
        "seconds": seconds,
        "final_losses": {k: v[-1] for k, v in losses.items()},
        "losses": losses,
        "parameters": params,
        "latent_scale": m["vqgan"].config.scale_factor,
        "device": cfg.device,
        "threads": cfg.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cascade_studio": __version__,
    }
    if run.resumed:  # the times above are the parts' own: the pauses between are not in them
        report["resumed"] = run.resumed
    (out / "cascade_studio.json").write_text(json.dumps(report, indent=1))
    checkpoint.remove(out)
    log(f"trained in {seconds['total'] / 60:.1f} min; {sum(params.values()) / 1e6:.2f} M parameters -> {out}")
    return report


# `train-demo --from DIR --stage S`: the card's name for each stage and the config field that counts its steps.
STAGES_ON = {
    "b-text": ("stage B text", "steps_b_text"),
    "a-decoder": ("stage A decoder", "steps_a_decoder"),
    "c-image": ("image tower", "steps_c_image"),
    "c-low-noise": ("stage C low noise", "steps_c_low_noise"),
    "c-words": ("stage C words", "steps_c_words"),
}
# Words the captions gained after the shipped model's first runs, each with the word it stands for: `--stage
# c-words` adds them to a model's tokenizer, their embeddings starting from that word's (a fresh run has them all).
WORDS_ADDED = {
    "an": "a",
    "one": "a",
    "violet": "purple",
    "ball": "circle",
    "balls": "circles",
    "dot": "circle",
    "dots": "circles",
    "box": "square",
    "boxes": "squares",
}


def tower_processor() -> CLIPImageProcessor:
    """What the pipelines feed the tower: the picture resized and centre-cropped to its side, CLIP's normalisation."""
    side = stages.TOWER_SIDE
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def train_image_prompts(folder: Path, cfg: TrainConfig, rng: random.Random, gen, log) -> tuple[list[float], dict]:
    """Stage C with image prompts: a CLIP image tower taught through the frozen prior (its image mapper's weight
    learns too), written beside the prior as image_tower/. On a folder that has one, the tower trains on."""
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").to(cfg.device).eval()
    prior = checkpoint.load_model(StableCascadeUNet, folder / "prior").to(cfg.device)
    encoder = stages.ImageEncoder.from_pretrained(folder / "image_encoder").to(cfg.device)
    processor = tower_processor()
    if (folder / DEMO_TOWER / "image_encoder").is_dir():
        tower = CLIPVisionModelWithProjection.from_pretrained(folder / DEMO_TOWER / "image_encoder")
    else:
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**stages.DEMO_VISION))
    data = stages.image_prompt_dataset(encoder, processor, cfg.steps(cfg.image_scenes), rng, log)
    steps = cfg.steps(cfg.steps_c_image)
    losses = stages.train_image_tower(prior, tower.to(cfg.device), text_encoder, tokenizer, data, steps, rng, gen, log)
    prior.eval().cpu().save_pretrained(folder / "prior")
    tower.eval().cpu().save_pretrained(folder / DEMO_TOWER / "image_encoder")
    processor.save_pretrained(folder / DEMO_TOWER / "feature_extractor")
    return losses, {"image_scenes": cfg.steps(cfg.image_scenes)}


def train_low_noise(folder: Path, cfg: TrainConfig, rng: random.Random, gen, log) -> tuple[list[float], dict]:
    """Stage C low noise on the prior in `folder` (its text and image encoders frozen), written back in place."""
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").to(cfg.device)
    prior, latents, scenes = _prior_and_scenes(folder, cfg, cfg.steps(cfg.low_noise_scenes), rng, log)
    steps = cfg.steps(cfg.steps_c_low_noise)
    losses, ema = stages.train_prior_low_noise(
        prior, text_encoder, tokenizer, latents, scenes, steps, rng, gen, log, wrong_colour=cfg.c_wrong_colour
    )
    ema.model.cpu().save_pretrained(folder / "prior")
    return losses, {"wrong_colour": cfg.c_wrong_colour, "scenes": cfg.steps(cfg.low_noise_scenes)}


def train_words(folder: Path, cfg: TrainConfig, rng: random.Random, gen, log) -> tuple[list[float], dict]:
    """Words and phrasings for the model in `folder`: words its tokenizer lacks (WORDS_ADDED) are added, each with
    the embedding of the word it stands for (so "a red ball" reads as "a red circle", and every prompt it could read
    gives the same embedding as before), then the prior trains on captions in every phrasing (see
    stages.train_prior_words). Written back in place."""
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    added = [w for w in WORDS_ADDED if f"{w}</w>" not in vocab]
    size = extend_word_tokenizer(folder / "tokenizer", added)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder")
    rows = text_encoder.resize_token_embeddings(size, mean_resizing=False).weight
    with torch.no_grad():
        for word in added:
            rows[tokenizer.convert_tokens_to_ids(f"{word}</w>")] = rows[vocab[f"{WORDS_ADDED[word]}</w>"]]
    text_encoder.save_pretrained(folder / "text_encoder")
    prior, latents, scenes = _prior_and_scenes(folder, cfg, cfg.steps(cfg.words_scenes), rng, log)
    steps = cfg.steps(cfg.steps_c_words)
    losses, ema = stages.train_prior_words(
        prior, text_encoder.to(cfg.device), tokenizer, latents, scenes, steps, rng, gen, log
    )
    ema.model.cpu().save_pretrained(folder / "prior")
    return losses, {"words_added": added, "scenes": cfg.steps(cfg.words_scenes)}


def _prior_and_scenes(folder: Path, cfg: TrainConfig, n: int, rng: random.Random, log):
    """The prior in `folder` and n fresh scenes encoded by its image encoder: what a stage that trains the prior
    alone starts from (stages._train_prior_alone)."""
    prior = checkpoint.load_model(StableCascadeUNet, folder / "prior").to(cfg.device)
    encoder = stages.ImageEncoder.from_pretrained(folder / "image_encoder").to(cfg.device)
    with torch.no_grad():
        latents, scenes = stages.encode_dataset(encoder, n, rng, log)
    return prior, latents, scenes


def train_on(src: Path, out: Path, cfg: TrainConfig, stage: str = "b-text", log=print) -> dict:
    """Train one stage of a trained model on and write a complete model folder to `out`; `src` stays as it is.

    "b-text": Stage B text. On a model trained before that stage existed it adds the stage; on one that has it the
    decoder trains on from where it stopped (fresh scenes with another --seed). "a-decoder": Stage A's decoder half
    alone. Either way the encoders are kept as they are, so the latents keep their meaning for every other stage.
    The card sums the stage's steps and time, and lists each run."""
    name, steps_key = STAGES_ON[stage]
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    src, out = Path(src), Path(out)
    card = json.loads((src / "cascade_studio.json").read_text())
    shutil.copytree(src, out)
    t = time.perf_counter()
    vqgan = checkpoint.load_model(PaellaVQModel, out / "vqgan").to(cfg.device)
    if stage == "a-decoder":
        steps, run = cfg.steps(cfg.steps_a_decoder), {"any_colour": cfg.a_any_colour}
        losses = stages.train_stage_a(vqgan, steps, rng, gen, log, decoder_only=True, any_colour=cfg.a_any_colour)
        vqgan.eval().cpu().save_pretrained(out / "vqgan")
    elif stage == "c-image":
        steps = cfg.steps(cfg.steps_c_image)
        losses, run = train_image_prompts(out, cfg, rng, gen, log)
    elif stage == "c-low-noise":
        steps = cfg.steps(cfg.steps_c_low_noise)
        losses, run = train_low_noise(out, cfg, rng, gen, log)
    elif stage == "c-words":
        steps = cfg.steps(cfg.steps_c_words)
        losses, run = train_words(out, cfg, rng, gen, log)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
        decoder = checkpoint.load_model(StableCascadeUNet, out / "decoder").to(cfg.device)
        encoder = stages.ImageEncoder.from_pretrained(out / "image_encoder").to(cfg.device)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder").to(cfg.device)
        data = stages.decoder_dataset(vqgan, cfg.steps(cfg.decoder_scenes), rng, log, scale=vqgan.config.scale_factor)
        steps = cfg.steps(cfg.steps_b_text)
        run = {"lr": cfg.lr_b_text, "decoder_scenes": cfg.steps(cfg.decoder_scenes)}
        losses = stages.train_decoder_text(
            decoder, encoder, text_encoder, tokenizer, data, steps, cfg.lr_b_text, rng, gen, log
        )
        decoder.eval().cpu().save_pretrained(out / "decoder")
    seconds = time.perf_counter() - t

    had = name in card["seconds"]
    card["seconds"][name] = card["seconds"].get(name, 0.0) + seconds
    card["seconds"]["total"] += seconds
    card["losses"][name] = card["losses"].get(name, []) + losses
    card["final_losses"][name] = losses[-1]
    card["config"][steps_key] = (card["config"].get(steps_key, 0) if had else 0) + steps
    card["added_later"] = card.get("added_later", []) + [
        {
            "by": f"cascade-studio train-demo --from --stage {stage}",
            "stage": name,
            "continued": had,
            "seed": cfg.seed,
            "scale": cfg.scale,
            "steps": steps,
            **run,
            "seconds": seconds,
            "device": cfg.device,
            "threads": cfg.threads,
        }
    ]
    (out / "cascade_studio.json").write_text(json.dumps(card, indent=1))
    plot_losses(card["losses"], out / "loss.png")
    log(f"{name} in {seconds / 60:.1f} min -> {out}")
    return card
