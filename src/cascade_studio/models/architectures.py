"""Build Stable Cascade models with random weights and save them in the official folder layout.

The tests (and the benchmark's `--tiny` mode) use these instead of the official ~10 GB of weights, which no
machine here can download. Every component is the real class the official weights load into, so the files go
through exactly the loading and generation code the real model does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from .previewer import Previewer

RES = ("SDCascadeResBlock", "SDCascadeTimestepBlock")
RES_ATTN = ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")

# A prior that maps 32-d text features to the official 16-channel Stage C latent.
TINY_PRIOR = dict(
    in_channels=16,
    out_channels=16,
    conditioning_dim=32,
    block_out_channels=[32, 32],
    num_attention_heads=[2, 2],
    down_num_layers_per_block=[1, 1],
    up_num_layers_per_block=[1, 1],
    down_blocks_repeat_mappers=[1, 1],
    up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[RES_ATTN, RES_ATTN],
    clip_text_in_channels=32,
    clip_text_pooled_in_channels=32,
    clip_image_in_channels=32,
    clip_seq=4,
    dropout=[0.0, 0.0],
    timestep_conditioning_type=["sca", "crp"],
    switch_level=[False],
)
# A decoder that really consumes the prior's 16-channel output (effnet_in_channels=16), patch_size 2.
TINY_DECODER = dict(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    conditioning_dim=32,
    block_out_channels=[16, 32],
    num_attention_heads=[0, 2],
    down_num_layers_per_block=[1, 1],
    up_num_layers_per_block=[1, 1],
    down_blocks_repeat_mappers=[1, 1],
    up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[RES, RES_ATTN],
    clip_text_pooled_in_channels=32,
    clip_seq=4,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    dropout=[0.0, 0.0],
    timestep_conditioning_type=["sca"],
    switch_level=None,
)
TINY_VQGAN = dict(
    in_channels=3,
    out_channels=3,
    up_down_scale_factor=2,
    levels=2,
    bottleneck_blocks=1,
    embed_dim=16,
    latent_channels=4,
    num_vq_embeddings=8,
    scale_factor=0.3764,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)

# The official architectures (diffusers' scripts/convert_stable_cascade.py; lite from Stability's stage_b_lite and
# stage_c_lite configs). Parameter counts match the released weights: prior 3.59 B (lite 1.03 B), decoder 1.56 B
# (lite 0.70 B), text encoder 0.69 B (CLIP ViT-bigG/14's text tower), VQGAN 18.4 M (PaellaVQModel's defaults).
OFFICIAL_PRIOR = dict(
    in_channels=16,
    out_channels=16,
    timestep_ratio_embedding_dim=64,
    patch_size=1,
    conditioning_dim=2048,
    block_out_channels=[2048, 2048],
    num_attention_heads=[32, 32],
    down_num_layers_per_block=[8, 24],
    up_num_layers_per_block=[24, 8],
    down_blocks_repeat_mappers=[1, 1],
    up_blocks_repeat_mappers=[1, 1],
    block_types_per_layer=[RES_ATTN, RES_ATTN],
    clip_text_in_channels=1280,
    clip_text_pooled_in_channels=1280,
    clip_image_in_channels=768,
    clip_seq=4,
    kernel_size=3,
    dropout=[0.1, 0.1],
    self_attn=True,
    timestep_conditioning_type=["sca", "crp"],
    switch_level=[False],
)
OFFICIAL_PRIOR_LITE = OFFICIAL_PRIOR | dict(
    conditioning_dim=1536,
    block_out_channels=[1536, 1536],
    num_attention_heads=[24, 24],
    down_num_layers_per_block=[4, 12],
    up_num_layers_per_block=[12, 4],
)
OFFICIAL_DECODER = dict(
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=64,
    patch_size=2,
    conditioning_dim=1280,
    block_out_channels=[320, 640, 1280, 1280],
    down_num_layers_per_block=[2, 6, 28, 6],
    up_num_layers_per_block=[6, 28, 6, 2],
    down_blocks_repeat_mappers=[1, 1, 1, 1],
    up_blocks_repeat_mappers=[3, 3, 2, 2],
    num_attention_heads=[0, 0, 20, 20],
    block_types_per_layer=[RES, RES, RES_ATTN, RES_ATTN],
    clip_text_pooled_in_channels=1280,
    clip_seq=4,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    kernel_size=3,
    dropout=[0, 0, 0.1, 0.1],
    self_attn=True,
    timestep_conditioning_type=["sca"],
)
OFFICIAL_DECODER_LITE = OFFICIAL_DECODER | dict(
    block_out_channels=[320, 576, 1152, 1152],
    down_num_layers_per_block=[2, 4, 14, 4],
    up_num_layers_per_block=[4, 14, 4, 2],
    up_blocks_repeat_mappers=[2, 2, 2, 2],
    num_attention_heads=[0, 0, 18, 18],
)
OFFICIAL_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
# The official architectures by role, for single-file checkpoints (models/single_file.py matches their shapes).
OFFICIAL = {
    "prior": {"full": OFFICIAL_PRIOR, "lite": OFFICIAL_PRIOR_LITE},
    "decoder": {"full": OFFICIAL_DECODER, "lite": OFFICIAL_DECODER_LITE},
}
# name -> (prior, decoder, text encoder, VQGAN) configs; "tiny" is what the tests use.
ARCHITECTURES = {
    "full": (OFFICIAL_PRIOR, OFFICIAL_DECODER, OFFICIAL_TEXT, {}),
    "lite": (OFFICIAL_PRIOR_LITE, OFFICIAL_DECODER_LITE, OFFICIAL_TEXT, {}),
    "tiny": (TINY_PRIOR, TINY_DECODER, TINY_TEXT | dict(vocab_size=512, max_position_embeddings=77), TINY_VQGAN),
}

BASE_WORDS = (
    "a an the of on in at and with two three one small large big red green blue yellow orange purple white black "
    "gray pink brown circle square triangle background left right top bottom center centre corner photo"
).split()


def write_word_tokenizer(folder: Path, words: list[str], model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer (vocab.json + merges.txt) whose BPE merges spell each word as one token.

    Letters and digits stay available as single characters, so any ASCII prompt tokenizes; other characters
    become the unknown token, as they would with a small vocabulary.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-":
            vocab.setdefault(ch + suffix, len(vocab))
    _write_word_merges(folder, vocab, [], words)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length})
    )
    return folder


def extend_word_tokenizer(folder: Path, words: list[str]) -> int:
    """Add words to a tokenizer written by write_word_tokenizer, each as one token, after every token it has: the
    ids it had stay, so a text encoder keeps its embeddings and grows rows for the new ones. Returns the size."""
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = (folder / "merges.txt").read_text().splitlines()[1:]
    return _write_word_merges(folder, vocab, [m for m in merges if m], words)


def _write_word_merges(folder: Path, vocab: dict[str, int], merges: list[str], words: list[str]) -> int:
    """Append the merges that spell each word: its letters joined left to right, then, where an earlier merge
    splits the word otherwise ("l e" from "left" leaves "vio le t"), its leftover pieces joined."""
    ranks = {m: i for i, m in enumerate(merges)}

    def join(a: str, b: str) -> str:
        ranks.setdefault(f"{a} {b}", len(ranks))
        vocab.setdefault(a + b, len(vocab))
        return a + b

    for word in dict.fromkeys(w.lower() for w in words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            parts = [join(parts[0], parts[1])] + parts[2:]
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            parts = [join(parts[0], parts[1])] + parts[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(ranks) + "\n")
    return len(vocab)


def _bpe(word: str, ranks: dict[str, int]) -> list[str]:
    """The pieces CLIPTokenizer's BPE makes of one word: the best-ranked known pair merged until none is left."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get(f"{a} {b}", len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tiny_model(
    folder: Path, *, seed: int = 0, variant: str | None = None, lite: bool = False, previewer: bool = True
) -> Path:
    """Random tiny components in the official layout: prior[_lite]/, decoder[_lite]/, vqgan/, text_encoder/, ...

    `variant="bf16"` writes bf16 weights under the official `*.bf16.safetensors` names.
    """
    folder = Path(folder)
    write_word_tokenizer(folder / "tokenizer", list(BASE_WORDS))  # 211 tokens: within the tiny text encoder's 512
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    suffix = "_lite" if lite else ""
    for name, model in random_components("tiny", torch.device("cpu"), dtype, seed).items():
        model.save_pretrained(folder / (name + suffix if name in ("prior", "decoder") else name), variant=variant)
    DDPMWuerstchenScheduler().save_pretrained(folder / "scheduler")
    if previewer:
        Previewer(in_channels=16, hidden_channels=16, upsamples=2).eval().save_pretrained(folder / "previewer")
    return folder


def random_components(architecture: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Prior, decoder, text encoder and VQGAN of an architecture with random weights, built on `device` directly
    (the official sizes take seconds on a GPU this way). Speed does not depend on the weights' values."""
    prior, decoder, text, vqgan = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in dtype: no full-precision copy of 5 B parameters on the way
    try:
        with torch.device(device):
            models = {
                "prior": StableCascadeUNet(**prior),
                "decoder": StableCascadeUNet(**decoder),
                "text_encoder": CLIPTextModelWithProjection(
                    CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **text)
                ),
                "vqgan": PaellaVQModel(**vqgan),
            }
    finally:
        torch.set_default_dtype(default_dtype)
    return {name: model.eval().requires_grad_(False) for name, model in models.items()}
