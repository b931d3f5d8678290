"""The studio's other tabs: Compare A/B, Sweep, History and PNG info. Each has a builder that lays it out and
returns its components, and a wiring function for what it does."""

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from .. import handlers as h
from ..handlers import Studio, StudioError
from .form import Form
from .results import BUSY, IDLE, Results, client_of, select_details


def _error(studio: Studio, exc: Exception) -> str:
    return h.status_html(studio, message=f"**Error:** {exc}", error=True)


# --- Compare A/B ---------------------------------------------------------------------------------------------------


@dataclass
class Compare:
    pick_a: gr.Dropdown
    pick_b: gr.Dropdown
    slider: gr.ImageSlider
    changes: gr.Markdown


def build_compare(studio: Studio) -> Compare:
    gr.Markdown("Drag the handle to compare. By default A is your previous image and B the latest.")
    with gr.Row():
        pick_a = gr.Dropdown(label="A", choices=[], elem_id="pick-a")
        pick_b = gr.Dropdown(label="B", choices=[], elem_id="pick-b")
    classes = ["pixelated"] if studio.small_images else []
    slider = gr.ImageSlider(label="A | B", type="filepath", elem_id="ab-slider", elem_classes=classes, height=480)
    changes = gr.Markdown("", elem_id="ab-changes")
    return Compare(pick_a, pick_b, slider, changes)


def wire_compare(studio: Studio, compare: Compare) -> None:
    def on_pick(a, b):
        if not a or not b:
            return gr.update(), ""
        try:
            return h.compare(studio.store, a, b)
        except StudioError as exc:
            return gr.update(), f"**Error:** {exc}"

    for picker in (compare.pick_a, compare.pick_b):
        picker.input(
            on_pick,
            inputs=[compare.pick_a, compare.pick_b],
            outputs=[compare.slider, compare.changes],
            show_progress="hidden",
            api_visibility="private",
        )


# --- Sweep ---------------------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    x_field: gr.Dropdown
    x_values: gr.Textbox
    y_field: gr.Dropdown
    y_values: gr.Textbox
    run: gr.Button
    stop: gr.Button
    status: gr.Markdown
    image: gr.Image


def build_sweep() -> Sweep:
    gr.Markdown("One image per cell, from the Generate tab's settings; a fixed seed unless seed is an axis.")
    with gr.Row():
        x_field = gr.Dropdown(list(h.SWEEP_FIELDS), value="prior_guidance", label="X axis")
        x_values = gr.Textbox(value="2, 4, 6", label="X values", elem_id="sweep-x")
    with gr.Row():
        y_field = gr.Dropdown(["none", *h.SWEEP_FIELDS], value="none", label="Y axis")
        y_values = gr.Textbox(value="", label="Y values", elem_id="sweep-y")
    with gr.Row():
        run = gr.Button("Run sweep", variant="primary", elem_id="sweep")
        stop = gr.Button("Cancel sweep", variant="secondary", interactive=False, elem_id="sweep-cancel")
    status = gr.Markdown("", elem_id="sweep-status")
    image = gr.Image(label="Grid", type="filepath", interactive=False, elem_id="sweep-grid")
    return Sweep(x_field, x_values, y_field, y_values, run, stop, status, image)


