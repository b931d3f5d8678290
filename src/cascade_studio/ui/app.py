"""The studio's page: a header with the loaded model, then tabs (Generate, Compare A/B, Sweep, History, PNG info,
Train).
Started by `cascade-studio serve` (or plain `cascade-studio`).

The page is put together in steps, the way a diffusers pipeline's `__call__` is: each panel's builder lays it out
and returns its components (panels/), then one wiring function per feature connects them. The handlers they call
(handlers.py) are plain functions over the job queue and the history store.

Layout: on a laptop the prompt bar and the settings stand in the left column and the result fills the right; on a
phone the result comes straight after the prompt bar, so it is in view after Generate (CSS grid areas below).
"""

from pathlib import Path

import gradio as gr

from ..service.guard import IMAGE_BODY
from . import handlers as h
from .handlers import FormValues, Studio, StudioError
from .panels.form import build_prompt_bar, build_settings, wire_form
from .panels.models import build_model_picker, wire_models
from .panels.picture import wire_start_from
from .panels.results import build_results, client_of, wire_generate, wire_selection
from .panels.tabs import (
    build_compare,
    build_history,
    build_png_info,
    build_sweep,
    history_updates,
    wire_compare,
    wire_history,
    wire_png_info,
    wire_sweep,
)
from .panels.train import build_train, wire_train

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate")
CSS = """
.gradio-container {max-width: 1400px !important}
#title h1 {margin: 0; font-size: 1.5em}
#model-banner {font-size: 0.9em; color: var(--body-text-color-subdued)}
#main {display: grid !important; grid-template-columns: minmax(320px, 2fr) minmax(0, 3fr); gap: var(--layout-gap);
       grid-template-areas: "prompt results" "settings results"; grid-template-rows: min-content 1fr;
       align-items: start}
#prompt-area {grid-area: prompt} #results-area {grid-area: results} #settings-area {grid-area: settings}
#main > div {min-width: 0 !important}
@media (max-width: 800px) {
  #main {grid-template-columns: minmax(0, 1fr); grid-template-areas: "prompt" "results" "settings"}
  #title h1 {font-size: 1.2em}
  #model-banner {font-size: 0.8em; line-height: 1.35}
  #model-row {flex-direction: column !important}
  #model-row > * {width: 100% !important; min-width: 0 !important}
  #train-main {flex-direction: column !important}
  #actions {flex-wrap: nowrap !important}
  #actions button {min-width: 0 !important}
  #gallery, #gallery .grid-wrap {height: min(92vw, 460px) !important}
}
/* The result's images share the box: rows split its height, each image contained in its cell, so one image is
   shown large and eight are all in view, none cropped and none below the fold of the box. */
#gallery .grid-container {height: 100%; grid-auto-rows: minmax(0, 1fr)}
#gallery .grid-container .thumbnail-item {aspect-ratio: auto !important; height: 100%; width: 100%}
#status-box {padding: 8px 12px; border-radius: var(--radius-lg); background: var(--block-background-fill);
             border: 1px solid var(--block-border-color); min-height: 2.6em}
#status-box.cs-error {border-color: var(--error-border-color, #ef4444); color: var(--error-text-color, #b91c1c);
                      background: var(--error-background-fill, #fef2f2)}
.cs-bar {height: 6px; margin-top: 6px; background: var(--border-color-primary); border-radius: 3px; overflow: hidden}
.cs-bar > div {height: 100%; background: var(--color-accent); transition: width 0.3s}
.cs-tokens {font-size: 0.85em; color: var(--body-text-color-subdued); margin-top: -4px}
.cs-tokens mark {background: var(--color-accent-soft); color: inherit; padding: 0 2px; border-radius: 3px}
.cs-hint {font-style: italic}
.pixelated img, .pixelated canvas {image-rendering: pixelated}
#history-paging {align-items: center; flex-wrap: nowrap}
#history-page {text-align: center}
#gallery .caption-label, #history .caption-label {font-size: 0.75em; padding: 1px 6px; opacity: 0.85}
/* Every tab in view on a narrow screen: Gradio moves the tabs that do not fit into a "⋯" menu; show that menu's
   tabs as a second row instead. */
#tabs .tab-wrapper {flex-wrap: wrap; height: auto}
#tabs .overflow-menu {display: contents}
#tabs .overflow-menu > button {display: none}
#tabs .overflow-dropdown, #tabs .overflow-dropdown.hide {display: flex !important; position: static !important;
    flex-direction: row !important; flex-wrap: wrap; box-shadow: none !important; border: none !important;
    background: none !important; padding: 0; margin: 0; min-width: 0}
#tabs .overflow-dropdown button {width: auto !important; padding: var(--size-1) var(--size-4);
    color: var(--body-text-color-subdued)}
"""
# Enter in either prompt box generates (both are single-line boxes, which Gradio submits on Enter; a multi-line box
# takes Enter as a newline). Ctrl+Enter (Cmd+Enter) generates too: the browser sends no key press for it, which is
# what Gradio listens to. On a phone, generating scrolls the status line and the result into view.
JS = """
() => {
  const toResult = () => {
    const status = document.querySelector('#status');
    if (window.innerWidth <= 800 && status) {
      window.scrollTo({top: status.getBoundingClientRect().top + window.scrollY - 8});
    }
  };
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'Enter' || e.shiftKey || !e.target.closest('#prompt, #negative')) return;
    if (e.ctrlKey || e.metaKey) {
      e.preventDefault();
      document.querySelector('#generate')?.click();
    }
    toResult();
  });
  document.addEventListener('click', (e) => { if (e.target.closest('#generate')) toResult(); });
}
"""
PAGE = {"theme": THEME, "css": CSS, "js": JS}  # what mount() and a Space's launch() give Gradio


