"""The engine: a validated request in, images out, through diffusers' Stable Cascade pipelines.

What it adds to calling the two pipelines directly:
- per-image seeds for BOTH stages (image i uses seed + i with its own CPU generator), so any image of a batch
  can be regenerated alone, and the same request gives the same pixels on the same machine;
- text embeddings and prior outputs cached, so changing only decoder settings skips the prior;
- negative embeddings passed explicitly, so decoder guidance > 1 works with precomputed embeddings;
- progress with optional previews, per-stage timings, and cancellation that takes effect inside a step (each
  block of the two UNets and of Stage A's decoder checks the token), so a slow step does not delay Cancel;
- prompts longer than CLIP's window reported with the words that are cut;
- on CUDA, each denoising step replayed as a CUDA graph, optionally with compiled blocks (speed.py), and the
  host one step ahead of the GPU: the schedulers never wait for it (models/schedulers.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..config import Settings
from ..models.device import resolve_device, resolve_dtype
from ..models.loading import CascadePipelines, load_pipelines
from ..models.source import ModelIdentity, resolve_model
from .cache import LRUCache
from .progress import CancelToken, GenerationCancelled, ProgressCallback, ProgressEvent, Stage
from .request import GenerationRequest, make_request
from .speed import Speedup, optimize, resolve_speedup

Embeddings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _done(device: torch.device) -> float:
    """The time once the device has finished what was queued. The stages never wait for the GPU on their own (see
    models/schedulers.py), so without this wait a stage's time would be only the time it took to queue it."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter()


@dataclass
class GenerationResult:
    request: GenerationRequest  # with its seed fixed
    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float]  # seconds: text, prior, decoder, total
    prior_cached: bool
    model: ModelIdentity
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptReport:
    """How much of CLIP's window a prompt uses, and what falls outside it."""

    tokens: int
    limit: int
    cut_text: str

    @property
    def warning(self) -> str | None:
        if not self.cut_text:
            return None
        return f"prompt is {self.tokens} tokens; CLIP reads {self.limit}, so these words are cut: {self.cut_text!r}"