def wire_sweep(studio: Studio, form: Form, results: Results, sweep: Sweep) -> None:
    """Each cell is a job on the shared queue; the Generate tab's status line and Cancel follow the running cell,
    and Cancel (there or here) stops the sweep: no later cell runs and no grid is saved."""
    store, r = studio.store, results

    def on_sweep(data: dict, request: gr.Request):
        try:
            base = h.build_request(studio, form.read(data))
            y = None if data[sweep.y_field] == "none" else data[sweep.y_field]
            xs, ys, cells = h.sweep_requests(base, data[sweep.x_field], data[sweep.x_values], y, data[sweep.y_values])
        except StudioError as exc:
            yield {sweep.status: f"**Error:** {exc}", r.status: _error(studio, exc)}
            return
        images = []
        for n, (_, _, req) in enumerate(cells, 1):
            try:
                job = h.submit(studio, req, client_of(request))
            except StudioError as exc:
                yield {
                    sweep.status: f"Sweep stopped at cell {n}: {exc}",
                    r.status: _error(studio, exc),
                    r.job: None,
                    form.stop: IDLE,
                    sweep.stop: IDLE,
                }
                return
            for j in job.watch():
                yield {
                    sweep.status: f"Cell {n}/{len(cells)}: {h.status_text(studio, j)}",
                    r.status: h.status_html(studio, j),
                    r.job: job.id,
                    form.stop: BUSY,
                    sweep.stop: BUSY,
                }
            if job.status != "done":
                yield {
                    sweep.status: f"Sweep stopped at cell {n} of {len(cells)}: {h.status_text(studio, job)}",
                    r.status: h.status_html(studio, job),
                    r.job: None,
                    form.stop: IDLE,
                    sweep.stop: IDLE,
                }
                return
            record = store.get_job(job.id)
            with Image.open(store.image_file(record.images[0])) as im:
                images.append(im.convert("RGB"))
        path = h.save_sweep(
            store, h.sweep_grid(images, xs, ys, data[sweep.x_field], y), cells[0][2], data[sweep.x_field], xs, y, ys
        )
        yield {
            sweep.status: f"Saved {path}",
            sweep.image: str(path),
            r.job: None,
            form.stop: IDLE,
            sweep.stop: IDLE,
            r.status: h.status_html(studio, message=f"**Sweep done:** {len(cells)} cells"),
        }

    sweep.run.click(
        on_sweep,
        inputs=form.inputs() | {sweep.x_field, sweep.x_values, sweep.y_field, sweep.y_values},
        outputs=[sweep.status, sweep.image, r.status, r.job, form.stop, sweep.stop],
        show_progress="hidden",
        concurrency_limit=studio.queue.max_queued + 1,
        concurrency_id="generate",
        api_visibility="private",
    )
    sweep.stop.click(
        lambda job_id: studio.queue.cancel(job_id) if job_id else None,
        inputs=r.job,
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )


# --- History -------------------------------------------------------------------------------------------------------


@dataclass
class History:
    search: gr.Textbox
    prev: gr.Button
    page_label: gr.Markdown
    next: gr.Button
    gallery: gr.Gallery
    details: gr.Markdown
    use: gr.Button
    start_from: gr.Button
    delete: gr.Button
    download: gr.DownloadButton
    message: gr.Markdown
    keys: gr.State
    page: gr.State
    selected: gr.State


def build_history(studio: Studio) -> History:
    search = gr.Textbox(
        label="Search prompts", placeholder="e.g. circle  (Enter to search)", max_lines=1, elem_id="history-search"
    )
    with gr.Row(elem_id="history-paging"):
        prev = gr.Button("◀ Newer", size="sm", min_width=90, scale=0, elem_id="history-prev")
        page_label = gr.Markdown("", elem_id="history-page")
        nxt = gr.Button("Older ▶", size="sm", min_width=90, scale=0, elem_id="history-next")
    classes = ["pixelated"] if studio.small_images else []
    gallery = gr.Gallery(
        label="Past generations (newest first)",
        columns=6,
        height=420,
        object_fit="contain",
        fit_columns=False,
        elem_id="history",
        elem_classes=classes,
        preview=False,
    )
    details = gr.Markdown("Select an image to see its settings.", elem_id="history-details")
    with gr.Row():
        use = gr.Button("Use these settings", size="sm", elem_id="history-use")
        start_from = gr.Button("Start from this image", size="sm", elem_id="history-start-from")
        delete = gr.Button("Delete this generation", size="sm", variant="stop", elem_id="history-delete")
        download = gr.DownloadButton("Download all as zip", size="sm", elem_id="history-download")
    message = gr.Markdown("", elem_id="history-message")
    return History(
        search,
        prev,
        page_label,
        nxt,
        gallery,
        details,
        use,
        start_from,
        delete,
        download,
        message,
        gr.State([]),
        gr.State(1),
        gr.State(None),
    )


