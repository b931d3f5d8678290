"""Single-file checkpoints: Stability's original-format Stage C (`stage_c_bf16.safetensors`, `stage_c_lite*`) and
Stage B files, community fine-tunes saved the same way, and ComfyUI's bundled checkpoints where their keys allow.

The keys are converted to diffusers' `StableCascadeUNet` names by diffusers' own converter (the one
`StableCascadeUNet.from_single_file` uses), after stripping ComfyUI's `model.diffusion_model.` prefix. The config is
not guessed from the Hub: each candidate architecture (the official full and lite, and the model folder's own) is
built on the meta device, and the one whose parameter shapes are exactly the file's is used.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from diffusers import StableCascadeUNet
from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file

from .errors import ModelConfigError

COMFY_PREFIX = "model.diffusion_model."
STAGE_C_KEY = "clip_txt_mapper.weight"  # only Stage C has it (diffusers' converter tells them apart the same way)


def read_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, from the file's header alone."""
    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def unet_keys(keys: dict[str, tuple[int, ...]], path: Path, role: str) -> dict[str, tuple[int, ...]]:
    """The UNet's own keys (ComfyUI's prefix stripped), or a message that says what the file holds instead."""
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        keys = {k.removeprefix(COMFY_PREFIX): v for k, v in keys.items() if k.startswith(COMFY_PREFIX)}
    stage = "prior" if STAGE_C_KEY in keys else "decoder" if any(k.startswith("down_blocks.") for k in keys) else None
    if stage is None:
        prefixes = Counter(k.split(".")[0] for k in keys).most_common(4)
        raise ModelConfigError(
            f"{role}_file: {path.name} holds no Stage C or Stage B UNet (its tensors start with "
            f"{', '.join(p for p, _ in prefixes)}): give Stability's stage_c / stage_b file"
        )
    if stage != role:
        other = {"prior": "Stage C (the prior)", "decoder": "Stage B (the decoder)"}
        raise ModelConfigError(f"{role}_file: {path.name} is {other[stage]}; pass it as --{stage}-file")
    return keys


def shapes_of(config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = StableCascadeUNet(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_config(keys: dict[str, tuple[int, ...]], candidates: dict[str, dict], path: Path, role: str) -> str:
    """The name of the candidate architecture whose parameters have exactly the file's names and shapes."""
    converted = _converted_shapes(keys)
    for name, config in candidates.items():
        if shapes_of(config) == converted:
            return name
    raise ModelConfigError(
        f"{role}_file: {path.name} matches none of the architectures it could be "
        f"({', '.join(candidates)}): {len(converted)} tensors, e.g. "
        f"{next(iter(converted))} {list(next(iter(converted.values())))}"
    )


def _converted_shapes(keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Shapes after diffusers' key conversion, worked out on empty meta tensors (no weights read)."""
    meta = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    return {k: tuple(v.shape) for k, v in convert_stable_cascade_unet_single_file_to_diffusers(meta).items()}


def load_unet(path: Path, role: str, candidates: dict[str, dict], dtype: torch.dtype) -> tuple[StableCascadeUNet, str]:
    """The UNet of a single-file checkpoint and the name of the architecture it matched."""
    keys = unet_keys(read_keys(path), path, role)
    name = match_config(keys, candidates, path, role)
    raw = load_file(str(path))
    if any(k.startswith(COMFY_PREFIX) for k in raw):
        raw = {k.removeprefix(COMFY_PREFIX): v for k, v in raw.items() if k.startswith(COMFY_PREFIX)}
    state = convert_stable_cascade_unet_single_file_to_diffusers(raw)
    with torch.device("meta"):
        model = StableCascadeUNet(**candidates[name])
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval(), name
