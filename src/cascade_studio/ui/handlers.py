"""What the studio's buttons do, as plain functions over the job queue and the history store.

No generation logic lives here: requests go through the same queue (and so the same engine and store) as every
other front end. Gradio wiring is in app.py and panels/; these functions are tested directly.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont, PngImagePlugin

from ..config import bad_field
from ..engine import ALLOWED, GenerationRequest, RequestError
from ..engine.inputs import from_image, outpaint
from ..engine.request import MAX_LORA_WEIGHT, MAX_SIZE, nearest_size
from ..metadata import PARAMETERS_KEY, parse_parameters, read_png
from ..models.lora import lora_info
from ..service import ClientLimitReached, Job, JobQueue, QueueFull
from ..store import HistoryStore, JobRecord, StoreError


class StudioError(Exception):
    """A message for the person at the screen (the page shows it in the status line)."""


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
DEMO_EXAMPLE = "a red circle on a white background"  # a scene the demo model draws well
SWEEP_FIELDS = {
    "seed": int,
    "prior_guidance": float,
    "prior_steps": int,
    "decoder_steps": int,
    "decoder_guidance": float,
    "lora_weight": float,  # the first LoRA's (picked as LoRA 1, or the prompt's first <lora:...>)
}
MAX_SWEEP_CELLS = 16
HISTORY_PAGE = 48  # images a history page shows
NO_LORA = "(none)"
LORA_ROWS = 3  # LoRAs the picker stacks (more: <lora:name:weight> in the prompt)


@dataclass
class Studio:
    queue: JobQueue
    store: HistoryStore

    @property
    def engine(self):
        return self.queue.engine

    @property
    def small_images(self) -> bool:
        """The model's own size is small (the demo model's 128²): show its images enlarged, pixels kept sharp."""
        return self.engine.pipelines.defaults.get("width", 1024) <= 256

    @property
    def first_prompt(self) -> str:
        """What the prompt box holds on a first visit: for the demo model a scene it draws, so that Generate straight
        away shows what it can do (an empty prompt gives a murky picture); for a real model nothing."""
        return DEMO_EXAMPLE if self.engine.pipelines.identity.preset == "demo" else ""

    def model_banner(self) -> str:
        p = self.engine.pipelines
        ident = p.identity
        variant = f" · {ident.variant} weights" if ident.variant else ""
        line = f"**Model:** `{ident.name}`{variant} · {str(p.dtype).removeprefix('torch.')} on `{p.device}`"
        if ident.preset == "demo":
            line += (
                "  \n**Demo model:** a tiny model shipped with cascade-studio; it draws simple shapes on plain "
                f"backgrounds (try *{DEMO_EXAMPLE}*). For real images: "
                "`cascade-studio download full`, then restart."
            )
        return line

    def size_choices(self) -> list[str]:
        choices = [f"{w}×{h} ({name})" for name, w, h in SIZE_PRESETS]
        d = self.engine.pipelines.defaults
        if "width" in d and (d["width"], d["height"]) not in {(w, h) for _, w, h in SIZE_PRESETS}:
            choices.insert(0, f"{d['width']}×{d['height']} (this model's size)")
        return choices + [CUSTOM]

    def lora_names(self) -> list[str]:
        return sorted(self.engine.lora_library.files())

    def lora_words(self, name: str) -> str:
        """A LoRA's trigger words, from its file's header or its user's activation text ("" for none)."""
        return self._lora_info(name).get("trigger_words", "")

    def lora_weight(self, name: str, weight: float | None) -> float | None:
        """The weight a LoRA row takes when a LoRA is picked: its user's preferred weight (A1111's, from the
        .json beside the file) where it has one in the allowed range, else the row's weight as it was."""
        preferred = self._lora_info(name).get("preferred_weight")
        return preferred if preferred is not None and abs(preferred) <= MAX_LORA_WEIGHT else weight

    def _lora_info(self, name: str) -> dict:
        path = self.engine.lora_library.files().get(name)
        if path is None:  # no LoRA, or a file gone since it was listed
            return {}
        try:
            return lora_info(path)
        except (OSError, ValueError):
            return {}

    def lora_words_text(self, names) -> str:
        lines = [f"**{n}**: {self.lora_words(n) or 'no trigger words recorded'}" for n in names if n != NO_LORA]
        return "  \n".join(lines)

    def with_trigger_words(self, prompt: str, names) -> str:
        """The prompt with the chosen LoRAs' trigger words put in front, each once."""
        have = {w.lower() for w in prompt.replace(",", " ").split()}
        words = [
            w.strip()
            for n in names
            if n != NO_LORA
            for w in self.lora_words(n).split(",")
            if w.strip() and w.strip().lower() not in have
        ]
        return ", ".join(dict.fromkeys(words)) + (", " if words and prompt else "") + prompt


