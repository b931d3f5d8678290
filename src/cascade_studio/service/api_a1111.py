"""The AUTOMATIC1111 web UI's API under /sdapi/v1, on the same queue, so A1111 clients (`webuiapi`, Open WebUI's
Automatic1111 engine, SillyTavern) generate here unchanged.

POST /sdapi/v1/txt2img       A1111's fields; what maps runs, what does not change the image is ignored (listed in
                             `info`), what asks for something we cannot do is refused with a 422 naming the field
GET  /sdapi/v1/sd-models, /options, /progress, /samplers, /loras, /scripts; POST /options, /interrupt, /skip,
/png-info.
POST /sdapi/v1/img2img       the same plus init_images (one), mask, denoising_strength and resize_mode

Mapping (docs/api-compat.md): `steps` and `cfg_scale` are the prior's steps and guidance (the decoder keeps the
model's own); `seed` -1 is random; `batch_size` x `n_iter` images, image i with seed + i (at most 8); width and
height run as asked or are refused (multiples of 128). The sampler is Stable Cascade's own (DDPMWuerstchen): A1111's
sampler and scheduler names are accepted and ignored.
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
from ..metadata import PARAMETERS_KEY, parse_parameters
from ..models.lora import lora_info
from .api import RETRY_AFTER, client_of, parse_json, problem, renamed
from .pictures import keep_pictures
from .queue import ClientLimitReached, JobQueue, QueueFull

SAMPLER = "DDPMWuerstchen"
THEIR_NAMES = {
    "prior_steps": "steps",
    "prior_guidance": "cfg_scale",
    "num_images": "batch_size",
    "strength": "denoising_strength",
    "init_image": "init_images.0",
    "fit": "resize_mode",
}
MAPPED = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "batch_size", "n_iter"}
# What an A1111 client sends with its defaults: fine as long as it asks for nothing we cannot do.
NO_EFFECT = {
    "sampler_name", "sampler_index", "scheduler", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "eta", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
    "override_settings_restore_afterwards", "do_not_save_samples", "do_not_save_grid", "send_images", "save_images",
    "denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
    "hr_negative_prompt", "script_args", "refiner_checkpoint", "refiner_switch_at", "comments", "force_task_id",
    "infotext", "disable_extra_networks",
}  # fmt: skip
# img2img's own fields: those we map, and those its clients send with their defaults.
IMG2IMG_MAPPED = {"init_images", "mask", "denoising_strength", "resize_mode", "inpainting_mask_invert"}
IMG2IMG_NO_EFFECT = {
    "mask_blur", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "initial_noise_multiplier",
    "image_cfg_scale", "include_init_images",
}  # fmt: skip
RESIZE_MODES = {0: "resize", 1: "crop", 2: "pad", 3: "resize"}  # A1111: just resize, crop, fill, latent upscale
# Fields that change the image in ways we do not do: refused when set to anything but "off".
CANNOT = {
    "enable_hr": "high-resolution fix (a second pass); ask for the size you want instead",
    "restore_faces": "face restoration",
    "tiling": "tileable images",
    "styles": "saved styles (put their words in the prompt)",
    "script_name": "scripts",
    "alwayson_scripts": "always-on scripts (ControlNet, ADetailer, ...)",
}


def to_request_fields(body: dict, loaded: set[str]) -> tuple[dict, list[str]]:
    """A1111's txt2img body as our request fields and the names of the fields ignored; ValueError('field: ...') for
    the first field that asks for what we cannot do."""
    unknown = sorted(set(body) - MAPPED - NO_EFFECT - set(CANNOT))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a txt2img field this server knows")
    for name, what in CANNOT.items():
        value = body.get(name)
        if name == "alwayson_scripts" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if (v or {}).get("args") not in ([], [False], None)}
        if value not in (None, False, "", [], {}):
            raise ValueError(f"{name}: {what} is not something this server does (got {str(value)[:60]})")
    checkpoint = (body.get("override_settings") or {}).get("sd_model_checkpoint")
    if checkpoint and checkpoint not in loaded:
        raise ValueError(f"override_settings.sd_model_checkpoint: this server runs {' / '.join(sorted(loaded))} now")
    batch, rounds = body.get("batch_size", 1), body.get("n_iter", 1)
    if not (isinstance(batch, int) and isinstance(rounds, int) and batch >= 1 and rounds >= 1 and batch * rounds <= 8):
        raise ValueError(f"batch_size: batch_size x n_iter must be from 1 to 8 images (got {batch} x {rounds})")
    seed = body.get("seed", -1)
    fields = {
        "prompt": body.get("prompt", ""),
        "negative_prompt": body.get("negative_prompt") or "",
        "seed": None if seed in (-1, None) else seed,
        "num_images": batch * rounds,
    }
    fields |= {ours: body[theirs] for theirs, ours in (("steps", "prior_steps"), ("cfg_scale", "prior_guidance"))
               if body.get(theirs) is not None}  # fmt: skip
    fields |= {k: body[k] for k in ("width", "height") if body.get(k) is not None}
    ignored = sorted(k for k in body if k in NO_EFFECT and body[k] not in (None, "", [], {}, 0, False, -1))
    return fields, ignored


def img2img_fields(body: dict, loaded: set[str]) -> tuple[dict, list[str]]:
    """A1111's img2img body as our request fields (pictures still as the client sent them) and those ignored."""
    rest = {k: v for k, v in body.items() if k not in IMG2IMG_MAPPED and k not in IMG2IMG_NO_EFFECT}
    fields, ignored = to_request_fields(rest, loaded)
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise ValueError("init_images: must be a list of one picture (base64), the one to start from")
    if body.get("inpainting_mask_invert") not in (None, 0, False):
        raise ValueError("inpainting_mask_invert: must be 0 (white repaints); invert the mask instead")
    mode = body.get("resize_mode", 0)
    if mode not in RESIZE_MODES:
        raise ValueError(
            f"resize_mode: must be 0 (just resize), 1 (crop and resize) or 2 (resize and fill) (got {mode!r})"
        )
    fields |= {"init_image": images[0], "fit": RESIZE_MODES[mode]}
    if body.get("mask"):
        fields["mask"] = body["mask"]
    if body.get("denoising_strength") is not None:
        fields["strength"] = body["denoising_strength"]
    ignored += sorted(k for k in IMG2IMG_NO_EFFECT if k in body)
    return fields, ignored


