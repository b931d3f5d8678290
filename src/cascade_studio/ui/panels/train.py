"""The Train tab: pictures in (uploaded, or a whole folder picked in the browser), their captions in a table to
edit, a few settings, then a LoRA training job on the same queue as generation, with its loss plotted and its
samples shown as it runs. The finished LoRA joins the picker on the Generate tab.

The job is the API's (`POST /v1/trainings`): the same spec, checks and messages.
"""

import base64
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
from pydantic import ValidationError

from ...engine import RequestError
from ...service.training import MAX_PICTURES, TrainingSpec, new_training, spec_errors
from ...train.lora import defaults_for
from .. import handlers as h
from ..handlers import NO_LORA, Studio, StudioError
from .loras import LoraPicker
from .results import BUSY, IDLE, client_of

PICTURES = (".png", ".jpg", ".jpeg", ".webp")
COLUMNS = ["picture", "caption"]
# Settings whose boxes hold whole numbers (Gradio's Number gives floats).
WHOLE_NUMBERS = ("steps", "rank", "sample_every", "preserve", "batch", "resolution", "seed")
# Settings whose box says 0 for "the default" (a Number box is never empty; 0 is not a valid value of these).
ZERO_IS_DEFAULT = ("alpha", "text_encoder_lr")


# --- what the buttons do (plain functions, tested directly) ---------------------------------------------------------


def caption_rows(paths: list[str] | None) -> list[list[str]]:
    """One row per uploaded picture: its name and caption (from a kohya .txt uploaded beside it, else empty)."""
    files = [Path(p) for p in paths or []]
    texts = {f.stem: f for f in files if f.suffix.lower() == ".txt"}
    rows = []
    for f in sorted((f for f in files if f.suffix.lower() in PICTURES), key=lambda f: f.name):
        caption = texts[f.stem].read_text(errors="replace").strip() if f.stem in texts else ""
        rows.append([f.name, caption])
    return rows


def training_spec(paths: list[str] | None, rows, **settings) -> TrainingSpec:
    """The API's training spec from the tab: pictures with the table's captions. StudioError names each bad field."""
    pictures = {Path(p).name: Path(p) for p in paths or [] if Path(p).suffix.lower() in PICTURES}
    table = rows.values.tolist() if isinstance(rows, pd.DataFrame) else list(rows or [])
    captions = {str(r[0]): str(r[1] or "").strip() for r in table if r and r[0]}
    if not pictures:
        raise StudioError(f"pictures: add 1 to {MAX_PICTURES} pictures (PNG, JPEG or WebP)")
    images = [
        {"image": base64.b64encode(path.read_bytes()).decode(), "caption": captions.get(name) or None}
        for name, path in sorted(pictures.items())
    ]
    given = {k: v for k, v in settings.items() if v not in (None, "") and not (k in ZERO_IS_DEFAULT and v == 0)}
    for key in WHOLE_NUMBERS:
        if isinstance(given.get(key), float) and given[key] == int(given[key]):
            given[key] = int(given[key])
    try:
        spec = TrainingSpec(images=images, **given)
    except ValidationError as exc:
        raise StudioError("; ".join(spec_errors(exc))) from None
    missing = [name for name in sorted(pictures) if not captions.get(name)] if not spec.trigger else []
    if missing:
        raise StudioError(f"caption: {missing[0]} has no caption; write one or give a trigger word")
    return spec


def samples_of(workdir: Path) -> list[tuple[str, str]]:
    """The samples a training wrote so far, in step order, each captioned with its step."""
    found = [(int(f.stem.rsplit("-", 1)[1]), f) for f in workdir.glob("*.sample-*.png") if f.stem[-1].isdigit()]
    return [(str(f), f"step {step}") for step, f in sorted(found)]


