"""The OpenAI Images API on the same server and queue, so clients written for it (the `openai` package, Open WebUI's
OpenAI engine, LibreChat) generate here unchanged.

POST /v1/images/generations   prompt, model, n, size, response_format, quality, style, user, output_format, and
                              our extensions (negative_prompt, seed, prior/decoder steps and guidance, loras)
POST /v1/images/edits         multipart image (or image[]) and mask: image-to-image, or inpainting where the mask
                              is transparent; `strength` and `fit` as extensions
POST /v1/images/variations    multipart image: the picture as an image prompt (models with a CLIP image tower)
GET  /v1/models               (api.py) already in OpenAI's list shape

How the fields map (docs/api-compat.md has the table): `n` is the number of images, image i with seed + i; `size`
"WxH" runs exactly as asked or is refused (both sides multiples of 128 from 128 to 2048: every DALL-E and
gpt-image size is), "auto" is the model's own size; `quality` "hd"/"high" runs 1.5x the prior steps, "low" half,
the rest the model's defaults; `style` is accepted and has no effect (Stable Cascade has no such switch). Errors
come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status codes (400 for a bad
field, 429 for a full queue), so the `openai` package raises its own exception classes with our message.
"""

from __future__ import annotations

import base64
import io
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..engine import RequestError
from .api import RETRY_AFTER, client_of, parse_json, renamed
from .pictures import keep_pictures
from .queue import ClientLimitReached, JobQueue, QueueFull

OURS = (
    "negative_prompt",
    "seed",
    "prior_steps",
    "prior_guidance",
    "decoder_steps",
    "decoder_guidance",
    "loras",
    "strength",
    "fit",
)
FORM_JSON = {"n", "seed", "prior_steps", "prior_guidance", "decoder_steps", "decoder_guidance", "strength", "loras"}
CHOICES = {
    "response_format": ("url", "b64_json"),
    "quality": ("auto", "standard", "hd", "low", "medium", "high"),
    "style": ("vivid", "natural"),
    "output_format": ("png",),
}
STEP_FACTOR = {"hd": 1.5, "high": 1.5, "low": 0.5}
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1")  # their names: run on the model loaded here
THEIR_NAMES = {
    "num_images": "n",
    "width": "size",
    "height": "size",
    "init_image": "image",
    "image_prompts.0.image": "image",
}  # our fields, as OpenAI's clients know them


def openai_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    code = {400: "invalid_value", 429: "rate_limit_exceeded", 501: "not_implemented"}.get(status)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": str(RETRY_AFTER)} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


def to_request_fields(body: dict, defaults, model_names: set[str]) -> dict:
    """OpenAI's fields as ours; ValueError('field: ...') for the first one that cannot run as asked."""
    known = {"prompt", "model", "n", "size", "user", *CHOICES, *OURS}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a field of this endpoint (fields: {', '.join(sorted(known))})")
    for name, allowed in CHOICES.items():
        if body.get(name) is not None and body[name] not in allowed:
            raise ValueError(f"{name}: must be one of {', '.join(allowed)} (got {body[name]!r})")
    model = body.get("model")
    if model is not None and model not in model_names | set(OPENAI_MODELS):
        raise ValueError(
            f"model: this server runs {' / '.join(sorted(model_names))} now (OpenAI's names run on it too: "
            f"{', '.join(OPENAI_MODELS)}); switch models with POST /v1/model (got {str(model)[:60]!r})"
        )
    fields = {k: body[k] for k in OURS if body.get(k) is not None}
    fields["prompt"] = body.get("prompt")
    if body.get("n") is not None:
        fields["num_images"] = body["n"]
    size = body.get("size")
    if size not in (None, "auto"):
        parts = str(size).lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"size: must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto' (got {size!r})")
        fields["width"], fields["height"] = int(parts[0]), int(parts[1])
    factor = STEP_FACTOR.get(body.get("quality") or "auto")
    if factor and "prior_steps" not in fields:
        fields["prior_steps"] = max(1, round(defaults.prior_steps * factor))
    return fields