def a1111_routes(app: FastAPI, queue: JobQueue, loaded_names) -> None:
    @app.post("/sdapi/v1/txt2img", tags=["AUTOMATIC1111 API"])
    async def txt2img(request: Request):
        return await generate(request, to_request_fields)

    @app.post("/sdapi/v1/img2img", tags=["AUTOMATIC1111 API"])
    async def img2img(request: Request):
        return await generate(request, img2img_fields)

    async def generate(request: Request, mapper):
        body = parse_json(await request.body())
        if isinstance(body, JSONResponse):
            return body
        try:
            fields, ignored = mapper(body, loaded_names())

            def checked():
                return queue.engine.request(**keep_pictures(fields, queue.store))

            generation = await run_in_threadpool(checked)
        except RequestError as exc:
            return problem(422, [renamed(m, THEIR_NAMES) for m in exc.messages])
        except ValueError as exc:
            return problem(422, [str(exc)])
        try:
            job = await run_in_threadpool(queue.submit, generation, client_of(request)[0])
        except (QueueFull, ClientLimitReached) as exc:
            return problem(429, [str(exc)], headers={"Retry-After": str(RETRY_AFTER)})
        async for _ in job.changes():
            pass
        if job.status != "done":
            return problem(500 if job.status == "failed" else 409, [f"job {job.id} {job.status}: {job.error or ''}"])
        record = await run_in_threadpool(queue.store.get_job, job.id)
        pngs = [await run_in_threadpool(queue.store.image_file(im).read_bytes) for im in record.images]
        r = record.request
        info = {
            "prompt": r.prompt,
            "all_prompts": [r.prompt] * r.num_images,
            "negative_prompt": r.negative_prompt,
            "all_negative_prompts": [r.negative_prompt] * r.num_images,
            "seed": r.image_seeds[0],
            "all_seeds": r.image_seeds,
            "subseed": -1,
            "all_subseeds": [-1] * r.num_images,
            "width": r.width,
            "height": r.height,
            "sampler_name": SAMPLER,
            "cfg_scale": r.prior_guidance,
            "steps": r.prior_steps,
            "batch_size": body.get("batch_size", 1),
            "sd_model_name": queue.engine.identity.name,
            "infotexts": [_parameters(png) for png in pngs],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(job.created)),
            "ignored": ignored,
            "job": job.id,
        }
        return {"images": [base64.b64encode(p).decode() for p in pngs], "parameters": body, "info": json.dumps(info)}

    def choices() -> list:
        from .switch import available_models

        return available_models(queue.settings) if queue.settings is not None else []

    def loaded_title() -> str:
        return queue.model_choice.id if queue.model_choice else queue.engine.identity.name

    @app.get("/sdapi/v1/sd-models", tags=["AUTOMATIC1111 API"])
    def sd_models():
        """The loaded model first, then every other this server could switch to."""
        models = [(loaded_title(), queue.engine.identity.name)]
        models += [(c.id, c.label) for c in choices() if c.id != models[0][0]]
        return [{"title": t, "model_name": n, "hash": None, "sha256": None, "filename": t, "config": None}
                for t, n in models]  # fmt: skip

    @app.get("/sdapi/v1/options", tags=["AUTOMATIC1111 API"])
    def options():
        return {"sd_model_checkpoint": loaded_title(), "samples_format": "png"}

    @app.post("/sdapi/v1/options", tags=["AUTOMATIC1111 API"])
    async def set_options(request: Request):
        """Only `sd_model_checkpoint` means anything here: it switches the model (a job in the line), as A1111 does,
        and answers once the new one is loaded."""
        from .switch import SwitchModel

        body = parse_json(await request.body())
        if isinstance(body, JSONResponse):
            return body
        wanted = body.get("sd_model_checkpoint")
        if wanted is None or wanted in loaded_names():
            return {}
        found = {c.id: c for c in await run_in_threadpool(choices)}
        if wanted not in found:
            return problem(422, [f"sd_model_checkpoint: must be one of {', '.join(found)} (got {str(wanted)[:60]!r})"])
        if not queue.settings.model_switch:
            return problem(403, ["sd_model_checkpoint: this server keeps its model (--no-model-switch)"])
        try:
            job = await run_in_threadpool(
                queue.submit_task, SwitchModel(found[wanted], queue.settings), client_of(request)[0]
            )
        except (QueueFull, ClientLimitReached) as exc:
            return problem(429, [str(exc)], headers={"Retry-After": str(RETRY_AFTER)})
        async for _ in job.changes():
            pass
        return {} if job.status == "done" else problem(500, [f"sd_model_checkpoint: {job.error or job.status}"])

    @app.get("/sdapi/v1/samplers", tags=["AUTOMATIC1111 API"])
    def samplers():
        return [{"name": SAMPLER, "aliases": ["ddpm_wuerstchen"], "options": {}}]

    @app.get("/sdapi/v1/scripts", tags=["AUTOMATIC1111 API"])
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/loras", tags=["AUTOMATIC1111 API"])
    def loras():
        out = []
        for name, path in queue.engine.lora_library.files().items():
            try:
                meta = lora_info(path)
            except Exception:  # noqa: BLE001 - a broken file is left out of the list
                continue
            out.append({"name": name, "alias": name, "path": str(path), "metadata": meta})
        return out

    @app.get("/sdapi/v1/progress", tags=["AUTOMATIC1111 API"])
    def progress(request: Request):
        mine = queue.active(client_of(request)[0]) or queue.active()
        job = mine[0] if mine else None
        p = job.progress if job else None
        done = (p.step / p.total) if p and p.total else 0.0
        state = {
            "skipped": False,
            "interrupted": False,
            "job": job.id if job else "",
            "job_count": len(queue.active()),
            "sampling_step": p.step if p else 0,
            "sampling_steps": p.total if p else 0,
        }
        eta = (p.elapsed / done - p.elapsed) if p and done > 0 else 0.0
        text = f"{p.stage} step {p.step}/{p.total}" if p else ("queued" if job else "idle")
        preview = job.preview if job else None
        current = None
        if preview is not None:
            buffer = io.BytesIO()
            preview.save(buffer, format="PNG")
            current = base64.b64encode(buffer.getvalue()).decode()
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": current, "textinfo": text}

    def stop_mine(request: Request) -> dict:
        caller, privileged = client_of(request)
        for job in queue.active(None if privileged else caller):
            if job.status == "running":
                queue.cancel(job.id)
        return {}

    app.post("/sdapi/v1/interrupt", tags=["AUTOMATIC1111 API"])(stop_mine)
    app.post("/sdapi/v1/skip", tags=["AUTOMATIC1111 API"], name="skip")(stop_mine)

    @app.post("/sdapi/v1/png-info", tags=["AUTOMATIC1111 API"])
    async def png_info(request: Request):
        body = parse_json(await request.body())
        if isinstance(body, JSONResponse):
            return body
        raw = str(body.get("image") or "").split(",")[-1]
        try:
            text = _parameters(base64.b64decode(raw, validate=True))
        except ValueError:
            return problem(422, ["image: must be a base64 PNG"])
        items = {"parameters": text} if text else {}
        return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}

    @app.api_route("/sdapi/v1/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    def unknown(rest: str):
        return problem(404, [f"path: /sdapi/v1/{rest[:60]} is not served here (see /docs)"])


def _parameters(png: bytes) -> str:
    """The A1111 `parameters` text a PNG carries ('' for none); ValueError if it is not a picture."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            return (getattr(image, "text", {}) or {}).get(PARAMETERS_KEY, "")
    except Exception as exc:  # noqa: BLE001 - whatever Pillow says about bytes that are no picture
        raise ValueError(str(exc)) from exc
