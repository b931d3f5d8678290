"""Choose the torch device and dtype; refuse combinations known to give broken images."""

from __future__ import annotations

import torch

from .errors import ModelConfigError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; anything else must be a device torch can use."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelConfigError(f"device: {name!r} is not a torch device (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"device: {name!r} was asked for but torch sees no CUDA GPU here (use auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelConfigError(f"device: {name!r} was asked for but MPS is not available here (use auto or cpu)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere; fp16 is refused.

    The official prior overflows in fp16 and returns NaN latents (black images), so we say so instead.
    """
    if name == "fp16":
        raise ModelConfigError(
            "dtype: fp16 is not supported: the Stable Cascade prior overflows in fp16 (NaN, black images). "
            "Use bf16 (GPUs since Ampere) or fp32."
        )
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ModelConfigError(f"dtype: {name!r} is not one of auto, bf16, fp32")
    return DTYPES[name]
