"""The model picker in the studio's header: what this server can run, and a switch that waits in the shared line
with its progress shown beside the picker. Afterwards the banner, the size choices and the form's defaults follow
the new model."""

from dataclasses import dataclass

import gradio as gr

from ...service.switch import SwitchModel, available_models
from .. import handlers as h
from ..handlers import Studio, StudioError
from .form import Form
from .results import client_of


@dataclass
class ModelPicker:
    banner: gr.Markdown
    choice: gr.Dropdown
    status: gr.Markdown


def switchable(studio: Studio) -> bool:
    return studio.queue.settings is not None and studio.queue.settings.model_switch


def build_model_picker(studio: Studio) -> ModelPicker:
    current = studio.queue.model_choice
    choices = [(c.label, c.id) for c in available_models(studio.queue.settings)] if studio.queue.settings else []
    if current is not None and current.id not in {v for _, v in choices}:
        choices.insert(0, (current.label, current.id))
    with gr.Row(elem_id="model-row", equal_height=True):
        banner = gr.Markdown(studio.model_banner(), elem_id="model-banner")
        choice = gr.Dropdown(
            choices,
            value=current.id if current else None,
            label="Model",
            scale=0,
            min_width=260,
            interactive=switchable(studio),
            elem_id="model-picker",
            info=None if switchable(studio) else "this server keeps its model (--no-model-switch)",
        )
    status = gr.Markdown("", elem_id="model-status")
    return ModelPicker(banner, choice, status)


def wire_models(studio: Studio, picker: ModelPicker, form: Form, sizes_of) -> None:
    """Switching: a job on the shared queue; then the page follows the new model's banner, sizes and defaults."""

    def on_pick(wanted: str, request: gr.Request):
        queue = studio.queue
        if not wanted or (queue.model_choice is not None and wanted == queue.model_choice.id):
            yield {picker.status: ""}
            return
        choices = {c.id: c for c in available_models(queue.settings)}
        try:
            if not switchable(studio):
                raise StudioError("this server keeps the model it started with (--no-model-switch)")
            if wanted not in choices:
                raise StudioError(f"model {wanted!r} is no longer available here")
            job = h.submit_task(studio, SwitchModel(choices[wanted], queue.settings), client_of(request))
        except StudioError as exc:
            yield {picker.status: f"**Error:** {exc}"}
            return
        for j in job.watch():
            p = j.task_progress or {}
            if j.status == "queued":
                yield {picker.status: f"Switching to **{wanted}**: {h.ordinal(queue.position(j) or 0)} in line"}
            else:
                done = f"{p.get('step', 0)}/{p.get('total', '?')}"
                yield {picker.status: f"Switching to **{wanted}**: {p.get('stage', 'starting')} ({done})"}
        if job.status != "done":
            current = queue.model_choice.id if queue.model_choice else None
            yield {picker.status: f"**Switch failed:** {job.error}", picker.choice: gr.update(value=current)}
            return
        r = job.result
        freed = (r["memory_before"] - r["memory_after_freeing"]) / 1e9
        sizes, default_size = sizes_of()
        d = studio.engine.request(prompt="")
        yield {
            picker.status: f"Loaded **{r['name']}** (the previous model's memory released: {freed:.2f} GB)",
            picker.banner: studio.model_banner(),
            form.size: gr.update(choices=sizes, value=default_size),
            form.width: d.width,
            form.height: d.height,
            form.prior_steps: d.prior_steps,
            form.prior_guidance: d.prior_guidance,
            form.decoder_steps: d.decoder_steps,
            form.decoder_guidance: d.decoder_guidance,
        }

    picker.choice.input(
        on_pick,
        inputs=picker.choice,
        show_progress="hidden",
        api_visibility="private",
        outputs=[
            picker.status,
            picker.banner,
            picker.choice,
            form.size,
            form.width,
            form.height,
            form.prior_steps,
            form.prior_guidance,
            form.decoder_steps,
            form.decoder_guidance,
        ],
        concurrency_limit=studio.queue.max_queued + 1,
        concurrency_id="generate",
    )
