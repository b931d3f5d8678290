"""Schedulers a model folder may name (see `loading.SCHEDULERS`); code never comes from the folder itself."""

from __future__ import annotations

import torch
from diffusers import DDPMWuerstchenScheduler


class VPredictionWuerstchenScheduler(DDPMWuerstchenScheduler):
    """DDPMWuerstchenScheduler for models that predict v instead of the noise.

    Sampling starts at t=1, where the schedule clamps alpha-bar to 1e-4, so a noise-predicting model's small errors
    are magnified about 100x in the implied clean latent; a tiny model trained from scratch then samples pure noise.
    Predicting v avoids that. This step converts v to the noise (eps = sqrt(a) v + sqrt(1 - a) x_t) and takes the
    usual step, so classifier-free guidance, which the pipeline applies to the model output, stays linear.
    """

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        a = self._alpha_cumprod(timestep, sample.device).view(timestep.size(0), *[1] * (sample.dim() - 1))
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
        return super().step(eps.to(model_output.dtype), timestep, sample, generator=generator, return_dict=return_dict)
