"""Generation: validated requests in, images with seeds and timings out."""

from .engine import CascadeEngine, GenerationResult, PromptReport
from .progress import CancelToken, GenerationCancelled, ProgressEvent
from .request import ALLOWED, GenerationRequest, RequestError, make_request

__all__ = [
    "ALLOWED",
    "CancelToken",
    "CascadeEngine",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "ProgressEvent",
    "PromptReport",
    "RequestError",
    "make_request",
]