@dataclass
class FormValues:
    """What the generation form holds, by name: the one way the studio's events read the form."""

    prompt: str = ""
    negative_prompt: str = ""
    size: str = CUSTOM
    width: float | None = None
    height: float | None = None
    seed: str | float | None = None  # the seed box's text; empty (or random_seed) means a random seed
    random_seed: bool = True
    num_images: float | None = 1
    prior_steps: float | None = None
    prior_guidance: float | None = None
    decoder_steps: float | None = None
    decoder_guidance: float | None = None
    lora_1: str = NO_LORA
    lora_1_weight: float | None = 1.0
    lora_2: str = NO_LORA
    lora_2_weight: float | None = 1.0
    lora_3: str = NO_LORA
    lora_3_weight: float | None = 1.0
    strength: float | None = 0.8
    fit: str = "crop"
    grow: list[str] = field(default_factory=list)  # outpaint: the sides the canvas grows on
    grow_by: float | None = 128
    image_prompt_1_weight: float | None = 1.0
    image_prompt_2_weight: float | None = 1.0
    image_prompt_3_weight: float | None = 1.0
    image_prompt_4_weight: float | None = 1.0

    def loras(self) -> list[dict]:
        """The picked LoRAs as request fields (a row left at "(none)" adds nothing)."""
        rows = [(getattr(self, f"lora_{i}"), getattr(self, f"lora_{i}_weight")) for i in range(1, LORA_ROWS + 1)]
        return [{"name": n, "weight": None if w is None else float(w)} for n, w in rows if n and n != NO_LORA]

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_size(choice: str, width: float | None, height: float | None) -> tuple[int, int, str]:
    """A preset's size, or the custom size snapped to 128 with a note saying what changed."""
    if choice != CUSTOM:
        w, h = choice.split(" ")[0].split("×")
        return int(w), int(h), ""
    w, h = nearest_size(width or 1024), nearest_size(height or 1024)
    changed = [
        f"{name} {v:g} → {s}"
        for name, v, s in (("width", width or 1024, w), ("height", height or 1024, h))
        if float(v) != s
    ]
    return w, h, ("Snapped to multiples of 128: " + ", ".join(changed)) if changed else ""


def token_info(studio: Studio, prompt: str, loras: tuple[str, ...] = ()) -> str:
    """The token counter under the prompt: the model's real window, whole words cut, unknown words marked (not the
    words the picked LoRAs learnt), and for a model with a closed vocabulary a line on what it draws. HTML
    (escaped), for a gr.HTML."""
    known = studio.engine.words_of_loras([n for n in loras if n != NO_LORA])
    report = studio.engine.prompt_report(prompt or "", known)
    count = f"{report.tokens} / {report.limit} tokens"
    parts = [f"<b>{count}</b>" if report.cut_text else count]
    if report.cut_text:
        cut = report.cut_text if len(report.cut_text) <= 60 else report.cut_text[:57].rsplit(" ", 1)[0] + " …"
        parts.append(f"cut: <i>{html.escape(cut)}</i>")
    if report.unknown:
        marked = " ".join(f"<mark>{html.escape(w)}</mark>" for w in report.unknown)
        parts.append(f"unknown to this model: {marked}")
    line = " · ".join(parts)
    if report.hint:  # a closed vocabulary: what the model draws, always in view
        line += (
            f"<br><span class='cs-hint'>This model knows only its training words: {html.escape(report.hint)}.</span>"
        )
    return f"<div class='cs-tokens'>{line}</div>"