def openai_routes(app: FastAPI, queue: JobQueue, model_names) -> None:
    @app.post("/v1/images/generations", tags=["OpenAI Images API"])
    async def generations(request: Request):
        body = parse_json(await request.body())
        if isinstance(body, JSONResponse):
            return openai_error(body.status_code, _first(body), "body")
        return await generate(request, body, {})

    @app.post("/v1/images/edits", tags=["OpenAI Images API"])
    async def edits(request: Request):
        """Image-to-image, or with a mask inpainting (OpenAI's mask: its fully transparent part is repainted)."""
        body, files = await _form(request)
        image = files.get("image") or files.get("image[]")
        if image is None:
            return openai_error(400, "image: required (the picture to edit, a multipart file)", "image")
        pictures = {"init_image": image}
        if "mask" in files:
            try:
                pictures["mask"] = _repainted_part(files["mask"])
            except ValueError as exc:
                return openai_error(400, str(exc), "mask")
            body.setdefault("strength", 1.0)  # a masked edit repaints its area from scratch, as OpenAI's does
        return await generate(request, body, pictures)

    @app.post("/v1/images/variations", tags=["OpenAI Images API"])
    async def variations(request: Request):
        """Variations of a picture: the picture as the prior's image prompt, with no text."""
        body, files = await _form(request)
        if "image" not in files:
            return openai_error(400, "image: required (the picture to vary, a multipart file)", "image")
        return await generate(request, body | {"prompt": ""}, {"image_prompts": [{"image": files["image"]}]})

    async def generate(request: Request, body: dict, pictures: dict):
        try:
            defaults = queue.engine.request(prompt="")
            fields = to_request_fields(body, defaults, set(model_names())) | pictures
            generation = await run_in_threadpool(lambda: queue.engine.request(**keep_pictures(fields, queue.store)))
        except RequestError as exc:  # (a ValueError too: first)
            messages = list(dict.fromkeys(renamed(m, THEIR_NAMES) for m in exc.messages))
            return openai_error(400, "; ".join(messages), messages[0].split(":")[0])
        except ValueError as exc:
            return openai_error(400, str(exc), str(exc).split(":")[0])
        try:
            job = await run_in_threadpool(queue.submit, generation, client_of(request)[0])
        except (QueueFull, ClientLimitReached) as exc:
            return openai_error(429, str(exc), kind="requests")
        async for _ in job.changes():
            pass
        if job.status != "done":
            status, kind = (499, "cancelled") if job.status == "cancelled" else (500, "server_error")
            return openai_error(status, f"generation {job.id} {job.status}: {job.error or 'cancelled'}", kind=kind)
        record = await run_in_threadpool(queue.store.get_job, job.id)
        as_b64 = (body.get("response_format") or "url") == "b64_json"
        data = []
        for image in record.images:
            item = {"revised_prompt": generation.prompt}
            if as_b64:
                raw = await run_in_threadpool(queue.store.image_file(image).read_bytes)
                item["b64_json"] = base64.b64encode(raw).decode()
            else:
                item["url"] = str(request.base_url).rstrip("/") + f"/v1/images/{image.id}.png"
            data.append(item)
        return {"created": int(time.time()), "data": data}


async def _form(request: Request) -> tuple[dict, dict[str, bytes]]:
    """A multipart form as (its text fields, numbers and lists read as JSON; its files' bytes)."""
    form = await request.form()
    fields, files = {}, {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = _json(value) if name in FORM_JSON else value
        elif name not in files:  # image[]: the first picture
            files[name] = await value.read()
    return fields, files


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # left as text: validation names the field and its range


def _repainted_part(png: bytes) -> bytes:
    """OpenAI's mask (a PNG whose fully transparent pixels mark what to repaint) as ours (white = repaint)."""
    try:
        with Image.open(io.BytesIO(png)) as opened:
            if "A" not in opened.getbands() and "transparency" not in opened.info:
                raise ValueError("mask: must be a PNG with transparency (its fully transparent part is repainted)")
            alpha = opened.convert("RGBA").getchannel("A")
    except (OSError, SyntaxError):
        raise ValueError("mask: not a picture that can be read (a PNG with transparency)") from None
    buffer = io.BytesIO()
    alpha.point(lambda a: 255 if a == 0 else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def _first(response: JSONResponse) -> str:
    detail = json.loads(response.body).get("detail") or ["body: not valid"]
    return detail[0]
