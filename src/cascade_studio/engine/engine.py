"""The engine: a validated request in, images out, through diffusers' Stable Cascade pipelines.

What it adds to calling the two pipelines directly:
- per-image seeds for BOTH stages (image i uses seed + i with its own CPU generator), so any image of a batch
  can be regenerated alone, and the same request gives the same pixels on the same machine;
- text embeddings and prior outputs cached, so changing only decoder settings skips the prior;
- negative embeddings passed explicitly, so decoder guidance > 1 works with precomputed embeddings;
- progress with optional previews, per-stage timings, and cancellation that takes effect inside a step (each
  block of the two UNets and of Stage A's decoder checks the token), so a slow step does not delay Cancel;
- prompts longer than CLIP's window reported with the words that are cut;
- a model trained at one size only (the demo, 128x128) drawing at that size, its picture carried out to the shape
  asked for and enlarged, not its scene repeated over a latent larger than it learnt;
- starting from a picture: image-to-image (the input's Stage C latent noised to `strength`, and only the rest of
  the prior's steps run), inpainting (the kept part of the latent put back at every step, the kept pixels pasted
  back after decoding) and image prompts (CLIP image embeddings, weighted);
- on CUDA, each denoising step replayed as a CUDA graph, optionally with compiled blocks (speed.py), and the
  host one step ahead of the GPU: the schedulers never wait for it (models/schedulers.py).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..config import Settings
from ..models.device import resolve_device, resolve_dtype
from ..models.errors import ModelConfigError
from ..models.image_encoder import encode, latent_size, load_image_encoder
from ..models.loading import CascadePipelines, load_pipelines
from ..models.lora import LoraLibrary, LoraStack, LoraWeights, read_lora
from ..models.source import ModelIdentity, source_for
from .cache import LRUCache
from .inputs import cut_to_shape, fit, fit_note, grow_to_shape, grown_size, paste_back
from .progress import CancelToken, GenerationCancelled, ProgressCallback, ProgressEvent, Stage
from .request import GenerationRequest, RequestError, make_request
from .speed import Speedup, optimize, release, reset_graphs, resolve_speedup

Embeddings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Pictures = dict[str, Image.Image]  # sha256 -> picture: the inputs a request names, by hash (store.pictures)


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


@dataclass
class Start:
    """Where a request starts from a picture: the input at the target size and its Stage C latent; with a mask,
    the mask at that size (white = repaint) and on the latent's grid (1 = repaint)."""

    image: Image.Image
    latent: torch.Tensor  # (1, 16, h, w)
    mask: Image.Image | None = None
    latent_mask: torch.Tensor | None = None  # (1, 1, h, w)


@dataclass(frozen=True)
class PromptReport:
    """How much of the text encoder's window a prompt uses, the whole words that fall outside it, and, for a model
    that knows only the words it was trained on (the demo model), the words it does not know."""

    tokens: int
    limit: int
    cut_text: str
    unknown: tuple[str, ...] = ()
    hint: str | None = None  # what the model draws, in a line

    @property
    def warnings(self) -> list[str]:
        out = []
        if self.cut_text:
            out.append(
                f"prompt is {self.tokens} tokens; the text encoder reads {self.limit}, so these words are cut: "
                f"{self.cut_text!r}"
            )
        if self.unknown:
            out.append(
                f"this model does not know the words {', '.join(map(repr, self.unknown))}"
                + (f"; {self.hint}" if self.hint else "")
            )
        return out


