"""What the studio's buttons do, as plain functions over the job queue and the history store.

No generation logic lives here: requests go through the same queue (and so the same engine and store) as every
other front end. Gradio wiring is in app.py; these functions are tested directly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, PngImagePlugin

from ..engine import ALLOWED, GenerationRequest, RequestError
from ..engine.request import MAX_SIZE, MIN_SIZE, SIZE_STEP
from ..metadata import PARAMETERS_KEY, parse_parameters, read_png
from ..service import ClientLimitReached, Job, JobQueue, QueueFull
from ..store import HistoryStore, JobRecord


class StudioError(Exception):
    """A message for the person at the screen (the app shows it as a Gradio error)."""


# Width x height presets, all multiples of 128 (about one megapixel, the official model's training size).
SIZE_PRESETS = [
    ("1:1", 1024, 1024),
    ("9:7", 1152, 896),
    ("7:9", 896, 1152),
    ("3:2", 1152, 768),
    ("2:3", 768, 1152),
    ("16:9", 1408, 768),
    ("9:16", 768, 1408),
    ("12:5", 1536, 640),
    ("5:12", 640, 1536),
]
CUSTOM = "Custom"
SWEEP_FIELDS = {
    "seed": int,
    "prior_guidance": float,
    "prior_steps": int,
    "decoder_steps": int,
    "decoder_guidance": float,
}
MAX_SWEEP_CELLS = 16


@dataclass
class Studio:
    queue: JobQueue
    store: HistoryStore

    @property
    def engine(self):
        return self.queue.engine

    def model_banner(self) -> str:
        p = self.engine.pipelines
        ident = p.identity
        variant = f" · {ident.variant} weights" if ident.variant else ""
        line = f"**Model:** `{ident.name}`{variant} · running {str(p.dtype).removeprefix('torch.')} on `{p.device}`"
        if ident.preset == "demo":
            line += (
                "  \n**Demo model:** this is the small model shipped with cascade-studio: it draws simple shapes on "
                "plain backgrounds (try *a red circle on a white background*). For real images run "
                "`cascade-studio download full` and restart."
            )
        return line

    def size_choices(self) -> list[str]:
        choices = [f"{w}×{h} ({name})" for name, w, h in SIZE_PRESETS]
        d = self.engine.pipelines.defaults
        if "width" in d and (d["width"], d["height"]) not in {(w, h) for _, w, h in SIZE_PRESETS}:
            choices.insert(0, f"{d['width']}×{d['height']} (this model's size)")
        return choices + [CUSTOM]


def snap(value: float) -> int:
    """Nearest allowed side length (a multiple of SIZE_STEP within MIN_SIZE-MAX_SIZE)."""
    return int(min(MAX_SIZE, max(MIN_SIZE, round(float(value) / SIZE_STEP) * SIZE_STEP)))


def resolve_size(choice: str, width: float | None, height: float | None) -> tuple[int, int, str]:
    """A preset's size, or the custom size snapped to 128 with a note saying what changed."""
    if choice != CUSTOM:
        w, h = choice.split(" ")[0].split("×")
        return int(w), int(h), ""
    w, h = snap(width or 1024), snap(height or 1024)
    changed = [
        f"{name} {v:g} → {s}"
        for name, v, s in (("width", width or 1024, w), ("height", height or 1024, h))
        if float(v) != s
    ]
    return w, h, ("Snapped to multiples of 128: " + ", ".join(changed)) if changed else ""


def token_info(studio: Studio, prompt: str) -> str:
    report = studio.engine.prompt_report(prompt or "")
    text = f"{report.tokens} / {report.limit} tokens"
    return f"**{text}**: CLIP will cut *{report.cut_text}*" if report.cut_text else text


def build_request(
    studio: Studio,
    prompt: str,
    negative: str,
    size: str,
    width: float | None,
    height: float | None,
    seed: float | None,
    randomize: bool,
    prior_steps: float,
    prior_guidance: float,
    decoder_steps: float,
    decoder_guidance: float,
    num_images: float,
) -> GenerationRequest:
    w, h, _ = resolve_size(size, width, height)
    fields = dict(
        prompt=prompt or "",
        negative_prompt=negative or "",
        width=w,
        height=h,
        prior_steps=_whole(prior_steps, "prior_steps"),
        prior_guidance=float(prior_guidance),
        decoder_steps=_whole(decoder_steps, "decoder_steps"),
        decoder_guidance=float(decoder_guidance),
        num_images=_whole(num_images, "num_images"),
        seed=None if randomize or seed is None else _whole(seed, "seed"),
    )
    try:
        return studio.engine.request(**fields)
    except RequestError as exc:
        raise StudioError("; ".join(exc.messages)) from None


