"""torchvision beside a CPU build of torch, made importable before anything else imports it.

PyPI's torchvision wheels are built against CUDA torch. Beside the CPU build (what `pip install torch==2.13.0`
gives on a CPU-only machine) its compiled ops (NMS and the like, which nothing here uses) do not load, and its
import then fails on two operators it registers unconditionally ("operator torchvision::nms does not exist").
transformers imports torchvision whenever it is installed, so that failure would take every model with it.
Declaring the two schemas first lets the pure-Python parts import, as torchvision means them to when its ops are
missing. Where torchvision's ops load (a CUDA torch, or torchvision's own CPU build) nothing is changed.
"""

from __future__ import annotations

import importlib.util
import sys

_library = None  # the declared schemas live as long as the process


def make_importable() -> None:
    global _library
    if _library is not None or importlib.util.find_spec("torchvision") is None:
        return
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401, F811
