"""Our Würstchen scheduler: diffusers' numbers, bit for bit, from a step that never reads a value back to the host
(which on a GPU waits for the queued UNet and leaves the GPU idle while the host prepares the next step)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from cascade_studio.models.schedulers import VPredictionWuerstchenScheduler, WuerstchenScheduler


def sample_loop(scheduler, dtype: torch.dtype, device: str = "cpu", steps: int = 6) -> list[torch.Tensor]:
    """A pipeline's loop over a batch of two, each image with its own CPU generator, as the engine calls it."""
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    outputs = torch.Generator().manual_seed(0)  # stands in for the UNet: the same outputs for both schedulers
    scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    seen = []
    for t in scheduler.timesteps[:-1]:
        model_output = torch.randn(2, 4, 16, 24, generator=outputs, dtype=dtype).to(device)
        latents = scheduler.step(model_output, t.expand(2).to(dtype), latents, generator=generators).prev_sample
        seen.append(latents)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_step_equals_diffusers_bit_for_bit(dtype):
    ours, stock = sample_loop(WuerstchenScheduler(), dtype), sample_loop(DDPMWuerstchenScheduler(), dtype)
    assert len(ours) == 6 and all(a.dtype == dtype for a in ours)
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], ours[1])  # the loop does move the latents


def test_a_step_never_reads_a_value_back_to_the_host():
    """On the meta device tensors have no values, so any read by the host fails: it stands in for a GPU, where each
    read would wait for the queued work. diffusers' own step reads the timestep's index and fails here."""
    for scheduler in (WuerstchenScheduler(), VPredictionWuerstchenScheduler()):
        latents = sample_loop(scheduler, torch.float32, device="meta")
        assert len(latents) == 6 and latents[-1].device.type == "meta"
        assert scheduler.s.device.type == "meta" and scheduler._init_alpha_cumprod.device.type == "meta"
    with pytest.raises(RuntimeError, match="item"):
        sample_loop(DDPMWuerstchenScheduler(), torch.float32, device="meta")
