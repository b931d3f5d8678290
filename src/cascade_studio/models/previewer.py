"""A small network that turns a Stage C latent into a rough RGB image, for live previews while sampling.

Same shape of network as the previewer of Stability's StableCascade repository (1x1 conv in, three 2x
upsampling stages, 1x1 conv out), written as a diffusers model so it saves and loads like every other component.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class Previewer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 16, hidden_channels: int = 512, out_channels: int = 3, upsamples: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, hidden_channels, 1),
            nn.GELU(),
            nn.BatchNorm2d(hidden_channels),
        ]
        c = hidden_channels
        for i in range(upsamples):
            c_next = max(hidden_channels // 2 ** min(i + 1, 2), 4)
            layers += [
                nn.Conv2d(c, c, 3, padding=1),
                nn.GELU(),
                nn.BatchNorm2d(c),
                nn.ConvTranspose2d(c, c_next, 2, stride=2),
                nn.GELU(),
                nn.BatchNorm2d(c_next),
            ]
            c = c_next
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.GELU(), nn.BatchNorm2d(c), nn.Conv2d(c, out_channels, 1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Stage C latents (B, 16, h, w) -> RGB in [0, 1] (B, 3, h * 2**upsamples, w * 2**upsamples)."""
        return self.blocks(latents).clamp(0, 1)