def build_request(
    studio: Studio, form: FormValues, picture: dict | None = None, references: list | tuple = ()
) -> GenerationRequest:
    """The request the form describes, or StudioError naming every bad field and its allowed values. Nothing is
    changed silently: a number outside its range is refused, as the API refuses it (only a custom size snaps to a
    multiple of 128, with a note under it). `picture`: the image editor's value (a picture to start from, and the
    paint that marks what to repaint); `references`: the image prompts' pictures (None where a slot is empty)."""
    w, h, _ = resolve_size(form.size, form.width, form.height)
    problems: list[str] = []

    def whole(name: str, value: float | None) -> int | float | None:
        if value is None:
            problems.append(bad_field(name, ALLOWED[name], None))
            return None
        if float(value) != int(value):
            problems.append(bad_field(name, ALLOWED[name], float(value)))
            return None
        return int(value)

    def number(name: str, value: float | None) -> float | None:
        if value is None:
            problems.append(bad_field(name, ALLOWED[name], None))
        return None if value is None else float(value)

    values = {
        "prior_steps": whole("prior_steps", form.prior_steps),
        "decoder_steps": whole("decoder_steps", form.decoder_steps),
        "num_images": whole("num_images", form.num_images),
        "prior_guidance": number("prior_guidance", form.prior_guidance),
        "decoder_guidance": number("decoder_guidance", form.decoder_guidance),
        "seed": None if form.random_seed else _seed(form.seed, problems),
    }
    fields_ = dict(prompt=form.prompt or "", negative_prompt=form.negative_prompt or "", width=w, height=h)
    fields_["loras"] = form.loras()
    fields_ |= {k: v for k, v in values.items() if v is not None}
    try:
        fields_ |= picture_fields(studio, picture, form)
        fields_ |= image_prompt_fields(studio, references, form)
        request = studio.engine.request(**fields_)
    except RequestError as exc:
        problems += exc.messages
    except StoreError as exc:
        problems.append(f"init_image: could not keep the picture ({exc})")
    if problems:
        raise StudioError("; ".join(dict.fromkeys(problems)))
    return request


def picture_fields(studio: Studio, picture: dict | None, form: FormValues) -> dict:
    """The request's picture fields from the image editor: the picture, and a mask of what was painted over it
    (and of the border outpainting adds), kept in the store by hash (as the API keeps them); with outpainting, the
    canvas's size. Nothing when no picture is in the editor."""
    background = (picture or {}).get("background")
    if background is None:
        return {}
    image = background.convert("RGB")
    mask = Image.new("L", image.size, 0)
    for layer in picture.get("layers") or []:
        if layer is not None and "A" in layer.getbands():
            mask = ImageChops.lighter(mask, layer.getchannel("A").point(lambda a: 255 if a else 0))
    out: dict = {"fit": form.fit, "strength": form.strength}
    if form.grow:
        by = int(form.grow_by or 0)
        if not 0 < by <= MAX_SIZE:
            raise RequestError([f"outpaint: grow by a whole number of pixels from 1 to {MAX_SIZE} (got {by})"])
        image, border = outpaint(image, **{side: by for side in form.grow})
        border.paste(mask, (by if "left" in form.grow else 0, by if "top" in form.grow else 0))
        mask = border
        out |= {"width": nearest_size(image.width), "height": nearest_size(image.height)}
    out["init_image"] = _kept(studio, image, "init_image")
    if mask.getbbox() is not None:  # something painted, or a border added
        out["mask"] = _kept(studio, mask, "mask", mask=True)
    return out


def image_prompt_fields(studio: Studio, references: list | tuple, form: FormValues) -> dict:
    """The filled image-prompt slots as request fields, each picture kept in the store by hash."""
    prompts = []
    for slot, image in enumerate(references, start=1):
        if image is not None:
            name = f"image_prompts.{len(prompts)}.image"
            weight = getattr(form, f"image_prompt_{slot}_weight")
            prompts.append({"image": _kept(studio, image.convert("RGB"), name), "weight": weight})
    return {"image_prompts": prompts} if prompts else {}


def _kept(studio: Studio, image: Image.Image, name: str, mask: bool = False) -> str:
    return studio.store.save_picture(from_image(image, name, mask=mask))


def _seed(value: str | float | None, problems: list[str]) -> int | None:
    text = str(value).strip() if value is not None else ""
    if not text:
        return None
    try:
        number = float(text)
        if number == int(number):
            return int(number)
    except (ValueError, OverflowError):
        pass
    problems.append(bad_field("seed", ALLOWED["seed"], text))
    return None


def submit_task(studio: Studio, task, client: str) -> Job:
    try:
        return studio.queue.submit_task(task, client=client)
    except (QueueFull, ClientLimitReached) as exc:
        raise StudioError(str(exc)) from None


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
    return preview.resize((preview.width * k, preview.height * k), Image.Resampling.NEAREST)


