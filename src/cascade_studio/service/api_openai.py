"""The OpenAI Images API on the same server and queue, so clients written for it (the `openai` package, Open WebUI's
OpenAI engine, LibreChat) generate here unchanged.

POST /v1/images/generations   prompt, model, n, size, response_format, quality, style, user, output_format, and
                              our extensions (negative_prompt, seed, prior/decoder steps and guidance, loras)
POST /v1/images/edits         501 until image inputs land (image-to-image and inpainting)
POST /v1/images/variations    501 until image prompts land
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
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..engine import RequestError
from .api import RETRY_AFTER, client_of, parse_json, renamed
from .queue import ClientLimitReached, JobQueue, QueueFull

OURS = ("negative_prompt", "seed", "prior_steps", "prior_guidance", "decoder_steps", "decoder_guidance", "loras")
CHOICES = {
    "response_format": ("url", "b64_json"),
    "quality": ("auto", "standard", "hd", "low", "medium", "high"),
    "style": ("vivid", "natural"),
    "output_format": ("png",),
}
STEP_FACTOR = {"hd": 1.5, "high": 1.5, "low": 0.5}
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1")  # their names: run on the model loaded here
THEIR_NAMES = {"num_images": "n", "width": "size", "height": "size"}  # our fields, as OpenAI's clients know them


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
        try:
            defaults = queue.engine.request(prompt="")
            fields = to_request_fields(body, defaults, set(model_names()))
            generation = await run_in_threadpool(lambda: queue.engine.request(**fields))
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

    def not_yet(what: str):
        def respond():
            return openai_error(501, f"image: {what} from an uploaded picture are not served yet", "image")

        return respond

    for path, what in (("edits", "image-to-image and inpainting"), ("variations", "image prompts")):
        app.post(f"/v1/images/{path}", tags=["OpenAI Images API"], name=f"images_{path}")(not_yet(what))


def _first(response: JSONResponse) -> str:
    detail = json.loads(response.body).get("detail") or ["body: not valid"]
    return detail[0]
