"""Make the two UNets fast on a GPU: CUDA graphs (the default there) and regional compilation (opt-in).

Measured on one H200 (bench/gpu_speed.py, bench/results/gpu_speed-NVIDIA_H200*.json), full model, 1024², batch 1:
stock diffusers 2.7 s; CUDA graphs 1.2 s with pixels identical to eager; compiled blocks + CUDA graphs 0.91-0.99 s.

- `use_cuda_graphs` replays each denoising step as one CUDA graph per input shape, so a step costs one launch
  instead of thousands: at batch 1 both UNets are launch-bound (eager Python issues ~200 block calls per step).
  The graph runs the same kernels as eager, so the pixels are the same bits.
- `compile_blocks` compiles each block's forward on its own (regional compilation; a whole-UNet compile of the
  prior had not finished after six minutes). The full model's blocks compile to 28 graphs (batch 1 and 4).
  Inductor fuses LayerNorm / GELU / GlobalResponseNorm / modulation, which rounds bf16 once where eager rounds
  after every op: pixels of the trained demo model move by 0.5/255 on average. Without CUDA graphs it is slower
  than eager on a GPU (its guards and wrappers add host time to a launch-bound loop), so on CUDA it always comes
  with graphs.

The engine's cancel hooks stay on the blocks' eager `__call__`, so under CUDA graphs cancellation takes effect at
the end of a step instead of inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNetOutput
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import MixingResidualBlock

from ..models.errors import ModelConfigError
from ..models.loading import CascadePipelines
from .cache import LRUCache

Speedup = Literal["off", "graphs", "compile"]
_compiled_with: tuple | None = None  # how blocks were last compiled in this process: dynamo's caches are global


def _unets(pipelines: CascadePipelines) -> tuple[torch.nn.Module, torch.nn.Module]:
    return pipelines.prior.prior, pipelines.decoder.decoder


def _compilable_blocks(pipelines: CascadePipelines) -> list[torch.nn.Module]:
    blocks = [block for unet in _unets(pipelines) for level in (*unet.down_blocks, *unet.up_blocks) for block in level]
    return blocks + [block for block in pipelines.decoder.vqgan.up_blocks if isinstance(block, MixingResidualBlock)]


def compile_blocks(
    pipelines: CascadePipelines, enabled: bool = True, dynamic: bool = True, options: dict[str, bool] | None = None
) -> None:
    """Regional compilation of the prior's and decoder's blocks and of Stage A's residual blocks (or its removal).

    dynamic=False compiles one graph per block shape (more graphs, longer cold start) so that Inductor can pick
    kernels for the exact sizes; `options` are Inductor settings (torch.compile's), such as tuning its kernels on
    this GPU. Changing either clears dynamo's caches, which would reuse graphs compiled the other way."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    blocks = _compilable_blocks(pipelines)
    for block in blocks:
        vars(block).pop("forward", None)
    if not enabled:
        return
    global _compiled_with
    settings = (dynamic, sorted((options or {}).items()))
    if _compiled_with not in (None, settings):
        torch._dynamo.reset()
    _compiled_with = settings
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=dynamic, options=options)