def training_status(job) -> str:
    """The tab's status line (markdown)."""
    p = job.task_progress or {}
    if job.status == "queued":
        return "**Queued** behind the generations ahead of it."
    if job.status == "running" and not p.get("loss"):
        return f"**{str(p.get('stage', 'starting')).capitalize()}…**"
    if job.status == "running":
        eta = p.get("eta", 0)
        return (
            f"**Training** step {p['step']}/{p['total']} · loss {p['loss']:.4f} · {p['steps_per_second']:.2f} steps/s"
            f" · about {int(eta // 60)} min {int(eta % 60)} s left"
        )
    if job.status == "done":
        r = job.result
        return (
            f"**Done:** LoRA `{r['lora']}` ({r['steps']} steps in {r['seconds']:.0f} s, final loss "
            f"{r['final_loss']:.4f}). Pick it under *LoRAs* on the Generate tab."
        )
    if job.status == "cancelled":
        return "**Stopped.** A checkpoint was written; `cascade-studio train-lora --resume` continues it."
    return f"**Failed:** {job.error}"


# --- layout and wiring ----------------------------------------------------------------------------------------------


@dataclass
class Train:
    files: gr.File
    captions: gr.Dataframe
    name: gr.Textbox
    trigger: gr.Textbox
    settings: dict[str, gr.components.Component]  # TrainingSpec's field -> its box, in the order of on_start's inputs
    start: gr.Button
    stop: gr.Button
    status: gr.Markdown
    loss: gr.LinePlot
    samples: gr.Gallery
    job: gr.State


def build_train(studio: Studio) -> Train:
    d = defaults_for(studio.engine)
    gr.Markdown(
        "Teach the model something new from your own pictures: a LoRA. Captions say what each picture shows; "
        "a trigger word is added to each (and stands in for a missing caption)."
    )
    with gr.Row(elem_id="train-main"):
        with gr.Column(scale=2, min_width=300):
            files = gr.File(
                label="Pictures, with kohya .txt captions if you have them",
                file_count="multiple",
                file_types=[*PICTURES, ".txt"],
                elem_id="train-files",
                height=170,
            )
            captions = gr.Dataframe(
                headers=COLUMNS,
                datatype=["str", "str"],
                column_count=(2, "fixed"),
                interactive=True,
                wrap=True,
                label="Captions (edit here)",
                elem_id="train-captions",
                max_height=260,
            )
            with gr.Row():
                name = gr.Textbox("my-lora", label="LoRA name", max_lines=1, elem_id="train-name")
                trigger = gr.Textbox(label="Trigger word", max_lines=1, placeholder="e.g. sks", elem_id="train-trigger")
            settings = build_settings(d)
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=3)
                stop = gr.Button("Stop", elem_id="train-stop", interactive=False, scale=1)
        with gr.Column(scale=3, min_width=300):
            status = gr.Markdown("Add pictures to begin.", elem_id="train-status")
            loss = gr.LinePlot(
                pd.DataFrame({"step": [], "loss": []}),
                x="step",
                y="loss",
                label="Loss",
                elem_id="train-loss",
                height=220,
            )
            classes = ["pixelated"] if studio.small_images else []
            samples = gr.Gallery(
                label="Samples (fixed seed)", columns=4, height=220, elem_id="train-samples", elem_classes=classes
            )
    return Train(
        files,
        captions,
        name,
        trigger,
        settings,
        start,
        stop,
        status,
        loss,
        samples,
        gr.State(None),
    )