def history_updates(studio: Studio, history: History, search: str = "", page: int = 1) -> dict:
    shown = h.history_page(studio.store, search, page)
    return {
        history.gallery: shown.items,
        history.keys: shown.keys,
        history.page: shown.page,
        history.page_label: shown.label,
    }


def wire_history(studio: Studio, form: Form, history: History, tabs: gr.Tabs, preset_for) -> None:
    store, hs = studio.store, history
    listing = [hs.gallery, hs.keys, hs.page, hs.page_label]

    def show(search, page):
        return history_updates(studio, hs, search, page)

    hs.search.submit(lambda s: show(s, 1), inputs=hs.search, outputs=listing, api_visibility="private")
    hs.prev.click(lambda s, p: show(s, p - 1), inputs=[hs.search, hs.page], outputs=listing, api_visibility="private")
    hs.next.click(lambda s, p: show(s, p + 1), inputs=[hs.search, hs.page], outputs=listing, api_visibility="private")

    def on_select(keys, evt: gr.SelectData):
        return select_details(store, keys[evt.index] if evt.index < len(keys) else None)

    hs.gallery.select(
        on_select, inputs=hs.keys, outputs=[hs.details, hs.selected], show_progress="hidden", api_visibility="private"
    )

    def on_use(key):
        if not key:
            return {hs.message: "**Error:** select an image first"}
        try:
            return form.fill(h.settings_of(*h.lookup(store, key)), preset_for) | {tabs: gr.Tabs(selected="generate")}
        except StudioError as exc:
            return {hs.message: f"**Error:** {exc}"}

    hs.use.click(on_use, inputs=hs.selected, outputs=[*form.outputs(), tabs, hs.message], api_visibility="private")

    def on_delete(key, search, page):
        try:
            message = h.delete_generation(store, key)
        except StudioError as exc:
            return {hs.message: f"**Error:** {exc}"}
        return show(search, page) | {
            hs.message: message,
            hs.selected: None,
            hs.details: "Select an image to see its settings.",
        }

    hs.delete.click(
        on_delete,
        inputs=[hs.selected, hs.search, hs.page],
        outputs=[*listing, hs.message, hs.selected, hs.details],
        api_visibility="private",
    )

    def on_download(search):
        try:
            path, count = h.export_history(store, search)
        except StudioError as exc:
            return None, f"**Error:** {exc}"
        return str(path), f"{count} images in {path.name}"

    hs.download.click(on_download, inputs=hs.search, outputs=[hs.download, hs.message], api_visibility="private")


# --- PNG info ------------------------------------------------------------------------------------------------------


@dataclass
class PngInfo:
    file: gr.File
    text: gr.Markdown


def build_png_info() -> PngInfo:
    file = gr.File(
        label="Drop a PNG made here (or by A1111) to restore its settings", file_types=[".png"], elem_id="png-file"
    )
    return PngInfo(file, gr.Markdown("", elem_id="png-text"))


def wire_png_info(form: Form, png: PngInfo, preset_for) -> None:
    def on_png(file):
        if file is None:
            return {png.text: ""}
        try:
            settings = h.settings_from_png(file if isinstance(file, str) else file.name)
        except StudioError as exc:
            return {png.text: f"**Error:** {exc}"}
        restored = "Restored into the Generate tab: " + ", ".join(f"{k} = {v!r}" for k, v in settings.items())
        return form.fill(settings, preset_for) | {png.text: restored}

    png.file.upload(on_png, inputs=png.file, outputs=[*form.outputs(), png.text], api_visibility="private")