def _whole(value: float, field: str) -> int:
    if float(value) != int(value):
        raise StudioError(f"{field}: must be {ALLOWED[field]} (got {value})")
    return int(value)


def submit(studio: Studio, request: GenerationRequest, client: str) -> Job:
    try:
        return studio.queue.submit(request, client=client)
    except (QueueFull, ClientLimitReached) as exc:
        raise StudioError(str(exc)) from None


PREVIEW_SIDE = 192


def preview_image(preview: Image.Image | None) -> Image.Image | None:
    """The prior's preview, enlarged to at least PREVIEW_SIDE pixels: a small model's is only 48 pixels wide."""
    if preview is None or max(preview.size) >= PREVIEW_SIDE:
        return preview
    k = -(-PREVIEW_SIDE // max(preview.size))
    return preview.resize((preview.width * k, preview.height * k), Image.Resampling.BILINEAR)


def status_text(studio: Studio, job: Job) -> str:
    """One line on the job's state; it ends with the job's short id, which the history and API use too."""
    return f"{_state_text(studio, job)} · job {job.id[:8]}"


def _state_text(studio: Studio, job: Job) -> str:
    if job.status == "queued":
        return f"**Queued:** position {studio.queue.position(job)} in line"
    if job.status == "running":
        p = job.progress
        if p is None:
            return "**Starting…**"
        cached = " (prior: cached)" if p.prior_cached else ""
        return f"**{p.stage.capitalize()}** step {p.step}/{p.total} · {p.elapsed:.1f} s{cached}"
    if job.status == "done":
        t = job.timings
        prior = "prior: cached" if job.prior_cached else f"prior {t['prior']:.2f} s"
        seeds = ", ".join(str(s) for s in job.request.image_seeds)
        warn = "".join(f"  \n**Warning:** {w}" for w in job.warnings)
        times = f"text {t['text']:.2f} s · {prior} · decoder {t['decoder']:.2f} s"
        return f"**Done** in {t['total']:.2f} s · {times} · seeds {seeds}{warn}"
    if job.status == "cancelled":
        return "**Cancelled.**"
    return f"**Failed:** {job.error}"


def gallery_items(store: HistoryStore, record_images) -> list[tuple[str, str]]:
    return [(str(store.image_file(im)), f"seed {im.seed}") for im in record_images]


def image_details(record: JobRecord, index: int) -> str:
    r = record.request
    seed = r.image_seeds[index]
    lines = [
        f"**Prompt:** {r.prompt or '(empty)'}",
        f"**Negative prompt:** {r.negative_prompt or '(none)'}",
        f"**Seed:** {seed} (image {index + 1} of {r.num_images}; regenerates alone with this seed)",
        f"**Size:** {r.width}×{r.height} · **Prior:** {r.prior_steps} steps, guidance {r.prior_guidance:g} · "
        f"**Decoder:** {r.decoder_steps} steps, guidance {r.decoder_guidance:g}",
        f"**Model:** {record.model.name}",
    ]
    if record.timings:
        lines.append(f"**Time:** {record.timings['total']:.2f} s" + (" (prior cached)" if record.prior_cached else ""))
    return "  \n".join(lines)


LABELS = {
    "prompt": "prompt",
    "negative_prompt": "negative prompt",
    "width": "width",
    "height": "height",
    "prior_steps": "prior steps",
    "prior_guidance": "prior guidance",
    "decoder_steps": "decoder steps",
    "decoder_guidance": "decoder guidance",
}


def describe_changes(a: GenerationRequest, seed_a: int, b: GenerationRequest, seed_b: int) -> str:
    """'prior guidance 4.0 → 6.0, seed same': what differs between two images' settings."""
    parts = []
    for field, label in LABELS.items():
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            show = (
                (lambda v: repr(v)) if isinstance(va, str) else (lambda v: f"{v:g}" if isinstance(v, float) else str(v))
            )
            parts.append(f"{label} {show(va)} → {show(vb)}")
    parts.append("seed same" if seed_a == seed_b else f"seed {seed_a} → {seed_b}")
    return ", ".join(parts)


def history_choices(store: HistoryStore, limit: int = 60) -> list[tuple[str, str]]:
    """(label, 'job_id:index') for the newest images, for the A/B pickers."""
    out = []
    for job in store.list_jobs(limit=limit):
        for im in job.images:
            when = time.strftime("%H:%M:%S", time.localtime(job.created))
            out.append((f"{when} · seed {im.seed} · {job.request.prompt[:40]}", f"{job.id}:{im.index}"))
    return out


def lookup(store: HistoryStore, key: str) -> tuple[JobRecord, int]:
    job_id, index = key.rsplit(":", 1)
    record = store.get_job(job_id)
    if record is None or int(index) >= len(record.images):
        raise StudioError("that image is no longer in the history")
    return record, int(index)


def compare(store: HistoryStore, key_a: str, key_b: str) -> tuple[tuple[str, str], str]:
    (ra, ia), (rb, ib) = lookup(store, key_a), lookup(store, key_b)
    paths = (str(store.image_file(ra.images[ia])), str(store.image_file(rb.images[ib])))
    return paths, "A → B: " + describe_changes(ra.request, ra.images[ia].seed, rb.request, rb.images[ib].seed)


def settings_of(record: JobRecord, index: int) -> dict:
    """The request fields of one image, seed included: what 'use these settings' puts back in the form."""
    fields = record.request.model_dump()
    fields["seed"] = record.request.image_seeds[index]
    fields["num_images"] = 1
    return fields


def settings_from_png(path: str) -> dict:
    """Settings from a PNG made by this app, or any PNG with an A1111 `parameters` chunk."""
    try:
        meta = read_png(Path(path))
        fields = meta.alone().model_dump()
    except Exception:
        with Image.open(path) as img:
            text = (getattr(img, "text", {}) or {}).get(PARAMETERS_KEY)
        if not text:
            raise StudioError("this PNG carries no generation parameters") from None
        fields = parse_parameters(text)
    return fields


def parse_values(field: str, text: str) -> list:
    cast = SWEEP_FIELDS[field]
    try:
        values = [cast(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise StudioError(f"sweep values for {field}: write numbers separated by commas (got {text!r})") from None
    if not values:
        raise StudioError(f"sweep values for {field}: give at least one value")
    return values


def sweep_requests(base: GenerationRequest, x_field: str, x_text: str, y_field: str | None, y_text: str):
    """The grid's cells, row by row: (y value, x value, request). Each cell is one image."""
    xs = parse_values(x_field, x_text)
    ys = parse_values(y_field, y_text) if y_field else [None]
    if len(xs) * len(ys) > MAX_SWEEP_CELLS:
        raise StudioError(f"a sweep has at most {MAX_SWEEP_CELLS} cells (asked for {len(xs) * len(ys)})")
    base = base.model_copy(update={"num_images": 1}).with_seed()
    cells = []
    for y in ys:
        for x in xs:
            fields = base.model_dump() | {x_field: x} | ({y_field: y} if y_field else {})
            try:
                cells.append((y, x, GenerationRequest(**fields)))
            except Exception as exc:
                raise StudioError(f"sweep value {x_field}={x}{f', {y_field}={y}' if y_field else ''}: {exc}") from None
    return xs, ys, cells


def sweep_grid(images: list[Image.Image], xs: list, ys: list, x_field: str, y_field: str | None) -> Image.Image:
    """A labelled X/Y grid, like A1111's X/Y plot."""
    w, h = images[0].size
    left, top = (120 if y_field else 0), 28
    sheet = Image.new("RGB", (left + w * len(xs), top + h * len(ys)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, x in enumerate(xs):
        draw.text((left + i * w + 6, 8), f"{LABELS.get(x_field, x_field)} = {x}", fill="black")
    for j, y in enumerate(ys):
        if y_field:
            draw.text((6, top + j * h + h // 2), f"{LABELS.get(y_field, y_field)}\n= {y}", fill="black")
        for i in range(len(xs)):
            sheet.paste(images[j * len(xs) + i], (left + i * w, top + j * h))
    return sheet


def save_sweep(
    store: HistoryStore,
    sheet: Image.Image,
    base: GenerationRequest,
    x_field: str,
    xs: list,
    y_field: str | None,
    ys: list,
) -> Path:
    """The grid PNG, with the base settings and the axes in its metadata."""
    path = (
        store.output_dir
        / "sweeps"
        / f"{time.strftime('%Y%m%d-%H%M%S')}-{x_field}{'-' + y_field if y_field else ''}.png"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    axes = f"X: {x_field} = {', '.join(map(str, xs))}" + (
        f"; Y: {y_field} = {', '.join(map(str, ys))}" if y_field else ""
    )
    info.add_text(PARAMETERS_KEY, f"{base.prompt}\nSweep: {axes}")
    info.add_text(
        "cascade_studio_sweep",
        json.dumps({"base": base.model_dump(), "x": [x_field, xs], "y": [y_field, ys] if y_field else None}),
    )
    sheet.save(path, pnginfo=info)
    return path