def build_settings(d: dict) -> dict[str, gr.components.Component]:
    """The training settings: the common four in view, the rest folded away, each starting at the loaded model's
    default (`defaults_for`), so an untouched box trains what `train-lora` would."""
    with gr.Row():
        boxes = {
            "steps": gr.Number(label="Steps", value=d["steps"], precision=0, info="this model's default"),
            "rank": gr.Number(label="Rank", value=8, precision=0, info="1 to 256"),
            "sample_every": gr.Number(label="Sample every", value=100, precision=0, info="steps; 0: none"),
            "preserve": gr.Number(
                label="Preserve", value=d["preserve"], precision=0, info="base-model pictures trained beside yours"
            ),
        }
    with gr.Accordion("More settings", open=False, elem_id="train-more"):
        with gr.Row():
            boxes |= {
                "lr": gr.Number(label="Learning rate", value=d["lr"], info="above 0, at most 0.1"),
                "batch": gr.Number(label="Batch", value=d["batch"], precision=0, info="1 to 256"),
                "alpha": gr.Number(label="Alpha", value=0, info="0: the rank (scale 1)"),
                "seed": gr.Number(label="Seed", value=0, precision=0, info="the same seed trains the same LoRA"),
            }
        with gr.Row():
            boxes |= {
                "resolution": gr.Number(
                    label="Resolution", value=d["resolution"], precision=0, info="the long side, a multiple of 128"
                ),
                "preserve_weight": gr.Number(
                    label="Preserve weight",
                    value=d["preserve_weight"],
                    info="above 0, at most 100; higher changes the rest of the model less",
                ),
            }
        with gr.Row():  # each stage's switch beside its own setting
            boxes |= {
                "decoder": gr.Checkbox(
                    value=d["decoder"], label="Adapt the decoder too", info="Stage B learns to draw what is new"
                ),
                "decoder_min_t": gr.Number(
                    label="Decoder learns from noise level",
                    value=d["decoder_min_t"],
                    info="0 to below 1; the steps below it stay the base model's",
                ),
            }
        with gr.Row():
            boxes |= {
                "text_encoder": gr.Checkbox(
                    value=d["text_encoder"], label="Adapt the text encoder too", info="the new word is learnt there too"
                ),
                "text_encoder_lr": gr.Number(label="Text encoder rate", value=0, info="0: the model's default"),
            }
        with gr.Row():  # its own row: three in one are unreadable on a phone
            boxes |= {
                "trigger_embedding": gr.Checkbox(
                    value=d["trigger_embedding"],
                    label="Learn the trigger word itself",
                    info="its own tokens; prompts without it read as before",
                ),
            }
    for key, box in boxes.items():
        box.elem_id = f"train-{key.replace('_', '-')}"
    return boxes


def wire_train(studio: Studio, train: Train, picker: LoraPicker) -> None:
    t = train
    t.files.change(lambda paths: caption_rows(paths), inputs=t.files, outputs=t.captions, api_visibility="private")

    # The request comes first: Gradio fills it in only among the positional parameters, before the settings' *values.
    def on_start(request: gr.Request, paths, rows, name, trigger, *values):
        try:
            settings = dict(zip(t.settings, values))
            spec = training_spec(paths, rows, name=name, trigger=trigger, **settings)
            task = new_training(studio.queue, spec)
            job = h.submit_task(studio, task, client_of(request))
        except (StudioError, RequestError) as exc:
            yield {t.status: f"**Error:** {exc}"}
            return
        yield {
            t.job: job.id,
            t.start: gr.update(interactive=False),
            t.stop: BUSY,
            t.samples: [],
            t.status: training_status(job),
        }
        points, shown = [], None
        for j in job.watch(timeout=1.0):
            p = j.task_progress or {}
            update = {t.status: training_status(j)}
            if p.get("loss") is not None and (not points or points[-1][0] != p["step"]):
                points.append((p["step"], p["loss"]))
                update[t.loss] = pd.DataFrame(points, columns=["step", "loss"])
            if p.get("sample") and p["sample"] != shown:
                shown = p["sample"]
                update[t.samples] = samples_of(task.workdir)
            yield update
        end = {t.job: None, t.start: gr.update(interactive=True), t.stop: IDLE, t.status: training_status(job)}
        if job.status == "done":
            choices = [NO_LORA, *studio.lora_names()]
            end |= {name_box: gr.update(choices=choices) for name_box in picker.names}
            end[t.samples] = samples_of(task.workdir)
        yield end

    t.start.click(
        on_start,
        inputs=[t.files, t.captions, t.name, t.trigger, *t.settings.values()],
        outputs=[t.job, t.start, t.stop, t.samples, t.status, t.loss, *picker.names],
        show_progress="hidden",
        concurrency_limit=studio.queue.max_queued + 1,
        concurrency_id="generate",
        api_visibility="private",
    )

    def on_stop(job_id):
        if job_id:
            studio.queue.cancel(job_id)

    t.stop.click(on_stop, inputs=t.job, outputs=None, queue=False, api_visibility="private")
