"""Schedulers a model folder may name (see `loading.SCHEDULERS`); code never comes from the folder itself."""

from __future__ import annotations

import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.schedulers.scheduling_ddpm_wuerstchen import DDPMWuerstchenSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


class WuerstchenScheduler(DDPMWuerstchenScheduler):
    """DDPMWuerstchenScheduler with the same numbers, but a step that never makes the host wait for the GPU.

    diffusers' step waits three times for the UNet's work that is still queued on the GPU: it copies two CPU
    constants to the device, reads the timestep's index with `.item()`, and copies the noise drawn from the CPU
    generators with a blocking copy. While the host waits, nothing is queued, so the GPU idles during the host work
    that follows (drawing the next noise, launching the next step). Here the constants live on the device from
    `set_timesteps` on, the index stays on the device, and the noise goes up from pinned memory without a wait.
    The arithmetic is diffusers', operation for operation; the tests compare the bits.
    """

    start = 1.0  # where sampling starts: below 1, image-to-image runs only the rest of the way (engine.py)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        # diffusers' prior pipeline passes only a step count (and ignores its own `timesteps` argument), so a later
        # start is the scheduler's to know.
        if timesteps is None and self.start < 1.0:
            timesteps = torch.linspace(self.start, 0.0, num_inference_steps + 1, device=device)
        super().set_timesteps(num_inference_steps, timesteps, device)
        self.s = self.s.to(self.timesteps.device)
        self._init_alpha_cumprod = self._init_alpha_cumprod.to(self.timesteps.device)

    def previous_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        index = (self.timesteps - timestep[0]).abs().argmin()
        return self.timesteps.index_select(0, index.view(1) + 1).expand(timestep.shape[0])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
    ):
        dtype, device, t = model_output.dtype, model_output.device, timestep
        prev_t = self.previous_timestep(t)
        ones = [1] * (sample.dim() - 1)
        alpha_cumprod = self._alpha_cumprod(t, device).view(t.size(0), *ones)
        alpha_cumprod_prev = self._alpha_cumprod(prev_t, device).view(prev_t.size(0), *ones)
        alpha = alpha_cumprod / alpha_cumprod_prev
        mu = (1.0 / alpha).sqrt() * (sample - (1 - alpha) * model_output / (1 - alpha_cumprod).sqrt())
        std_noise = _noise(mu.shape, generator, device, dtype)
        std = ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * std_noise
        pred = (mu + std * (prev_t != 0).float().view(prev_t.size(0), *ones)).to(dtype)
        return DDPMWuerstchenSchedulerOutput(prev_sample=pred) if return_dict else (pred,)


def _noise(shape: torch.Size, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' randn_tensor; noise from CPU generators reaches a GPU through pinned memory, without a wait. The
    caching host allocator keeps the pinned block until its copy has finished."""
    generators = generator if isinstance(generator, list) else [generator]
    if device.type != "cuda" or generators[0] is None or generators[0].device.type != "cpu":
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
    return noise.pin_memory().to(device, non_blocking=True)


class VPredictionWuerstchenScheduler(WuerstchenScheduler):
    """The Würstchen step for models that predict v instead of the noise.

    Sampling starts at t=1, where the schedule clamps alpha-bar to 1e-4, so a noise-predicting model's small errors
    are magnified about 100x in the implied clean latent; a tiny model trained from scratch then samples pure noise.
    Predicting v avoids that. This step converts v to the noise (eps = sqrt(a) v + sqrt(1 - a) x_t) and takes the
    usual step, so classifier-free guidance, which the pipeline applies to the model output, stays linear.
    """

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
    ):
        a = self._alpha_cumprod(timestep, sample.device).view(timestep.size(0), *[1] * (sample.dim() - 1))
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
        return super().step(eps.to(model_output.dtype), timestep, sample, generator=generator, return_dict=return_dict)
