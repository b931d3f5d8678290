"""A generation request: every field validated, nothing silently changed.

diffusers accepts values that give broken or surprising results (0 steps returns noise, NaN or negative guidance
is ignored, a width of 1000 silently becomes 1024 and 720 crashes inside pixel_unshuffle). We refuse them with a
message that names the field and the allowed values.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..config import field_error

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
SIZE_STEP, MIN_SIZE, MAX_SIZE = 128, 128, 2048
MAX_STEPS, MAX_GUIDANCE, MAX_IMAGES = 100, 20.0, 8
MAX_LORAS, MAX_LORA_WEIGHT = 8, 4.0
MAX_IMAGE_PROMPTS, MAX_IMAGE_PROMPT_WEIGHT = 4, 2.0
FITS = ("crop", "pad", "resize")


def nearest_size(pixels: float) -> int:
    """The allowed side length nearest to `pixels`: a multiple of SIZE_STEP within MIN_SIZE-MAX_SIZE."""
    return int(min(MAX_SIZE, max(MIN_SIZE, round(float(pixels) / SIZE_STEP) * SIZE_STEP)))


# The allowed values of each field, in words: used for error messages, CLI help and UI hints alike.
ALLOWED = {
    "prompt": f"text of at most {MAX_PROMPT_CHARS} characters",
    "negative_prompt": f"text of at most {MAX_PROMPT_CHARS} characters",
    "width": f"a multiple of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE}",
    "height": f"a multiple of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE}",
    "prior_steps": f"a whole number from 1 to {MAX_STEPS}",
    "decoder_steps": f"a whole number from 1 to {MAX_STEPS}",
    "prior_guidance": f"a finite number from 0 to {MAX_GUIDANCE:g}",
    "decoder_guidance": f"a finite number from 0 to {MAX_GUIDANCE:g}",
    "num_images": f"a whole number from 1 to {MAX_IMAGES}",
    "seed": f"a whole number from 0 to {MAX_SEED}, or none for a random seed",
    "loras": f'a list of at most {MAX_LORAS} LoRAs, each {{"name": ..., "weight": ...}}',
    "loras.name": "a LoRA's name: its file name without .safetensors (letters, digits, '.', '-', '_')",
    "loras.weight": f"a finite number from -{MAX_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}",
    "loras.sha256": "the first 12 hex digits of the file's SHA-256",
    "init_image": "a picture's SHA-256 (64 hex digits) as the store keeps it, or none for text-to-image",
    "mask": "a mask picture's SHA-256 (64 hex digits; white = repaint), with an init_image",
    "strength": "a finite number from 0 (keep the input) to 1 (ignore it)",
    "fit": f"one of {', '.join(FITS)}: how the input meets the target size",
    "image_prompts": f'a list of at most {MAX_IMAGE_PROMPTS} image prompts, each {{"image": ..., "weight": ...}}',
    "image_prompts.image": "a picture's SHA-256 (64 hex digits) as the store keeps it",
    "image_prompts.weight": f"a finite number from 0 to {MAX_IMAGE_PROMPT_WEIGHT:g}",
}

Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Size = Annotated[int, Field(ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_STEP)]
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
Guidance = Annotated[float, Field(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # a picture, by the hash of its PNG (engine/inputs.py)


class LoraSpec(BaseModel):
    """One LoRA to apply: its name (the file's stem in the LoRA folder) and strength. `sha256` is filled in when it
    runs, so a stored request names the exact file."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[\w.\-]{1,120}$")]
    weight: Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False)] = 1.0
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")] | None = None