class CascadeEngine:
    """Runs requests on one loaded model. Thread-safe: calls are serialised."""

    def __init__(
        self,
        pipelines: CascadePipelines,
        *,
        speedup: Speedup = "off",
        text_cache_size: int = 32,
        prior_cache_size: int = 8,
        lora_dir: Path | None = None,
    ):
        self.pipelines = pipelines
        self.lora_library = LoraLibrary(lora_dir)
        self.loras = LoraStack(
            {
                "prior": pipelines.prior.prior,
                "decoder": pipelines.decoder.decoder,
                "text_encoder": pipelines.prior.text_encoder,
            }
        )
        self._lora_files: LRUCache[LoraWeights] = LRUCache(16)
        # Held while peft swaps layers and while a file is mapped onto them: a request checked in an API thread
        # never walks the module tree as the worker changes it (short: not the whole generation, as _lock is).
        self.layers_lock = threading.Lock()
        self._text_cache: LRUCache[Embeddings] = LRUCache(text_cache_size)
        self._prior_cache: LRUCache[torch.Tensor] = LRUCache(prior_cache_size)
        self._latent_cache: LRUCache[torch.Tensor] = LRUCache(8)  # encoded input pictures
        self._lock = threading.Lock()
        self._cancel: CancelToken | None = None  # the running call's token; calls are serialised by _lock
        self._hooks: list = []
        decoder = pipelines.decoder
        for blocks in (
            *pipelines.prior.prior.down_blocks,
            *pipelines.prior.prior.up_blocks,
            *decoder.decoder.down_blocks,
            *decoder.decoder.up_blocks,
            decoder.vqgan.up_blocks,
        ):
            for block in blocks:
                self._hooks.append(block.register_forward_pre_hook(self._check_cancel))
        self.speedups = optimize(pipelines, speedup)  # see engine/speed.py

    def _check_cancel(self, module, args) -> None:
        # Never while a CUDA graph is being captured: an exception there would leave the capture half done.
        if self._cancel is not None and self._cancel.cancelled and not _capturing():
            raise GenerationCancelled

    @classmethod
    def from_settings(cls, settings: Settings, progress=None) -> CascadeEngine:
        """Load the model the settings name; `progress(done, total, what)` as each component loads."""
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        source = source_for(settings)
        speedup = resolve_speedup(settings.speedup, device, settings.cpu_offload)
        pipelines = load_pipelines(source, device, dtype, cpu_offload=settings.cpu_offload, progress=progress)
        return cls(pipelines, speedup=speedup, lora_dir=settings.lora_folder)

    def image_encoder(self) -> torch.nn.Module:
        """The model's image encoder (image -> Stage C latent), loaded the first time it is needed.

        Raises:
            ModelConfigError: the model has none on disk (the official one comes with `cascade-studio download`).
        """
        if getattr(self, "_image_encoder", None) is None:
            path = self.pipelines.image_encoder_path
            if path is None:
                raise ModelConfigError(
                    f"image encoder: {self.identity.name} has none on this machine "
                    "(for the official models `cascade-studio download full` fetches "
                    "effnet_encoder.safetensors)"
                )
            self._image_encoder = load_image_encoder(path, self.pipelines.device, self.pipelines.dtype)
        return self._image_encoder

    def remove_loras(self) -> None:
        """Back to the base model (LoRA training adapts the bare model, whatever the last request used)."""
        with self.layers_lock:
            changed = self.loras.activate([])
        if changed:
            reset_graphs(self.pipelines)

    def clear_caches(self) -> None:
        """Forget cached text embeddings and prior outputs (the weights under them changed: LoRA training)."""
        self._text_cache.clear()
        self._prior_cache.clear()
        self._latent_cache.clear()

    def close(self) -> None:
        """Let go of the model: weights, caches, CUDA graphs and compiled blocks, so a model switch can reuse the
        memory. The engine cannot generate afterwards."""
        with self._lock:
            self._text_cache.clear()
            self._prior_cache.clear()
            self.loras.unload()
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
            release(self.pipelines)
            self.pipelines = None

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
        """A validated request in which unset fields take this model's defaults (the demo model: 128x128), its
        LoRAs found and checked against this model."""
        return self.prepare(make_request(**(self.pipelines.defaults | fields)))

    def prompt_report(self, text: str, known: frozenset[str] = frozenset()) -> PromptReport:
        """Tokens used of the window, the whole words past it, and unknown words (closed-vocabulary models; `known`:
        words the active LoRAs were trained on)."""
        tokenizer = self.pipelines.prior.tokenizer
        limit = tokenizer.model_max_length - 2  # the window holds the start and end tokens too
        words = text.split()
        counts = [len(tokenizer.tokenize(word)) for word in words]
        used, first_cut = 0, len(words)
        for i, count in enumerate(counts):
            used += count
            if used > limit:
                first_cut = i  # a word cut in the middle is cut: it is no longer the word
                break
        help_ = self.pipelines.prompt_help
        unknown: tuple[str, ...] = ()
        if help_.get("closed_vocabulary"):
            vocab = tokenizer.get_vocab()
            stripped = (w.strip(".,;:!?\"'()").lower() for w in words)
            unknown = tuple(dict.fromkeys(w for w in stripped if w and f"{w}</w>" not in vocab and w not in known))
        return PromptReport(
            tokens=len(tokenizer(text, truncation=False).input_ids) - 2,
            limit=limit,
            cut_text=" ".join(words[first_cut:]),
            unknown=unknown,
            hint=help_.get("hint"),
        )

    def __call__(
        self,
        request: GenerationRequest,
        *,
        pictures: Pictures | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        """Generate the images a request asks for.

        Args:
            request: a validated request (`make_request` or `engine.request`); without a seed a random one is fixed.
            pictures: the pictures the request names by hash (init_image, mask, image_prompts), as decoded.
            progress: called after every step of either stage, from this thread, with a preview of the prior's
                latent when the model has a previewer.
            cancel: set it from any thread to stop within the current block of a network.
        Returns:
            The images, image i made with seed + i, with the request (seed fixed), timings, whether the prior came
            from the cache, the model's identity and warnings (words cut from or unknown to the text encoder).
        Raises:
            RequestError: a picture the request names is not among `pictures`, or the model cannot use it.
            GenerationCancelled: the token was set; nothing of the unfinished run is kept.
            torch.OutOfMemoryError: the device ran out of memory (the job queue fails only that job).
        """
        request = self.prepare(request).with_seed()
        cancel = cancel or CancelToken()
        with self._lock:
            lora_key = self._activate_loras(request)  # outside inference mode: peft's layers must stay trainable
            with torch.inference_mode():
                self._cancel = cancel
                try:
                    return self._generate(request, pictures or {}, progress, cancel, lora_key)
                finally:
                    self._cancel = None

    def read_lora(self, path: Path) -> LoraWeights:
        """A LoRA file read and mapped onto this model (kept for the next run while the file is unchanged)."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        weights = self._lora_files.get(key)
        if weights is None:
            with self.layers_lock:
                weights = read_lora(path, self.loras.models, self.pipelines.prior.tokenizer)
            self._lora_files.put(key, weights)
        return weights

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """The request with each LoRA found, checked against this model and its file's hash filled in.

        Raises:
            RequestError: a LoRA that is not there, does not fit this model, or is not the file a hash names.
        """
        self._check_pictures(request)
        if not request.loras:
            return request
        problems, specs = [], []
        for i, spec in enumerate(request.loras):
            try:
                weights = self.read_lora(self.lora_library.find(spec.name))
            except ModelConfigError as exc:
                problems.append(f"loras.{i}.name: {str(exc).removeprefix('lora: ')}")
                continue
            if spec.sha256 and spec.sha256 != weights.sha256:
                problems.append(
                    f"loras.{i}.sha256: the file named {spec.name!r} here is sha256:{weights.sha256}, "
                    f"not the sha256:{spec.sha256} asked for"
                )
            specs.append(spec.model_copy(update={"sha256": weights.sha256}))
        if problems:
            raise RequestError(problems)
        return request.model_copy(update={"loras": specs})

    def _check_pictures(self, request: GenerationRequest) -> None:
        """Refuse picture inputs this model cannot take, before the request waits in a queue."""
        problems = []
        if request.init_image and self.pipelines.image_encoder_path is None:
            problems.append(
                f"init_image: {self.identity.name} has no image encoder on this machine, so it cannot start from "
                "a picture (for the official models `cascade-studio download full` fetches effnet_encoder.safetensors)"
            )
        if request.image_prompts and self.pipelines.image_tower_path is None:
            problems.append(
                f"image_prompts: {self.identity.name} has no CLIP image tower on this machine, so it cannot take "
                "image prompts (for the official models `cascade-studio download full --with-image-prompts` fetches it)"
            )
        if problems:
            raise RequestError(problems)

    def warnings(self, request: GenerationRequest) -> list[str]:
        """What to tell the person about their prompt: words cut off, words the model (and its LoRAs) never saw; and
        a size other than the only one a small model was trained at (see drawing_size)."""
        out = self.prompt_report(request.prompt, self.lora_words(request)).warnings
        (w, h), (dw, dh) = (request.width, request.height), self.drawing_size(request.width, request.height)
        if (dw, dh) == (w, h):
            return out
        said = f"size: {self.identity.name} was trained on {dw}x{dh} pictures only, so it drew this one at {dw}x{dh}"
        if dw * h == dh * w:
            out.append(f"{said} and enlarged it to {w}x{h}")
            return out
        grown = grown_size((dw, dh), w, h)
        done = (
            f"carried its edges out to {w}x{h}"
            if grown == (w, h)
            else f"carried its edges out to {grown[0]}x{grown[1]} and enlarged it to {w}x{h}"
        )
        middle = "square" if dw == dh else f"{dw}:{dh} part"
        out.append(
            f"{said}, {done}" + (f"; it started from the init_image's middle {middle}" if request.init_image else "")
        )
        return out

    def drawing_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the model draws a width x height picture at. A model trained at one size only (the demo:
        128x128, a 3x3 latent) draws at that size whatever is asked for: run on a larger latent its prior repeats
        the scene it learnt, and its Stage B, run larger, draws many small shapes at its own scale, slowly (26 s at
        1792x1024 on 2 threads; bench/demo_sizes.py). Its picture is then carried out to the shape asked for in its
        border's colour (its backgrounds are plain) and enlarged. Other models draw at the size asked for."""
        trained = self.pipelines.prompt_help.get("trained_size")
        return (int(trained[0]), int(trained[1])) if trained else (width, height)

    def lora_words(self, request: GenerationRequest) -> frozenset[str]:
        """The words the request's LoRAs were trained on (their trigger words and captions, as the files say)."""
        return self.words_of_loras([spec.name for spec in request.loras])

    def words_of_loras(self, names: list[str]) -> frozenset[str]:
        words: set[str] = set()
        for name in names:
            try:
                metadata = self.read_lora(self.lora_library.find(name)).metadata
            except (ModelConfigError, OSError):
                continue  # gone since the request was checked: its run says so
            for key in ("cascade_studio.trigger_words", "cascade_studio.caption_words"):
                words |= {w.lower() for w in re.split(r"[,\s]+", metadata.get(key, "")) if w}
        return frozenset(words)

    def _activate_loras(self, request: GenerationRequest) -> tuple:
        """Put exactly the request's LoRAs on the model; their key, for the caches (and CUDA graphs, captured with
        the layers they had, are captured again)."""
        loras = [(self.read_lora(self.lora_library.find(s.name)), s.weight) for s in request.loras]
        with self.layers_lock:
            changed = self.loras.activate(loras)
        if changed:
            reset_graphs(self.pipelines)
        return self.loras.key()

    def _generate(
        self,
        request: GenerationRequest,
        pictures: Pictures,
        progress: ProgressCallback | None,
        cancel: CancelToken,
        lora_key: tuple = (),
    ):
        start = time.perf_counter()
        timings: dict[str, float] = {"text": 0.0, "prior": 0.0, "decoder": 0.0}
        warnings = self.warnings(request)
        missing = [h for h in request.pictures if h not in pictures]
        if missing:
            raise RequestError([f"{request.field_of(h)}: no picture with sha256 {h} was given" for h in missing])
        if cancel.cancelled:
            raise GenerationCancelled
        begin = self._start(request, pictures, warnings)

        text_loras = lora_key if "text_encoder" in self.loras.roles else ()  # a LoRA of the text encoder too
        text_key = (request.prompt, request.negative_prompt, text_loras)
        embeddings = self._text_cache.get(text_key)
        if embeddings is None:
            t = time.perf_counter()
            embeddings = self._encode(request.prompt, request.negative_prompt)
            self._text_cache.put(text_key, embeddings)
            timings["text"] = _done(self.pipelines.device) - t

        seeds = request.image_seeds
        prior_key = (
            text_key,
            lora_key,
            request.width,
            request.height,
            request.prior_steps,
            request.prior_guidance,
            tuple(seeds),
            (request.init_image, request.mask, request.strength, request.fit) if begin else None,
            tuple(request.image_prompts),
        )
        latents = self._prior_cache.get(prior_key)
        prior_cached = latents is not None
        if latents is None:
            t = time.perf_counter()
            image_embeds = self._image_embeds(request, pictures)  # the CLIP tower runs only when the prior does
            latents = self._run_prior(request, embeddings, begin, image_embeds, start, progress, cancel)
            self._prior_cache.put(prior_key, latents)
            timings["prior"] = _done(self.pipelines.device) - t

        t = time.perf_counter()
        callback = self._callback(
            "decoder", request.decoder_steps, start, progress, cancel, cached_latents=latents if prior_cached else None
        )
        images = self._run_decoder(request, embeddings, latents, callback)
        images = [self._to_size(image, request) for image in images]
        if begin is not None and begin.mask is not None:
            images = [paste_back(image, begin.image, begin.mask) for image in images]
        timings["decoder"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        return GenerationResult(request, images, seeds, timings, prior_cached, self.identity, warnings)

    @staticmethod
    def _to_size(image: Image.Image, request: GenerationRequest) -> Image.Image:
        """A picture drawn at drawing_size, at the size asked for: carried out to its shape, then enlarged."""
        return fit(grow_to_shape(image, request.width, request.height), request.width, request.height, "resize")

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

    def _run_prior(
        self,
        request: GenerationRequest,
        embeddings: Embeddings,
        begin: Start | None,
        image_embeds: torch.Tensor | None,
        started: float,
        progress: ProgressCallback | None,
        cancel: CancelToken,
    ) -> torch.Tensor:
        """Stage C's latents. From a picture: its latent noised to `strength` (one draw of each image's generator),
        and only the last `strength` of the steps; with a mask, the kept part of the latent is the input's, noised
        to each step's level, after every step. Strength 1 without a mask is text-to-image exactly."""
        n, pipe = request.num_images, self.pipelines.prior
        generators = self._generators(request.image_seeds)
        kwargs = self._embedding_kwargs(embeddings, n, with_negative=request.prior_guidance > 1)
        if image_embeds is not None:
            kwargs["image_embeds"] = image_embeds
        steps, strength, blend = request.prior_steps, 1.0, None
        if begin is not None and (request.strength < 1 or begin.latent_mask is not None):
            x0 = begin.latent.repeat(n, 1, 1, 1)
            if request.strength == 0:
                return x0  # the input's own latent: Stage B and A reconstruct the picture
            strength, steps = request.strength, max(1, round(request.prior_steps * request.strength))
            noise = randn_tensor(x0.shape, generator=generators, device=x0.device, dtype=x0.dtype)
            kwargs["latents"] = pipe.scheduler.add_noise(x0, noise, torch.full((n,), strength, device=x0.device))
            if begin.latent_mask is not None:
                blend = _keeper(pipe.scheduler, x0, noise, begin.latent_mask, torch.linspace(strength, 0.0, steps + 1))
        callback = self._callback("prior", steps, started, progress, cancel, blend=blend)
        pipe.scheduler.start = strength  # see models/schedulers.py
        try:
            # The prior concatenates negatives whenever it is given them, so pass them only when guidance is on.
            width, height = self.drawing_size(request.width, request.height)
            out = pipe(
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=request.prior_guidance,
                generator=generators,
                output_type="pt",
                callback_on_step_end=callback,
                **kwargs,
            )
        finally:
            pipe.scheduler.start = 1.0
        return out.image_embeddings

    def _start(self, request: GenerationRequest, pictures: Pictures, warnings: list[str]) -> Start | None:
        """The input picture (and mask) at the target size, with the input's latent (cached by hash and size)."""
        if request.init_image is None or (request.strength == 1 and request.mask is None):
            return None  # strength 1 leaves nothing of the input: text-to-image, to the pixel
        w, h, how = request.width, request.height, request.fit
        source = pictures[request.init_image].convert("RGB")
        image = fit(source, w, h, how)
        if note := fit_note(source.size, w, h, how, "init_image"):
            warnings.append(note)
        key = (request.init_image, w, h, how)
        drawn = self.drawing_size(w, h)
        latent = self._latent_cache.get(key)
        if latent is None:
            p = self.pipelines
            shaped = np.array(cut_to_shape(image, *drawn))  # its middle, when the model draws another shape
            pixels = torch.from_numpy(shaped).permute(2, 0, 1)[None].to(p.device, torch.float32) / 255
            encoder = self.image_encoder()
            latent = encode(encoder, pixels.to(next(encoder.parameters()).dtype), *drawn).to(p.dtype)
            self._latent_cache.put(key, latent)
        if request.mask is None:
            return Start(image, latent)
        mask = pictures[request.mask].convert("L")
        if mask.size != source.size:
            warnings.append(
                f"mask: {mask.width}x{mask.height} resized to the init_image's size, {source.width}x{source.height}"
            )
            mask = mask.resize(source.size, Image.Resampling.BILINEAR)
        mask = fit(mask, w, h, how, fill=0)
        repaint = torch.from_numpy(np.array(cut_to_shape(mask, *drawn)) >= 128).float()[None, None]
        latent_mask = torch.nn.functional.adaptive_max_pool2d(repaint, latent_size(*drawn))  # any repainted pixel
        return Start(image, latent, mask, latent_mask.to(latent.device, latent.dtype))

    def _image_embeds(self, request: GenerationRequest, pictures: Pictures) -> torch.Tensor | None:
        """The image prompts as the prior's CLIP image embeddings (1, N, D), each scaled by its weight: weight 0 is
        the zero embedding the prior sees when there is no image prompt."""
        if not request.image_prompts:
            return None
        tower, processor = self.image_tower()
        p = self.pipelines
        embeds = []
        for prompt in request.image_prompts:
            pixels = processor(images=pictures[prompt.image].convert("RGB"), return_tensors="pt").pixel_values
            embeds.append(tower(pixels.to(p.device, tower.dtype)).image_embeds * prompt.weight)
        return torch.stack(embeds, dim=1).to(p.dtype)

    def image_tower(self):
        """The prior's CLIP image tower and its feature extractor, loaded the first time an image prompt comes (on
        the engine's device: diffusers' `.to()` would leave a tower the pipeline does not own behind)."""
        if getattr(self, "_image_tower", None) is None:
            folder = self.pipelines.image_tower_path
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            tower = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", use_safetensors=True)
            tower = tower.to(self.pipelines.device, self.pipelines.dtype).eval()
            self._image_tower = tower, CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
        return self._image_tower

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
        cached_latents: torch.Tensor | None = None,
        blend=None,
    ):
        """The step callback of one stage: progress (with previews of the prior's latent; on a cached prior, its
        preview once at the decoder's first step), cancellation, staying one step ahead of the GPU, and (inpainting)
        `blend(step, latents)`, the latents the next step starts from."""
        previewer = self.pipelines.previewer
        prior_cached = cached_latents is not None
        queued: list[torch.cuda.Event] = []  # the step before this one, on CUDA

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            out = {} if blend is None else {"latents": blend(step, tensors["latents"])}
            tensors = tensors | out
            # Run at most one step ahead of the GPU: it always has the next step queued, so it never idles while
            # the host prepares one, and progress and Cancel stay within a step of what the GPU is doing.
            if self.pipelines.device.type == "cuda":
                queued.append(torch.cuda.Event())
                queued[-1].record()
                if len(queued) > 1:
                    queued.pop(0).synchronize()
            if progress is not None:
                preview = None
                if previewer is not None and stage == "prior":
                    preview = self._preview(tensors["latents"][:1])
                elif previewer is not None and prior_cached and step == 0:
                    preview = self._preview(cached_latents[:1])
                progress(ProgressEvent(stage, step + 1, total, time.perf_counter() - start, preview, prior_cached))
            if cancel.cancelled:
                raise GenerationCancelled
            return out

        return on_step_end

    def _preview(self, latents: torch.Tensor) -> Image.Image:
        rgb = self.pipelines.previewer(latents.float())[0].permute(1, 2, 0).cpu().numpy()
        return Image.fromarray((rgb * 255).round().astype("uint8"))


def _keeper(scheduler, x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor):
    """Inpainting's step: after step i the latents are at timesteps[i + 1]; the kept part (mask 0) becomes the
    input's latent noised to that level (the same noise as the start), and at the last step the input's own."""

    def blend(step: int, latents: torch.Tensor) -> torch.Tensor:
        t = float(timesteps[step + 1])
        known = x0 if t == 0 else scheduler.add_noise(x0, noise, torch.full((x0.shape[0],), t, device=x0.device))
        return torch.lerp(known, latents, mask)

    return blend