def status_text(studio: Studio, job: Job) -> str:
    """One line on the job's state, ending with the job's short id (which the history and the API take too); under
    it, for a finished job, its notes: what the run did that the request did not say (words cut, a size drawn
    smaller and enlarged). Facts about the run, not faults, so they are notes, not warnings."""
    notes = "".join(f"  \n**Note:** {w}" for w in job.warnings) if job.status == "done" else ""
    return f"{_state_text(studio, job)} · job {job.id[:8]}{notes}"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _state_text(studio: Studio, job: Job) -> str:
    if job.status == "queued":
        position = studio.queue.position(job) or 0
        stats = studio.queue.stats()
        mine = studio.queue.unfinished(job.client)
        return (
            f"**Queued:** {ordinal(position)} in line · {stats['queued']} waiting, {stats['running']} running · "
            f"you have {mine} unfinished"
        )
    if job.status == "running":
        p = job.progress
        if p is None:
            return "**Starting…**"
        cached = " (prior: cached)" if p.prior_cached else ""
        eta = _eta(job)
        return f"**{p.stage.capitalize()}** step {p.step}/{p.total} · {p.elapsed:.1f} s{eta}{cached}"
    if job.status == "done":
        t = job.timings
        prior = "prior: cached" if job.prior_cached else f"prior {t['prior']:.2f} s"
        seeds = ", ".join(str(s) for s in job.request.image_seeds)
        times = f"text {t['text']:.2f} s · {prior} · decoder {t['decoder']:.2f} s"
        return f"**Done** in {t['total']:.2f} s · {times} · seeds {seeds}"
    if job.status == "cancelled":
        return "**Cancelled.**"
    return f"**Failed:** {job.error}"


def progress_fraction(job: Job) -> float:
    """How far the job is, 0-1, counting each step of either stage alike (a rough but steady measure)."""
    r, p = job.request, job.progress
    if job.status == "done":
        return 1.0
    if p is None:
        return 0.0
    done = p.step if p.stage == "prior" else (0 if p.prior_cached else r.prior_steps) + p.step
    total = (0 if p.prior_cached else r.prior_steps) + r.decoder_steps
    return min(1.0, done / total)


def _eta(job: Job) -> str:
    fraction = progress_fraction(job)
    if job.progress is None or fraction <= 0.05:
        return ""
    left = job.progress.elapsed / fraction - job.progress.elapsed
    return f" · about {math.ceil(left)} s left"


def status_html(studio: Studio, job: Job | None = None, message: str | None = None, error: bool = False) -> str:
    """The status line as HTML: the job's state with a progress bar, or a message (an error in red)."""
    if job is None:
        kind = "cs-error" if error else "cs-idle"
        return f"<div id='status-box' class='{kind}'>{_inline(message or 'Ready.')}</div>"
    bar = ""
    if job.status in ("queued", "running"):
        bar = f"<div class='cs-bar'><div style='width:{100 * progress_fraction(job):.0f}%'></div></div>"
    kind = {"failed": "cs-error", "cancelled": "cs-idle", "done": "cs-done"}.get(job.status, "cs-busy")
    return f"<div id='status-box' class='{kind}'>{_inline(status_text(studio, job))}{bar}</div>"


def _inline(markdown: str) -> str:
    """The few bits of Markdown the status line uses (bold, line breaks), as escaped HTML."""
    text = html.escape(markdown).replace("  \n", "<br>")
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def gallery_items(store: HistoryStore, record_images) -> list[tuple[str, str]]:
    return [(str(store.image_file(im)), f"seed {im.seed}") for im in record_images]


def gallery_columns(n: int) -> int:
    """One large image alone, two side by side, up to eight in two rows: every image in view at once."""
    return 1 if n == 1 else 2 if n <= 4 else 4


def image_details(record: JobRecord, index: int) -> str:
    r = record.request
    seed = r.image_seeds[index]
    lines = [
        f"**Prompt:** {r.prompt or '(empty)'}",
        f"**Negative prompt:** {r.negative_prompt or '(none)'}",
        f"**Seed:** {seed} (image {index + 1} of {r.num_images}; regenerates alone with this seed)",
        f"**Size:** {r.width}×{r.height} · **Prior:** {r.prior_steps} steps, guidance {r.prior_guidance:g} · "
        f"**Decoder:** {r.decoder_steps} steps, guidance {r.decoder_guidance:g}",
        f"**Model:** {record.model.name} · **Job:** `{record.id}`",
    ]
    if r.loras:
        used = ", ".join(f"{lora.name} × {lora.weight:g} (sha256 {lora.sha256})" for lora in r.loras)
        lines.insert(4, f"**LoRAs:** {used}")
    if r.init_image:
        how = "inpainted where the mask is white" if r.mask else "image-to-image"
        lines.insert(4, f"**From a picture:** {how}, strength {r.strength:g}, fit {r.fit} (`{r.init_image[:12]}`)")
    if r.image_prompts:
        pictures = ", ".join(f"`{p.image[:12]}` × {p.weight:g}" for p in r.image_prompts)
        lines.insert(4, f"**Image prompts:** {pictures}")
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
    "loras": "LoRAs",
    "init_image": "picture",
    "mask": "mask",
    "strength": "strength",
    "fit": "fit",
    "image_prompts": "image prompts",
}


