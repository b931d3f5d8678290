"""The result area beside the prompt: status with a progress bar, the live preview, the gallery and the selected
image's settings; and the Generate / Cancel wiring, which also feeds the A/B view and the history."""

from dataclasses import dataclass

import gradio as gr

from .. import handlers as h
from ..handlers import Studio, StudioError
from .form import Form

IDLE = gr.update(variant="secondary", interactive=False)
BUSY = gr.update(variant="stop", interactive=True)


def client_of(request: gr.Request | None) -> str:
    """Who the per-client job cap counts: the same identity as the API's (the address, with the user logged in),
    so one person has one share of the queue whichever way they come in."""
    if request is None or request.client is None:
        return "studio"
    user = getattr(request, "username", None)
    return f"{user}@{request.client.host}" if user else request.client.host


@dataclass
class Results:
    status: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    details: gr.Markdown
    use: gr.Button
    start_from: gr.Button
    job: gr.State  # id of this tab's running job, for Cancel
    last_key: gr.State  # "job:index" of this tab's latest first image, for A/B
    selected: gr.State  # "job:index" of the image selected in the gallery or history


def build_results(studio: Studio) -> Results:
    classes = ["pixelated"] if studio.small_images else []
    status = gr.HTML(h.status_html(studio), elem_id="status")
    preview = gr.Image(
        label="Live preview of the prior",
        type="pil",
        height=160,
        interactive=False,
        visible=False,
        elem_id="preview",
        elem_classes=classes,
        show_label=True,
    )
    # Whole images: a lone image once filled the width and was cropped to the box's height.
    gallery = gr.Gallery(
        label="Images",
        columns=1,
        height=460,
        object_fit="contain",
        fit_columns=False,
        elem_id="gallery",
        elem_classes=classes,
        show_label=False,
        preview=False,
    )
    details = gr.Markdown("Select an image to see its settings.", elem_id="details")
    with gr.Row():
        use = gr.Button("Use these settings", size="sm", elem_id="use-settings")
        start_from = gr.Button("Start from this image", size="sm", elem_id="start-from")
    return Results(status, preview, gallery, details, use, start_from, gr.State(None), gr.State(None), gr.State(None))


def wire_generate(studio: Studio, form: Form, results: Results, after_done, elsewhere: list) -> None:
    """Generate (Enter in either prompt box, or the button) and Cancel. `after_done(record, key, previous)` gives
    the updates a finished job makes elsewhere (A/B pickers, history), as a dict over the `elsewhere` components."""
    store, queue = studio.store, studio.queue
    has_preview = studio.engine.pipelines.previewer is not None
    r = results

    def on_generate(data: dict, request: gr.Request):
        previous = data[r.last_key]
        try:
            request_ = h.build_request(studio, form.read(data), *form.pictures(data))
            job = h.submit(studio, request_, client_of(request))
        except StudioError as exc:  # one clear message where the status goes; nothing else on the page changes
            yield {r.status: h.status_html(studio, message=f"**Error:** {exc}", error=True)}
            return
        yield {
            r.status: h.status_html(studio, job),
            r.job: job.id,
            form.seed: str(job.request.seed),
            r.gallery: [],
            r.preview: gr.update(value=None, visible=has_preview),
            form.stop: BUSY,
        }
        shown = None
        for j in job.watch():
            update = {r.status: h.status_html(studio, j)}
            if j.preview is not shown:
                shown = j.preview
                update[r.preview] = h.preview_image(j.preview)
            yield update
        end = {
            r.status: h.status_html(studio, job),
            r.job: None,
            form.stop: IDLE,
            r.preview: gr.update(value=None, visible=False),
        }
        if job.status != "done":
            yield end
            return
        record = store.get_job(job.id)
        key = f"{job.id}:0"
        images = h.gallery_items(store, record.images)
        # The last update carries the status too: without it the page sometimes stayed on "Decoder step 3/3"
        # although the stream had yielded "Done" just before (2 browser-test runs in 5, and once in CI).
        yield (
            end
            | {
                r.last_key: key,
                r.selected: key,
                r.details: h.image_details(record, 0),
                r.gallery: gr.update(value=images, columns=h.gallery_columns(len(images))),
            }
            | after_done(record, key, previous)
        )

    gr.on(
        [form.prompt.submit, form.negative_prompt.submit, form.run.click],
        on_generate,
        inputs=form.inputs() | {r.last_key},
        show_progress="hidden",
        outputs=[
            r.status,
            r.job,
            form.seed,
            r.gallery,
            r.preview,
            form.stop,
            r.last_key,
            r.selected,
            r.details,
            *elsewhere,
        ],
        concurrency_limit=queue.max_queued + 1,
        concurrency_id="generate",
        # Enter pressed again just as a run ends (Gradio still finishing its event) runs once more, not never.
        trigger_mode="always_last",
        api_visibility="private",
    )

    def on_cancel(job_id):
        # No outputs: the running stream owns the status line and shows "Cancelled." itself.
        if job_id:
            queue.cancel(job_id)

    form.stop.click(on_cancel, inputs=r.job, queue=False, show_progress="hidden", api_visibility="private")


def select_details(store, key: str | None) -> tuple:
    """A gallery selection's (details panel, selected key): the image's settings, or the reason it has none."""
    if key is None:
        return gr.update(), None
    try:
        return h.image_details(*h.lookup(store, key)), key
    except StudioError as exc:
        return f"**Error:** {exc}", None


def wire_selection(studio: Studio, form: Form, results: Results, preset_for) -> None:
    """Selecting a gallery image shows its settings; its settings or its seed go back into the form."""
    store, r = studio.store, results

    def on_select(key_base, evt: gr.SelectData):
        return select_details(store, f"{key_base.rsplit(':', 1)[0]}:{evt.index}" if key_base else None)

    r.gallery.select(
        on_select, inputs=r.last_key, outputs=[r.details, r.selected], show_progress="hidden", api_visibility="private"
    )

    def on_use(key):
        if not key:
            return {r.status: h.status_html(studio, message="**Error:** select an image first", error=True)}
        try:
            return form.fill(h.settings_of(*h.lookup(store, key)), preset_for)
        except StudioError as exc:
            return {r.status: h.status_html(studio, message=f"**Error:** {exc}", error=True)}

    r.use.click(
        on_use, inputs=r.selected, outputs=[*form.outputs(), r.status], show_progress="hidden", api_visibility="private"
    )

    def on_reuse(key):
        if not key:
            return {r.status: h.status_html(studio, message="**Error:** select an image first", error=True)}
        try:
            record, index = h.lookup(store, key)
        except StudioError as exc:
            return {r.status: h.status_html(studio, message=f"**Error:** {exc}", error=True)}
        return {form.seed: str(record.images[index].seed), form.random_seed: False}

    form.reuse.click(
        on_reuse,
        inputs=r.selected,
        outputs=[form.seed, form.random_seed, r.status],
        show_progress="hidden",
        api_visibility="private",
    )
