"""The studio's page: Gradio Blocks wired to the handlers. Started by `cascade-studio serve` (or plain
`cascade-studio`)."""

import functools
import inspect
from pathlib import Path

import gradio as gr
from PIL import Image

from ..engine.request import MAX_SEED, MAX_SIZE, MIN_SIZE, SIZE_STEP
from ..service.guard import IMAGE_BODY
from . import handlers as h
from .handlers import Studio, StudioError

CSS = """
#status {min-height: 2.5em}
#model-banner {font-size: 0.95em}
"""


def _client(request: gr.Request | None) -> str:
    """Who the per-client job cap counts: the same identity as the API's (the address, with the user logged in),
    so one person has one share of the queue whichever way they come in."""
    if request is None or request.client is None:
        return "studio"
    user = getattr(request, "username", None)
    return f"{user}@{request.client.host}" if user else request.client.host


def _errors(fn):
    """StudioError -> a Gradio error toast; the server keeps serving. Keeps generators generators, and keeps the
    signature visible (Gradio injects gr.Request and gr.SelectData by looking at it)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except StudioError as exc:
                raise gr.Error(str(exc)) from None

        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as exc:
            raise gr.Error(str(exc)) from None

    return call


def _columns(n: int) -> int:
    """Gallery columns for n images: 1-2 large side by side, 3-8 in at most two rows; all in view at once."""
    return 2 if n <= 2 else 4


def build_app(studio: Studio) -> gr.Blocks:
    store, queue = studio.store, studio.queue
    sizes = studio.size_choices()
    d = studio.engine.request(prompt="")

    def preset_for(width: int, height: int) -> str:
        """The size choice showing width × height, or Custom."""
        return next((c for c in sizes if c.startswith(f"{width}×{height} ")), h.CUSTOM)

    default_size = preset_for(d.width, d.height)
    has_preview = studio.engine.pipelines.previewer is not None

    with gr.Blocks(title="cascade-studio") as demo:
        gr.Markdown("## cascade-studio · Stable Cascade text-to-image")
        gr.Markdown(studio.model_banner(), elem_id="model-banner")
        job_state = gr.State(None)  # id of this tab's running job, for Cancel
        last_key = gr.State(None)  # "job:index" of this tab's latest first image, for A/B
        selected = gr.State(None)  # "job:index" of the image selected in the gallery or history

        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    elem_id="prompt",
                    placeholder="a red circle on a white background  (Enter to generate)",
                )
                tokens = gr.Markdown(h.token_info(studio, ""), elem_id="tokens")
                negative = gr.Textbox(label="Negative prompt", value="", lines=1, elem_id="negative")
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Row():
                    # Empty until a run fills in the seed it used; empty in an API call means a random seed.
                    seed = gr.Number(label="Seed", value=None, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                    randomize = gr.Checkbox(label="Random seed", value=True, elem_id="randomize")
                reuse = gr.Button("Reuse the selected image's seed", size="sm", elem_id="reuse-seed")
                size = gr.Dropdown(sizes, value=default_size, label="Size (width × height)", elem_id="size")
                with gr.Row(visible=default_size == h.CUSTOM) as custom_row:
                    width = gr.Number(label="Width", value=d.width, step=128, elem_id="width")
                    height = gr.Number(label="Height", value=d.height, step=128, elem_id="height")
                size_note = gr.Markdown("")
                num_images = gr.Slider(
                    1, 8, value=1, step=1, label="Images (image i uses seed + i)", elem_id="num-images"
                )
                prior_steps = gr.Slider(1, 100, value=d.prior_steps, step=1, label="Prior steps", elem_id="prior-steps")
                prior_guidance = gr.Slider(0, 20, value=d.prior_guidance, step=0.5, label="Prior guidance")
                decoder_steps = gr.Slider(
                    1, 100, value=d.decoder_steps, step=1, label="Decoder steps", elem_id="decoder-steps"
                )
                decoder_guidance = gr.Slider(0, 20, value=d.decoder_guidance, step=0.5, label="Decoder guidance")
            with gr.Column(scale=3):
                status = gr.Markdown("Ready.", elem_id="status")
                preview = gr.Image(
                    label="Live preview of the prior",
                    type="pil",
                    height=180,
                    interactive=False,
                    visible=has_preview,
                    elem_id="preview",
                )
                # Whole images: a lone image once filled the width and was cropped to the box's height.
                gallery = gr.Gallery(
                    label="Images", columns=4, height=400, object_fit="contain", fit_columns=False, elem_id="gallery"
                )
                details = gr.Markdown("Select an image to see its settings.", elem_id="details")
                use = gr.Button("Use these settings", size="sm", elem_id="use-settings")

        with gr.Tabs():
            with gr.Tab("Compare A/B", elem_id="tab-compare"):
                gr.Markdown("Drag the handle to compare. By default A is your previous image and B the latest.")
                with gr.Row():
                    pick_a = gr.Dropdown(label="A", choices=[], elem_id="pick-a")
                    pick_b = gr.Dropdown(label="B", choices=[], elem_id="pick-b")
                slider = gr.ImageSlider(label="A | B", type="filepath", elem_id="ab-slider")
                changes = gr.Markdown("", elem_id="ab-changes")
            with gr.Tab("Sweep", elem_id="tab-sweep"):
                gr.Markdown("One image per cell, from the settings above; a fixed seed unless seed is an axis.")
                with gr.Row():
                    x_field = gr.Dropdown(list(h.SWEEP_FIELDS), value="prior_guidance", label="X axis")
                    x_values = gr.Textbox(value="2, 4, 6", label="X values")
                with gr.Row():
                    y_field = gr.Dropdown(["none", *h.SWEEP_FIELDS], value="none", label="Y axis")
                    y_values = gr.Textbox(value="", label="Y values")
                sweep_run = gr.Button("Run sweep", elem_id="sweep")
                sweep_status = gr.Markdown("")
                sweep_image = gr.Image(label="Grid", type="filepath", interactive=False)
            with gr.Tab("PNG info", elem_id="tab-png"):
                png = gr.File(label="Drop a PNG made here (or by A1111) to restore its settings", file_types=[".png"])
                png_text = gr.Markdown("")
            with gr.Tab("History", elem_id="tab-history"):
                history = gr.Gallery(
                    label="Past generations (newest first)",
                    columns=8,
                    height=360,
                    object_fit="contain",
                    fit_columns=False,
                    elem_id="history",
                )
                refresh = gr.Button("Refresh", size="sm")

        form = [
            prompt,
            negative,
            size,
            width,
            height,
            seed,
            randomize,
            prior_steps,
            prior_guidance,
            decoder_steps,
            decoder_guidance,
            num_images,
        ]

        def history_items():
            items, keys = [], []
            for job in store.list_jobs(limit=48):
                for im in job.images:
                    items.append((str(store.image_file(im)), f"seed {im.seed} · {job.request.prompt[:30]}"))
                    keys.append(f"{job.id}:{im.index}")
            return items, keys

        def history_view():
            items, keys = history_items()
            choices = h.history_choices(store)
            return items, gr.update(choices=choices), gr.update(choices=choices), keys

        history_keys = gr.State([])

        # gr.Request comes first: Gradio injects it only into positional parameters, never after *values.
        @_errors
        def on_generate(request: gr.Request, *values):
            *fields, previous = values
            req = h.build_request(studio, *fields)
            job = h.submit(studio, req, _client(request))
            yield {
                status: h.status_text(studio, job),
                job_state: job.id,
                seed: job.request.seed,
                gallery: [],
                preview: None,
            }
            for j in job.watch():
                yield {status: h.status_text(studio, j), preview: h.preview_image(j.preview)}
            if job.status != "done":
                yield {status: h.status_text(studio, job), job_state: None}
                return
            record = store.get_job(job.id)
            key = f"{job.id}:0"
            items, keys = history_items()
            choices = h.history_choices(store)
            # The last update carries the status too: without it the page sometimes stayed on "Decoder step 3/3"
            # although the stream had yielded "Done" just before (2 browser-test runs in 5, and once in CI).
            images = h.gallery_items(store, record.images)
            out = {
                status: h.status_text(studio, job),
                last_key: key,
                gallery: gr.update(value=images, columns=_columns(len(images))),
                history: items,
                history_keys: keys,
                job_state: None,
                details: h.image_details(record, 0),
                selected: key,
                pick_a: gr.update(choices=choices, value=previous),
                pick_b: gr.update(choices=choices, value=key),
            }
            if previous:  # A/B: this tab's previous image against the new one
                out[slider], out[changes] = h.compare(store, previous, key)
            yield out

        gr.on(
            [prompt.submit, run.click],
            on_generate,
            inputs=[*form, last_key],
            outputs=[
                status,
                job_state,
                seed,
                gallery,
                preview,
                last_key,
                history,
                history_keys,
                details,
                selected,
                slider,
                changes,
                pick_a,
                pick_b,
            ],
            concurrency_limit=queue.max_queued + 1,
            concurrency_id="generate",
            api_visibility="private",
        )

        def on_cancel(job_id):
            # No outputs: the running generate stream owns the status line and shows "Cancelled." itself.
            if job_id:
                queue.cancel(job_id)

        stop.click(on_cancel, inputs=job_state, queue=False, api_visibility="private")

        prompt.change(
            lambda p: h.token_info(studio, p),
            inputs=prompt,
            outputs=tokens,
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )

        def on_size(choice, w, hgt):
            _, _, note = h.resolve_size(choice, w, hgt)
            return gr.update(visible=choice == h.CUSTOM), note

        for trigger in (size.change, width.blur, height.blur):
            trigger(
                on_size,
                inputs=[size, width, height],
                outputs=[custom_row, size_note],
                queue=False,
                api_visibility="private",
            )

        def on_select(key_base, keys, evt: gr.SelectData):
            if keys is not None:  # history gallery
                key = keys[evt.index] if evt.index < len(keys) else None
            else:
                key = f"{key_base.rsplit(':', 1)[0]}:{evt.index}" if key_base else None
            if key is None:
                return gr.update(), None
            record, index = h.lookup(store, key)
            return h.image_details(record, index), key

        def on_gallery_select(key_base, evt: gr.SelectData):
            return on_select(key_base, None, evt)

        def on_history_select(keys, evt: gr.SelectData):
            return on_select(None, keys, evt)

        gallery.select(
            _errors(on_gallery_select), inputs=last_key, outputs=[details, selected], api_visibility="private"
        )
        history.select(
            _errors(on_history_select), inputs=history_keys, outputs=[details, selected], api_visibility="private"
        )

        @_errors
        def on_use(key):
            if not key:
                raise StudioError("select an image first")
            return _fill(h.settings_of(*h.lookup(store, key)))

        def _fill(f: dict):
            return [
                f.get("prompt", ""),
                f.get("negative_prompt", ""),
                preset_for(f["width"], f["height"]),
                f["width"],
                f["height"],
                f.get("seed"),
                f.get("seed") is None,
                f.get("prior_steps", d.prior_steps),
                f.get("prior_guidance", d.prior_guidance),
                f.get("decoder_steps", d.decoder_steps),
                f.get("decoder_guidance", d.decoder_guidance),
                f.get("num_images", 1),
            ]

        use.click(on_use, inputs=selected, outputs=form, api_visibility="private")

        @_errors
        def on_reuse(key):
            if not key:
                raise StudioError("select an image first")
            record, index = h.lookup(store, key)
            return record.images[index].seed, False

        reuse.click(on_reuse, inputs=selected, outputs=[seed, randomize], api_visibility="private")

        @_errors
        def on_compare(a, b):
            if not a or not b:
                return gr.update(), ""
            return h.compare(store, a, b)

        for picker in (pick_a, pick_b):
            picker.input(on_compare, inputs=[pick_a, pick_b], outputs=[slider, changes], api_visibility="private")

        @_errors
        def on_png(file):
            if file is None:
                return [gr.update()] * len(form) + [""]
            fields = h.settings_from_png(file if isinstance(file, str) else file.name)
            filled = _fill({"width": d.width, "height": d.height} | fields)
            return filled + ["Restored: " + ", ".join(f"{k} = {v!r}" for k, v in fields.items())]

        png.upload(on_png, inputs=png, outputs=[*form, png_text], api_visibility="private")

        @_errors
        def on_sweep(request: gr.Request, *values):
            *fields, xf, xv, yf, yv = values
            base = h.build_request(studio, *fields)
            y = None if yf == "none" else yf
            xs, ys, cells = h.sweep_requests(base, xf, xv, y, yv)
            images = []
            for n, (_, _, req) in enumerate(cells, 1):
                job = h.submit(studio, req, _client(request))
                for j in job.watch():
                    yield {sweep_status: f"Cell {n}/{len(cells)}: {h.status_text(studio, j)}"}
                if job.status != "done":
                    yield {sweep_status: f"Sweep stopped at cell {n}: {h.status_text(studio, job)}"}
                    return
                record = store.get_job(job.id)
                with Image.open(store.image_file(record.images[0])) as im:
                    images.append(im.convert("RGB"))
            path = h.save_sweep(store, h.sweep_grid(images, xs, ys, xf, y), cells[0][2], xf, xs, y, ys)
            yield {sweep_status: f"Saved {path}", sweep_image: str(path)}

        sweep_run.click(
            on_sweep,
            inputs=[*form, x_field, x_values, y_field, y_values],
            outputs=[sweep_status, sweep_image],
            concurrency_limit=queue.max_queued + 1,
            concurrency_id="generate",
            api_visibility="private",
        )

        refresh.click(history_view, outputs=[history, pick_a, pick_b, history_keys], api_visibility="private")
        demo.load(history_view, outputs=[history, pick_a, pick_b, history_keys], api_visibility="private")

        # A clean named endpoint for programs (gradio_client): images plus their seeds.
        api_images = gr.Gallery(visible=False)
        api_seeds = gr.JSON(visible=False)
        api_button = gr.Button(visible=False)

        @_errors
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
            req = h.build_request(
                studio,
                prompt,
                negative_prompt,
                h.CUSTOM,
                width,
                height,
                seed,
                seed is None,
                prior_steps,
                prior_guidance,
                decoder_steps,
                decoder_guidance,
                num_images,
            )
            if (req.width, req.height) != (width, height):
                raise StudioError(
                    f"width/height: must be multiples of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE} "
                    f"(got {width:g}×{height:g})"
                )
            job = h.submit(studio, req, _client(request))
            for _ in job.watch():
                pass
            if job.status != "done":
                raise StudioError(h.status_text(studio, job))
            record = store.get_job(job.id)
            return h.gallery_items(store, record.images), {"seeds": record.request.image_seeds, "job": job.id}

        api_button.click(
            generate,
            inputs=[
                prompt,
                negative,
                width,
                height,
                seed,
                prior_steps,
                prior_guidance,
                decoder_steps,
                decoder_guidance,
                num_images,
            ],
            outputs=[api_images, api_seeds],
            api_name="generate",
            concurrency_limit=queue.max_queued + 1,
            concurrency_id="generate",
        )
    return demo


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
        css=CSS,
        show_error=True,
        allowed_paths=[str(Path(studio.store.output_dir).resolve())],
        blocked_paths=blocked,
        max_file_size=IMAGE_BODY,
    )