def describe_changes(a: GenerationRequest, seed_a: int, b: GenerationRequest, seed_b: int) -> str:
    """'prior guidance 4.0 → 6.0, seed same': what differs between two images' settings."""
    parts = []
    for name, label in LABELS.items():
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            parts.append(f"{label} {_shown(va)} → {_shown(vb)}")
    parts.append("seed same" if seed_a == seed_b else f"seed {seed_a} → {seed_b}")
    return ", ".join(parts)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return value[:8] if len(value) == 64 else repr(value)  # a picture, by the start of its hash
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):  # LoRAs, image prompts
        return ", ".join(f"{getattr(v, 'name', None) or v.image[:8]} × {v.weight:g}" for v in value) or "none"
    return str(value)


def history_choices(store: HistoryStore, limit: int = 60) -> list[tuple[str, str]]:
    """(label, 'job_id:index') for the newest images, for the A/B pickers."""
    out = []
    for job in store.list_jobs(limit=limit):
        for im in job.images:
            when = time.strftime("%H:%M:%S", time.localtime(job.created))
            out.append((f"{when} · seed {im.seed} · {job.request.prompt[:40]}", f"{job.id}:{im.index}"))
    return out


@dataclass
class HistoryPage:
    items: list[tuple[str, str]]  # (file, caption) for the gallery
    keys: list[str]  # 'job_id:index' of each item
    page: int  # 1-based, after clamping
    pages: int
    total_jobs: int

    @property
    def label(self) -> str:
        return f"Page {self.page} of {self.pages} · {self.total_jobs} generations"