class CascadeEngine:
    """Runs requests on one loaded model. Thread-safe: calls are serialised."""

    def __init__(
        self,
        pipelines: CascadePipelines,
        *,
        speedup: Speedup = "off",
        text_cache_size: int = 32,
        prior_cache_size: int = 8,
    ):
        self.pipelines = pipelines
        self._text_cache: LRUCache[Embeddings] = LRUCache(text_cache_size)
        self._prior_cache: LRUCache[torch.Tensor] = LRUCache(prior_cache_size)
        self._lock = threading.Lock()
        self._cancel: CancelToken | None = None  # the running call's token; calls are serialised by _lock
        decoder = pipelines.decoder
        for blocks in (
            *pipelines.prior.prior.down_blocks,
            *pipelines.prior.prior.up_blocks,
            *decoder.decoder.down_blocks,
            *decoder.decoder.up_blocks,
            decoder.vqgan.up_blocks,
        ):
            for block in blocks:
                block.register_forward_pre_hook(self._check_cancel)
        self.speedups = optimize(pipelines, speedup)  # see engine/speed.py

    def _check_cancel(self, module, args) -> None:
        # Never while a CUDA graph is being captured: an exception there would leave the capture half done.
        if self._cancel is not None and self._cancel.cancelled and not _capturing():
            raise GenerationCancelled

    @classmethod
    def from_settings(cls, settings: Settings) -> CascadeEngine:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        source = resolve_model(settings.model, revision=settings.revision, cache_dir=settings.cache_dir)
        speedup = resolve_speedup(settings.speedup, device, settings.cpu_offload)
        return cls(load_pipelines(source, device, dtype, cpu_offload=settings.cpu_offload), speedup=speedup)

    @property
    def identity(self) -> ModelIdentity:
        return self.pipelines.identity

    def describe(self) -> dict[str, str]:
        """What runs where, for health checks and banners."""
        p = self.pipelines
        return {
            "model": self.identity.name,
            "device": str(p.device),
            "dtype": str(p.dtype).removeprefix("torch."),
            "speedups": ", ".join(self.speedups) or "none",
        }

    def request(self, /, **fields) -> GenerationRequest:
        """A validated request in which unset fields take this model's defaults (the demo model: 128x128)."""
        return make_request(**(self.pipelines.defaults | fields))

    def prompt_report(self, text: str) -> PromptReport:
        tokenizer = self.pipelines.prior.tokenizer
        ids = tokenizer(text, truncation=False).input_ids  # with start and end tokens
        limit = tokenizer.model_max_length
        cut = tokenizer.decode(ids[limit - 1 : -1]) if len(ids) > limit else ""
        return PromptReport(tokens=len(ids) - 2, limit=limit - 2, cut_text=cut.strip())

    def __call__(
        self,
        request: GenerationRequest,
        *,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        request = request.with_seed()
        cancel = cancel or CancelToken()
        with self._lock, torch.inference_mode():
            self._cancel = cancel
            try:
                return self._generate(request, progress, cancel)
            finally:
                self._cancel = None

    def _generate(self, request: GenerationRequest, progress: ProgressCallback | None, cancel: CancelToken):
        start = time.perf_counter()
        timings: dict[str, float] = {"text": 0.0, "prior": 0.0, "decoder": 0.0}
        warnings = [w for w in (self.prompt_report(request.prompt).warning,) if w]
        if cancel.cancelled:
            raise GenerationCancelled

        text_key = (request.prompt, request.negative_prompt)
        embeddings = self._text_cache.get(text_key)
        if embeddings is None:
            t = time.perf_counter()
            embeddings = self._encode(request.prompt, request.negative_prompt)
            self._text_cache.put(text_key, embeddings)
            timings["text"] = _done(self.pipelines.device) - t

        seeds = request.image_seeds
        prior_key = (text_key, request.width, request.height, request.prior_steps, request.prior_guidance, tuple(seeds))
        latents = self._prior_cache.get(prior_key)
        prior_cached = latents is not None
        if latents is None:
            t = time.perf_counter()
            callback = self._callback("prior", request.prior_steps, start, progress, cancel)
            latents = self._run_prior(request, embeddings, callback)
            self._prior_cache.put(prior_key, latents)
            timings["prior"] = _done(self.pipelines.device) - t

        t = time.perf_counter()
        callback = self._callback("decoder", request.decoder_steps, start, progress, cancel, prior_cached)
        images = self._run_decoder(request, embeddings, latents, callback)
        timings["decoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        return GenerationResult(request, images, seeds, timings, prior_cached, self.identity, warnings)

    def _encode(self, prompt: str, negative_prompt: str) -> Embeddings:
        """Prompt and negative embeddings for one image, computed once by the shared text encoder."""
        pipe = self.pipelines.prior
        return pipe.encode_prompt(
            device=self.pipelines.device,
            batch_size=1,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            prompt=prompt,
            negative_prompt=negative_prompt,
        )

    @staticmethod
    def _generators(seeds: list[int]) -> list[torch.Generator]:
        # CPU generators: the same noise on every device, so seeds mean the same thing on CPU and GPU.
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def _embedding_kwargs(self, embeddings: Embeddings, n: int, with_negative: bool) -> dict[str, torch.Tensor]:
        prompt, pooled, negative, negative_pooled = (e.repeat_interleave(n, dim=0) for e in embeddings)
        kwargs = {"prompt_embeds": prompt, "prompt_embeds_pooled": pooled}
        if with_negative:
            kwargs |= {"negative_prompt_embeds": negative, "negative_prompt_embeds_pooled": negative_pooled}
        return kwargs

    def _run_prior(self, request: GenerationRequest, embeddings: Embeddings, callback) -> torch.Tensor:
        # The prior concatenates negatives whenever it is given them, so pass them only when guidance is on.
        out = self.pipelines.prior(
            height=request.height,
            width=request.width,
            num_inference_steps=request.prior_steps,
            guidance_scale=request.prior_guidance,
            generator=self._generators(request.image_seeds),
            output_type="pt",
            callback_on_step_end=callback,
            **self._embedding_kwargs(embeddings, request.num_images, with_negative=request.prior_guidance > 1),
        )
        return out.image_embeddings

    def _run_decoder(self, request: GenerationRequest, embeddings: Embeddings, latents: torch.Tensor, callback):
        # Negatives always go in: diffusers' combined pipeline omits them and crashes when decoder guidance > 1.
        pipe = self.pipelines.decoder
        out = pipe(
            image_embeddings=latents,
            num_inference_steps=request.decoder_steps,
            guidance_scale=request.decoder_guidance,
            generator=self._generators(request.image_seeds),
            output_type="pt",
            callback_on_step_end=callback,
            **self._embedding_kwargs(embeddings, request.num_images, with_negative=True),
        )
        # diffusers' numpy_to_pil on the device: the same float32 arithmetic, a quarter of the bytes to copy back.
        pixels = (out.images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(image) for image in pixels]

    def _callback(
        self,
        stage: Stage,
        total: int,
        start: float,
        progress: ProgressCallback | None,
        cancel: CancelToken,
        prior_cached: bool = False,
    ):
        previewer = self.pipelines.previewer if stage == "prior" else None
        queued: list[torch.cuda.Event] = []  # the step before this one, on CUDA

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            # Run at most one step ahead of the GPU: it always has the next step queued, so it never idles while
            # the host prepares one, and progress and Cancel stay within a step of what the GPU is doing.
            if self.pipelines.device.type == "cuda":
                queued.append(torch.cuda.Event())
                queued[-1].record()
                if len(queued) > 1:
                    queued.pop(0).synchronize()
            if progress is not None:
                preview = self._preview(tensors["latents"][:1]) if previewer is not None else None
                progress(ProgressEvent(stage, step + 1, total, time.perf_counter() - start, preview, prior_cached))
            if cancel.cancelled:
                raise GenerationCancelled
            return {}

        return on_step_end

    def _preview(self, latents: torch.Tensor) -> Image.Image:
        rgb = self.pipelines.previewer(latents.float())[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray((rgb * 255).round().astype("uint8"))