def use_channels_last(pipelines: CascadePipelines, enabled: bool = True) -> None:
    """Store both UNets' and Stage A's weights channels-last (NHWC), so that their convolutions run NHWC (every
    block permutes to channels-last for its LayerNorm and MLP anyway). Not part of a speed-up mode: on the H200 it
    took full at batch 1 from 1.21 to 1.16 s with graphs and left compile at 0.97 s, for 0.13 GiB more memory
    (bench/results/gpu_speed-NVIDIA_H200-channels-last*.json); bench/gpu_speed.py keeps measuring it."""
    form = torch.channels_last if enabled else torch.contiguous_format
    for module in (*_unets(pipelines), pipelines.decoder.vqgan):
        module.to(memory_format=form)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class GraphedForward:
    """A UNet's forward that captures one CUDA graph per input signature and replays it.

    Inputs are copied into the graph's static tensors and the output is cloned out, so callers can keep what they
    get across steps. All graphs of an engine share one memory pool: they never run at the same time.
    """

    def __init__(self, unet: torch.nn.Module, pool, max_graphs: int = 8):
        self.eager = unet.forward
        self.pool = pool
        self.graphs: LRUCache[_Graph] = LRUCache(max_graphs)  # sizes and batch sizes a studio user tries

    def __call__(self, return_dict: bool = True, **kwargs):
        if not all(isinstance(v, torch.Tensor) or v is None for v in kwargs.values()):
            return self.eager(return_dict=return_dict, **kwargs)  # e.g. sca/crp numbers: not worth a graph
        tensors = {k: v for k, v in kwargs.items() if v is not None}
        key = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(tensors.items()))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(tensors)
            self.graphs.put(key, entry)
        for name, value in tensors.items():
            entry.inputs[name].copy_(value)
        entry.graph.replay()
        sample = entry.output.clone()
        return StableCascadeUNetOutput(sample=sample) if return_dict else (sample,)

    def _capture(self, tensors: dict[str, torch.Tensor]) -> _Graph:
        inputs = {k: v.clone() for k, v in tensors.items()}
        side = torch.cuda.Stream(device=next(iter(inputs.values())).device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles and autotunes, which must not happen while capturing
            for _ in range(2):
                self.eager(return_dict=False, **inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.eager(return_dict=False, **inputs)[0]
        return _Graph(graph, inputs, output)


def use_cuda_graphs(pipelines: CascadePipelines, enabled: bool = True) -> None:
    """Install (or remove) CUDA-graph replay on both UNets. CUDA only, and not with CPU offload, whose hooks move
    weights during the forward."""
    for unet in _unets(pipelines):
        vars(unet).pop("forward", None)
    if not enabled:
        return
    if pipelines.device.type != "cuda" or pipelines.cpu_offload:
        raise ModelConfigError("speedup: CUDA graphs need a CUDA device without cpu_offload")
    pool = torch.cuda.graph_pool_handle()
    for unet in _unets(pipelines):
        unet.forward = GraphedForward(unet, pool)


def optimize(pipelines: CascadePipelines, speedup: Speedup) -> list[str]:
    """Apply a speed-up mode; returns what was applied, for banners and health checks.

    graphs: CUDA graphs alone: pixels identical to eager, no warm-up beyond one capture per shape.
    compile: compiled blocks as well (with CUDA graphs on CUDA): faster again, but bf16 pixels move a little (the
    fused kernels round once where eager rounds after every op) and the first image waits about a minute.
    """
    if speedup == "off":
        return []
    if pipelines.device.type != "cuda":
        if speedup == "graphs":
            raise ModelConfigError("speedup: 'graphs' needs a CUDA device; on this device choose off or compile")
        compile_blocks(pipelines)
        return ["compiled blocks"]
    if pipelines.cpu_offload:  # offload hooks move weights inside the forward; compile alone is slower than eager
        raise ModelConfigError(f"speedup: {speedup!r} does not work with cpu_offload; choose off")
    applied = []
    if speedup == "compile":
        compile_blocks(pipelines)
        applied.append("compiled blocks")
    use_cuda_graphs(pipelines)
    return applied + ["CUDA graphs"]


def reset_graphs(pipelines: CascadePipelines) -> None:
    """Forget the captured CUDA graphs: they replay the layers the UNets had when captured (a LoRA changes them)."""
    for unet in _unets(pipelines):
        forward = vars(unet).get("forward")
        if isinstance(forward, GraphedForward):
            forward.graphs.clear()


def release(pipelines: CascadePipelines) -> None:
    """Undo every speed-up (CUDA graphs, compiled blocks), so nothing keeps the model's tensors alive."""
    for unet in _unets(pipelines):
        vars(unet).pop("forward", None)
    for block in _compilable_blocks(pipelines):
        vars(block).pop("forward", None)


def resolve_speedup(speedup: str, device: torch.device, cpu_offload: bool) -> Speedup:
    """auto: CUDA graphs where they work (CUDA, no offload), else nothing."""
    if speedup == "auto":
        return "graphs" if device.type == "cuda" and not cpu_offload else "off"
    return speedup