def history_page(store: HistoryStore, search: str = "", page: int = 1) -> HistoryPage:
    """One page of the history, newest first, about HISTORY_PAGE images (whole jobs), filtered by prompt text."""
    total = store.count_jobs(search=search or "")
    # Jobs hold 1-8 images; page by jobs so that a job's images stay together, ~HISTORY_PAGE images a page.
    per_page = max(1, HISTORY_PAGE // 2)
    pages = max(1, -(-total // per_page))
    page = min(max(1, int(page or 1)), pages)
    items, keys = [], []
    for job in store.list_jobs(limit=per_page, offset=(page - 1) * per_page, search=search or ""):
        for im in job.images:
            items.append((str(store.image_file(im)), f"seed {im.seed}"))
            keys.append(f"{job.id}:{im.index}")
    return HistoryPage(items, keys, page, pages, total)


def lookup(store: HistoryStore, key: str) -> tuple[JobRecord, int]:
    job_id, index = key.rsplit(":", 1)
    record = store.get_job(job_id)
    if record is None or int(index) >= len(record.images):
        raise StudioError("that image is no longer in the history")
    return record, int(index)


def delete_generation(store: HistoryStore, key: str | None) -> str:
    """Delete the selected image's whole generation (its batch) from the history and the disk."""
    if not key:
        raise StudioError("select an image in the history first")
    record, _ = lookup(store, key)
    removed = store.delete_job(record.id)
    return f"Deleted generation {record.id[:8]} ({removed} image{'s' * (removed != 1)})."


def export_history(store: HistoryStore, search: str = "") -> tuple[Path, int]:
    """A zip of every image in the history (or those matching the search), with their metadata."""
    target = store.output_dir / "exports" / f"cascade-studio-history-{time.strftime('%Y%m%d-%H%M%S')}.zip"
    target.parent.mkdir(parents=True, exist_ok=True)
    count = store.export_zip(target, search=search or "")
    if not count:
        target.unlink(missing_ok=True)
        raise StudioError("there are no images to download" + (f" matching {search!r}" if search else ""))
    return target, count


def compare(store: HistoryStore, key_a: str, key_b: str) -> tuple[tuple[str, str], str]:
    (ra, ia), (rb, ib) = lookup(store, key_a), lookup(store, key_b)
    paths = (str(store.image_file(ra.images[ia])), str(store.image_file(rb.images[ib])))
    return paths, "A → B: " + describe_changes(ra.request, ra.images[ia].seed, rb.request, rb.images[ib].seed)


def compare_with_input(store: HistoryStore, record: JobRecord, index: int) -> tuple[tuple[str, str], str] | None:
    """The picture a generation started from against its image `index` (None for text-to-image)."""
    r = record.request
    if r.init_image is None or not store.picture_file(r.init_image).is_file():
        return None
    how = "inpainted" if r.mask else f"strength {r.strength:g}"
    result = str(store.image_file(record.images[index]))
    return (str(store.picture_file(r.init_image)), result), f"A: the picture it started from → B: the result ({how})"


def settings_of(record: JobRecord, index: int) -> dict:
    """The request fields of one image, seed included: what 'use these settings' puts back in the form."""
    fields_ = record.request.model_dump()
    fields_["seed"] = record.request.image_seeds[index]
    fields_["num_images"] = 1
    return fields_


def settings_from_png(path: str) -> dict:
    """Settings from a PNG made by this app, or any PNG with an A1111 `parameters` chunk."""
    try:
        meta = read_png(Path(path))
        fields_ = meta.alone().model_dump()
    except Exception:
        with Image.open(path) as img:
            text = (getattr(img, "text", {}) or {}).get(PARAMETERS_KEY)
        if not text:
            raise StudioError("this PNG carries no generation parameters") from None
        fields_ = parse_parameters(text)
    return fields_


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
    if "lora_weight" in (x_field, y_field) and not base.loras:
        raise StudioError("sweep over lora_weight: pick a LoRA first (LoRA 1 under LoRAs)")
    cells = []
    for y in ys:
        for x in xs:
            values = _swept(_swept(base.model_dump(), x_field, x), y_field, y)
            try:
                cells.append((y, x, GenerationRequest(**values)))
            except Exception as exc:
                raise StudioError(f"sweep value {x_field}={x}{f', {y_field}={y}' if y_field else ''}: {exc}") from None
    return xs, ys, cells


def _swept(values: dict, field: str | None, value) -> dict:
    if field is None:
        return values
    if field == "lora_weight":
        first, *rest = values["loras"]
        return values | {"loras": [first | {"weight": value}, *rest]}
    return values | {field: value}


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def sweep_grid(images: list[Image.Image], xs: list, ys: list, x_field: str, y_field: str | None) -> Image.Image:
    """A labelled X/Y grid, like A1111's X/Y plot: cells apart by a gap, labels readable at the page's size. Small
    images (the demo model's) are enlarged with sharp pixels first, so the labels fit them."""
    w, h = images[0].size
    scale = max(1, 256 // max(w, h))
    if scale > 1:
        images = [im.resize((w * scale, h * scale), Image.Resampling.NEAREST) for im in images]
        w, h = w * scale, h * scale
    gap, font = 8, _font(max(16, w // 14))
    label_h = font.size + 16
    left = (max(font.getlength(f"{LABELS.get(y_field, y_field)} = {y}") for y in ys) + 24) if y_field else 0
    left = int(left)
    sheet = Image.new("RGB", (left + (w + gap) * len(xs) + gap, label_h + (h + gap) * len(ys) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, x in enumerate(xs):
        draw.text((left + gap + i * (w + gap), 8), f"{LABELS.get(x_field, x_field)} = {x}", fill="black", font=font)
    for j, y in enumerate(ys):
        top = label_h + j * (h + gap)
        if y_field:
            draw.text(
                (12, top + h // 2 - font.size // 2), f"{LABELS.get(y_field, y_field)} = {y}", fill="black", font=font
            )
        for i in range(len(xs)):
            sheet.paste(images[j * len(xs) + i], (left + gap + i * (w + gap), top))
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
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{x_field}{'-' + y_field if y_field else ''}.png"
    path = store.output_dir / "sweeps" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    axes = f"X: {x_field} = {', '.join(map(str, xs))}" + (
        f"; Y: {y_field} = {', '.join(map(str, ys))}" if y_field else ""
    )
    info.add_text(PARAMETERS_KEY, f"{base.prompt}\nSweep: {axes}")
    sweep = {"base": base.model_dump(), "x": [x_field, xs], "y": [y_field, ys] if y_field else None}
    info.add_text("cascade_studio_sweep", json.dumps(sweep))
    sheet.save(path, pnginfo=info)
    return path