def build_app(studio: Studio) -> gr.Blocks:
    store = studio.store

    def preset_for(width: int, height: int) -> str:
        """The size choice showing width × height, or Custom (of the model loaded now: a switch changes them)."""
        return next((c for c in studio.size_choices() if c.startswith(f"{width}×{height} ")), h.CUSTOM)

    def sizes_of() -> tuple[list[str], str]:
        d = studio.engine.request(prompt="")
        return studio.size_choices(), preset_for(d.width, d.height)

    with gr.Blocks(title="cascade-studio") as demo:
        # 1. Header: what this is and which model runs.
        gr.Markdown("# cascade-studio · Stable Cascade", elem_id="title")
        picker = build_model_picker(studio)

        # 2. Layout: the Generate tab (prompt bar, result, settings) and the other tabs.
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row(elem_id="main"):
                    with gr.Column(elem_id="prompt-area"):
                        bar = build_prompt_bar(studio)
                    with gr.Column(elem_id="results-area"):
                        results = build_results(studio)
                    with gr.Column(elem_id="settings-area"):
                        form = build_settings(studio, bar)
            with gr.Tab("Compare A/B", id="compare", elem_id="tab-compare"):
                compare = build_compare(studio)
            with gr.Tab("Sweep", id="sweep", elem_id="tab-sweep"):
                sweep = build_sweep()
            with gr.Tab("History", id="history", elem_id="tab-history"):
                history = build_history(studio)
            with gr.Tab("PNG info", id="png", elem_id="tab-png"):
                png = build_png_info()
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = build_train(studio)

        # 3. Wiring, one feature at a time.
        def after_done(record, key, previous) -> dict:
            """A finished generation feeds the A/B view (previous image against the new one) and the history."""
            choices = h.history_choices(store)
            out = {
                compare.pick_a: gr.update(choices=choices, value=previous),
                compare.pick_b: gr.update(choices=choices, value=key),
            }
            started_from = h.compare_with_input(store, record, 0)
            if started_from is not None:  # a picture in: compare it with what came out
                out[compare.slider], out[compare.changes] = started_from
            elif previous:
                out[compare.slider], out[compare.changes] = h.compare(store, previous, key)
            return out | history_updates(studio, history)

        elsewhere = [
            compare.pick_a,
            compare.pick_b,
            compare.slider,
            compare.changes,
            history.gallery,
            history.keys,
            history.page,
            history.page_label,
        ]
        wire_form(studio, form)
        wire_models(studio, picker, form, sizes_of)
        wire_generate(studio, form, results, after_done, elsewhere)
        wire_selection(studio, form, results, preset_for)
        wire_compare(studio, compare)
        wire_sweep(studio, form, results, sweep)
        wire_history(studio, form, history, tabs, preset_for)
        wire_start_from(studio, form.picture, results.start_from, results.selected, results.details)
        wire_start_from(studio, form.picture, history.start_from, history.selected, history.message, tabs)
        wire_png_info(form, png, preset_for)
        wire_train(studio, train, form.loras)

        def on_load():
            choices = h.history_choices(store)
            return history_updates(studio, history) | {
                compare.pick_a: gr.update(choices=choices),
                compare.pick_b: gr.update(choices=choices),
            }

        demo.load(
            on_load,
            outputs=[history.gallery, history.keys, history.page, history.page_label, compare.pick_a, compare.pick_b],
            api_visibility="private",
        )
        wire_api(studio, form)
    return demo


