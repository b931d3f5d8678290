"""Image -> Stage C latent: the encoders image-to-image, inpainting and LoRA training use.

- The official models: Stability's EfficientNet-V2-S encoder (`effnet_encoder.safetensors` at the root of
  `stabilityai/stable-cascade`; Stability's `modules/effnet.py`): torchvision's `efficientnet_v2_s` features, a 1x1
  conv to 16 channels and a non-affine BatchNorm. It takes RGB normalised with ImageNet's mean and std and
  downsamples 32x, and Stage C was trained on 768-px images for its 24x24 latent of a 1024² picture, so an image is
  resized to (latent side x 32) px first (ComfyUI's StableCascade_StageC_VAEEncode does the same).
- The demo model: its own small `ImageEncoder` (image_encoder/ in its folder), trained with its decoder.

Both give unit-variance 16-channel latents of the size the prior makes for that picture.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file
from torch import nn

from .errors import ModelConfigError

RESOLUTION_MULTIPLE = 42.67  # pixels per Stage C latent position (diffusers' prior pipeline)
ENCODER_SCALE = 32  # pixels the encoders take per latent position
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """The prior's latent (h, w) for a picture of this size, as diffusers' prior pipeline makes it."""
    return math.ceil(height / RESOLUTION_MULTIPLE), math.ceil(width / RESOLUTION_MULTIPLE)


class ImageEncoder(ModelMixin, ConfigMixin):
    """The demo model's encoder: image (B, 3, 32h, 32w) in [0, 1] -> Stage C latent (B, 16, h, w), unit variance.

    Four stride-2 convs make a map of 2h x 2w, pooled evenly to h x w: the 128x128 scene's 3x3 latent from its
    96x96 view."""

    @register_to_config
    def __init__(self, channels: int = 16, width: int = 48):
        super().__init__()
        layers, c = [], 3
        for c_next in (width // 2, width, width * 2, width * 2):
            layers += [nn.Conv2d(c, c_next, 3, stride=2, padding=1), nn.GroupNorm(8, c_next), nn.GELU()]
            c = c_next
        self.features = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, channels, 1))
        self.norm = nn.BatchNorm2d(channels, affine=False)

    def forward(self, images: torch.Tensor, size: tuple[int, int] = (3, 3)) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(images * 2 - 1), size)
        return self.norm(self.out(x))


class EfficientNetEncoder(nn.Module):
    """Stability's Stage C image encoder, module for module, so `effnet_encoder.safetensors` loads into it."""

    def __init__(self, c_latent: int = 16):
        super().__init__()
        from torchvision import models  # importable beside a CPU torch: see cascade_studio/_torchvision.py

        self.backbone = models.efficientnet_v2_s(weights=None).features.eval()  # weights=None: nothing downloaded
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, c_latent, kernel_size=1, bias=False), nn.BatchNorm2d(c_latent, affine=False)
        )

    def forward(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        latents = self.mapper(self.backbone((images - mean) / std))
        return (
            latents
            if size is None or tuple(latents.shape[-2:]) == tuple(size)
            else F.interpolate(latents, size=size, mode="bilinear", align_corners=False)
        )


def load_image_encoder(path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The encoder at `path`: a folder as save_pretrained writes the demo's, or Stability's effnet file."""
    path = Path(path)
    if path.is_dir():
        return ImageEncoder.from_pretrained(path, use_safetensors=True, torch_dtype=dtype).to(device).eval()
    if path.suffix != ".safetensors" or not path.is_file():
        raise ModelConfigError(f"image encoder: {path} is neither a model folder nor a .safetensors file")
    encoder = EfficientNetEncoder()
    state = load_file(str(path))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelConfigError(
            f"image encoder: {path.name} is not Stability's EfficientNet encoder "
            f"({len(missing)} tensors missing, {len(unexpected)} unexpected)"
        )
    return encoder.to(device, dtype).eval()


def encode(encoder: nn.Module, images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] of a width x height picture -> the prior's latent for it."""
    h, w = latent_size(width, height)
    size = (h * ENCODER_SCALE, w * ENCODER_SCALE)
    if size[0] <= images.shape[-2] and size[1] <= images.shape[-1]:
        view = F.interpolate(images, size=size, mode="area")  # as the demo's encoder was trained
    else:
        view = F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return encoder(view, (h, w))
