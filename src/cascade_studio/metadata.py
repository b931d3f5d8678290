"""PNG metadata: an A1111-compatible `parameters` text chunk for other tools, plus a JSON chunk that is complete.

The `parameters` chunk follows AUTOMATIC1111's layout (prompt line, `Negative prompt:` line, then one line of
`Key: value` pairs, quoted like A1111 quotes them), so Civitai, A1111's PNG Info and other readers show our
settings. The `cascade_studio` JSON chunk holds the exact request, the image's place in its batch and the model
identity, which is what `reproduce` needs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, PngImagePlugin

from . import __version__
from .engine.request import FITS, GenerationRequest, split_lora_tags
from .models.source import ModelIdentity

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give a new file: 0644 under the usual umask
PARAMETERS_KEY = "parameters"
JSON_KEY = "cascade_studio"
SAMPLER = "DDPMWuerstchen"
# A1111's parameter-line pattern: `Key: value` or `Key: "quoted, value"`, comma separated.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_A1111_FIELDS = {
    "Steps": ("prior_steps", int),
    "CFG scale": ("prior_guidance", float),
    "Seed": ("seed", int),
    "Decoder steps": ("decoder_steps", int),
    "Decoder CFG scale": ("decoder_guidance", float),
    "Init image hash": ("init_image", str),
    "Mask hash": ("mask", str),
}


@dataclass(frozen=True)
class ImageMetadata:
    """What one image carries: the request that made its batch, its index in that batch and the model."""

    request: GenerationRequest
    index: int
    model: ModelIdentity | None

    @property
    def seed(self) -> int:
        return self.request.image_seeds[self.index]

    def alone(self) -> GenerationRequest:
        """The request that regenerates just this image."""
        return self.request.model_copy(update={"seed": self.seed, "num_images": 1})


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def parameters_text(meta: ImageMetadata) -> str:
    req = meta.request
    tags = " ".join(f"<lora:{lora.name}:{lora.weight:g}>" for lora in req.loras)  # A1111 keeps them in the prompt
    lines = [f"{req.prompt} {tags}".strip()]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    fields = {
        "Steps": req.prior_steps,
        "Sampler": SAMPLER,
        "CFG scale": req.prior_guidance,
        "Seed": meta.seed,
        "Size": f"{req.width}x{req.height}",
        "Model": meta.model.name if meta.model else None,
        "Decoder steps": req.decoder_steps,
        "Decoder CFG scale": req.decoder_guidance,
        "Lora hashes": ", ".join(f"{lora.name}: {lora.sha256}" for lora in req.loras if lora.sha256) or None,
        # Started from a picture: A1111's key for the strength; the inputs by the hash the store keeps them under.
        "Denoising strength": req.strength if req.init_image else None,
        "Resize mode": req.fit if req.init_image else None,
        "Init image hash": req.init_image,
        "Mask hash": req.mask,
        "Image prompt hashes": ", ".join(f"{p.image}: {p.weight:g}" for p in req.image_prompts) or None,
        "Version": f"cascade-studio {__version__}",
    }
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, Any]:
    """Request fields from an A1111 `parameters` text (ours or another tool's); unknown keys are ignored."""
    lines = text.strip().split("\n")
    params = dict(_PARAM.findall(lines[-1])) if len(_PARAM.findall(lines[-1])) >= 3 else {}
    body = lines[:-1] if params else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    fields: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    for key, raw in params.items():
        raw = json.loads(raw) if raw.startswith('"') else raw
        if key in _A1111_FIELDS:
            name, cast = _A1111_FIELDS[key]
            fields[name] = cast(raw)
        elif key == "Denoising strength" and "Init image hash" in params:  # A1111's hires fix uses it too
            fields["strength"] = float(raw)
        elif key == "Resize mode" and raw in FITS:
            fields["fit"] = raw
        elif key == "Image prompt hashes":
            pairs = (part.strip().rsplit(": ", 1) for part in raw.split(",") if ": " in part)
            fields["image_prompts"] = [{"image": image, "weight": float(weight)} for image, weight in pairs]
        elif key == "Size" and "x" in raw:
            width, height = raw.split("x", 1)
            fields["width"], fields["height"] = int(width), int(height)
    # <lora:name:weight> tags become the request's LoRAs (as make_request reads them), with A1111's hashes.
    prompt, loras = split_lora_tags(fields["prompt"])
    if loras:
        hashes = dict(
            part.strip().split(": ", 1) for part in params.get("Lora hashes", "").strip('"').split(",") if ": " in part
        )
        fields["prompt"] = prompt
        fields["loras"] = [
            lora | ({"sha256": hashes[lora["name"]]} if lora["name"] in hashes else {}) for lora in loras
        ]
    return fields


def save_png(image: Image.Image, path: Path, meta: ImageMetadata) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written PNG under the final name."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text(meta))
    payload = {
        "version": __version__,
        "request": meta.request.model_dump(),
        "index": meta.index,
        "seed": meta.seed,
        "model": meta.model.model_dump() if meta.model else None,
    }
    info.add_text(JSON_KEY, json.dumps(payload, ensure_ascii=False))
    return write_atomically(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write(file)` to a temporary file beside `path`, then renamed over it: a crash never leaves a half-written
    file under the final name (the store removes `.tmp-` leftovers on start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        os.chmod(tmp, FILE_MODE)  # mkstemp makes it private (0600); an image is an ordinary file
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_png(path: Path) -> ImageMetadata:
    """Our JSON chunk when present; otherwise the A1111 `parameters` chunk (then the model is unknown)."""
    with Image.open(path) as img:
        texts = dict(getattr(img, "text", {}) or {})
    if JSON_KEY in texts:
        data = json.loads(texts[JSON_KEY])
        model = ModelIdentity(**data["model"]) if data.get("model") else None
        return ImageMetadata(GenerationRequest(**data["request"]), int(data["index"]), model)
    if PARAMETERS_KEY in texts:
        return ImageMetadata(GenerationRequest(**parse_parameters(texts[PARAMETERS_KEY])), 0, None)
    raise ValueError(f"{path} carries no generation parameters (no '{JSON_KEY}' or '{PARAMETERS_KEY}' chunk)")


def text_chunks(path: Path) -> dict[str, str]:
    with Image.open(path) as img:
        return dict(getattr(img, "text", {}) or {})