class ImagePrompt(BaseModel):
    """A reference picture the prior sees through its CLIP image embedding, and how strongly (0 = not at all)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    image: Sha256
    weight: Annotated[float, Field(ge=0.0, le=MAX_IMAGE_PROMPT_WEIGHT, allow_inf_nan=False)] = 1.0


# A1111's way of asking for a LoRA in the prompt: <lora:name:weight>, the weight optional.
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")


def split_lora_tags(prompt: str) -> tuple[str, list[dict]]:
    """The prompt without its <lora:name:weight> tags, and the LoRAs they ask for (as request fields)."""
    loras = []
    for name, weight in LORA_TAG.findall(prompt):
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            value = weight  # left as text: validation names the field and its range
        loras.append({"name": name.strip(), "weight": value})
    cleaned = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(LORA_TAG.sub(" ", prompt).split()))
    return cleaned.strip(" ,"), loras


class GenerationRequest(BaseModel):
    """What to generate. Defaults are Stability's recommendation for Stable Cascade."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    prompt: Text
    negative_prompt: Text = ""
    width: Size = 1024
    height: Size = 1024
    prior_steps: Steps = 20
    prior_guidance: Guidance = 4.0
    decoder_steps: Steps = 10
    decoder_guidance: Guidance = 0.0
    num_images: Annotated[int, Field(ge=1, le=MAX_IMAGES)] = 1
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    loras: Annotated[list[LoraSpec], Field(max_length=MAX_LORAS)] = []
    # Start from a picture (image-to-image; with a mask, inpainting): the pictures travel beside the request, by hash.
    init_image: Sha256 | None = None
    mask: Sha256 | None = None
    strength: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.8  # Stability's "noised to 80%"
    fit: Literal["crop", "pad", "resize"] = "crop"
    image_prompts: Annotated[list[ImagePrompt], Field(max_length=MAX_IMAGE_PROMPTS)] = []

    @property
    def pictures(self) -> list[str]:
        """The hashes of every picture the request needs."""
        found = [self.init_image, self.mask, *(p.image for p in self.image_prompts)]
        return list(dict.fromkeys(h for h in found if h))

    def field_of(self, sha256: str) -> str:
        """The field that names a picture, for messages about it."""
        if sha256 == self.init_image:
            return "init_image"
        if sha256 == self.mask:
            return "mask"
        return f"image_prompts.{next(i for i, p in enumerate(self.image_prompts) if p.image == sha256)}.image"

    @model_validator(mode="after")
    def _mask_needs_an_image(self) -> GenerationRequest:
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask: needs an init_image (the picture whose white-masked part is repainted)")
        return self

    @model_validator(mode="after")
    def _last_seed_in_range(self) -> GenerationRequest:
        # Image i uses seed + i and must be reproducible alone, so its seed must itself be valid.
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(
                f"seed: with num_images={self.num_images} the seed must be at most {MAX_SEED - self.num_images + 1}, "
                f"since image i uses seed + i"
            )
        return self

    def with_seed(self) -> GenerationRequest:
        """This request with its seed fixed: a random one if none was given."""
        if self.seed is not None:
            return self
        return self.model_copy(update={"seed": secrets.randbelow(MAX_SEED - self.num_images + 2)})

    @property
    def image_seeds(self) -> list[int]:
        if self.seed is None:
            raise ValueError("seed is not fixed yet; call with_seed() first")
        return [self.seed + i for i in range(self.num_images)]


class RequestError(ValueError):
    """Invalid request fields; `messages` has one readable line per problem."""

    def __init__(self, messages: list[str]):
        super().__init__("; ".join(messages))
        self.messages = messages


def _describe(error: dict[str, Any]) -> str:
    if error["type"] != "extra_forbidden":
        return field_error(error, ALLOWED)
    field = ".".join(str(p) for p in error["loc"])
    model = {"loras": LoraSpec, "image_prompts": ImagePrompt}.get(str(error["loc"][0]), GenerationRequest)
    return f"{field}: unknown field (known fields: {', '.join(model.model_fields)})"


def make_request(**fields: Any) -> GenerationRequest:
    """Build a request or raise RequestError with one message per bad field. `<lora:name:weight>` tags in the
    prompt (A1111's form) become entries of `loras`, and leave the prompt."""
    if isinstance(fields.get("prompt"), str) and "<lora:" in fields["prompt"]:
        prompt, tagged = split_lora_tags(fields["prompt"])
        given = fields.get("loras", [])
        fields = fields | {"prompt": prompt, "loras": [*given, *tagged] if isinstance(given, list) else given}
    try:
        return GenerationRequest(**fields)
    except ValidationError as exc:
        raise RequestError([_describe(e) for e in exc.errors()]) from None
