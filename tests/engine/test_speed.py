"""Speed-up modes (engine/speed.py). CUDA graphs themselves run only on a GPU: bench/gpu_speed.py checks there that
their pixels equal eager's; here, which mode is chosen where, and what is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMWuerstchenScheduler

from cascade_studio.engine.speed import keep_scheduler_on_device, optimize, resolve_speedup
from cascade_studio.models.errors import ModelConfigError


def test_auto_uses_cuda_graphs_only_where_they_work():
    assert resolve_speedup("auto", torch.device("cuda"), cpu_offload=False) == "graphs"
    assert resolve_speedup("auto", torch.device("cuda"), cpu_offload=True) == "off"  # offload hooks move weights
    assert resolve_speedup("auto", torch.device("cpu"), cpu_offload=False) == "off"
    assert resolve_speedup("compile", torch.device("cpu"), cpu_offload=False) == "compile"


def test_graphs_on_the_cpu_are_refused_and_the_engine_keeps_working(engine):
    with pytest.raises(ModelConfigError, match="speedup: 'graphs' needs a CUDA device"):
        optimize(engine.pipelines, "graphs")
    assert engine.describe()["speedups"] == "none"
    result = engine(engine.request(prompt="a red circle", seed=3, prior_steps=2, decoder_steps=2))
    assert len(result.images) == 1


def test_scheduler_constants_are_moved_to_the_model_device():
    """diffusers copies these two tensors to the device at every step; on a GPU each copy stalls the host until the
    step's UNet is done (speed.keep_scheduler_on_device). If diffusers renames them, this fails instead of the
    engine silently getting slow again. The meta device stands in for a GPU: any device but the CPU shows the move."""
    pipelines = SimpleNamespace(prior=SimpleNamespace(scheduler=DDPMWuerstchenScheduler()),
                                decoder=SimpleNamespace(scheduler=DDPMWuerstchenScheduler()), device=torch.device("meta"))
    keep_scheduler_on_device(pipelines)
    for scheduler in (pipelines.prior.scheduler, pipelines.decoder.scheduler):
        assert scheduler.s.device.type == "meta" and scheduler._init_alpha_cumprod.device.type == "meta"
