"""Speed-up modes (engine/speed.py). CUDA graphs themselves run only on a GPU: bench/gpu_speed.py checks there that
their pixels equal eager's; here, which mode is chosen where, and what is refused."""

from __future__ import annotations

import pytest
import torch

from cascade_studio.engine.speed import optimize, resolve_speedup
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