def wire_api(studio: Studio, form) -> None:
    """A clean named endpoint for programs (gradio_client): images plus their seeds."""
    d = studio.engine.request(prompt="")
    api_images = gr.Gallery(visible=False)
    api_seeds = gr.JSON(visible=False)
    api_button = gr.Button(visible=False)

    def generate(
        prompt: str,
        negative_prompt: str = "",
        width: float = d.width,
        height: float = d.height,
        seed: float | None = None,
        prior_steps: float = d.prior_steps,
        prior_guidance: float = d.prior_guidance,
        decoder_steps: float = d.decoder_steps,
        decoder_guidance: float = d.decoder_guidance,
        num_images: float = 1,
        request: gr.Request = None,
    ):
        """Generate images; returns the images and their seeds (image i uses seed + i)."""
        values = FormValues(
            prompt,
            negative_prompt,
            h.CUSTOM,
            width,
            height,
            seed,
            seed is None,
            num_images,
            prior_steps,
            prior_guidance,
            decoder_steps,
            decoder_guidance,
        )
        try:
            req = h.build_request(studio, values)
            if (req.width, req.height) != (width, height):
                raise StudioError(
                    f"width/height: must be {h.ALLOWED['width'].removeprefix('a ')} (got {width:g}×{height:g})"
                )
            job = h.submit(studio, req, client_of(request))
        except StudioError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        for _ in job.watch():
            pass
        if job.status != "done":
            raise gr.Error(h.status_text(studio, job), print_exception=False)
        record = studio.store.get_job(job.id)
        return h.gallery_items(studio.store, record.images), {"seeds": record.request.image_seeds, "job": job.id}

    # The form's own components as inputs: the endpoint's parameters are the function's, with their defaults.
    inputs = [
        form.prompt,
        form.negative_prompt,
        form.width,
        form.height,
        form.seed,
        form.prior_steps,
        form.prior_guidance,
        form.decoder_steps,
        form.decoder_guidance,
        form.num_images,
    ]
    api_button.click(
        generate,
        inputs=inputs,
        outputs=[api_images, api_seeds],
        api_name="generate",
        concurrency_limit=studio.queue.max_queued + 1,
        concurrency_id="generate",
    )


def mount(app, studio: Studio, auth=None, path: str = "/"):
    """Put the studio on an existing FastAPI app (the one serving /v1), so UI and API share one process and queue.

    `auth` is Gradio's login check (a function of user and password). Gradio serves files from the output folder
    (the images), never the history database beside them."""
    demo = build_app(studio)
    # Our JobQueue bounds and orders the work; Gradio's queue only needs room for everyone waiting in it.
    demo.queue(max_size=studio.queue.max_queued * 2, default_concurrency_limit=studio.queue.max_queued + 1)
    db = Path(studio.store.db_path).resolve()
    blocked = [str(db.with_name(db.name + suffix)) for suffix in ("", "-wal", "-shm", "-journal")]
    return gr.mount_gradio_app(
        app,
        demo,
        path=path,
        auth=auth,
        show_error=True,
        max_file_size=IMAGE_BODY,
        allowed_paths=[str(Path(studio.store.output_dir).resolve())],
        blocked_paths=blocked,
        **PAGE,
    )
