"""The studio's handlers with the tiny model: sizes, tokens, requests, A/B differences, PNG info, sweeps."""

from __future__ import annotations

import json

import pytest
from PIL import Image, PngImagePlugin

from cascade_studio.engine import make_request
from cascade_studio.service import JobQueue
from cascade_studio.store import HistoryStore
from cascade_studio.ui import handlers as h
from cascade_studio.ui.handlers import Studio, StudioError


@pytest.fixture
def studio(tmp_path, engine):
    store = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    queue = JobQueue(engine, store, max_queued=4, per_client=4)
    yield Studio(queue, store)
    queue.close()


def run(studio, **fields):
    job = studio.queue.submit(
        make_request(
            **({"prompt": "a red circle", "width": 256, "height": 256, "prior_steps": 3, "decoder_steps": 2} | fields)
        )
    )
    for _ in job.watch():
        pass
    return job


FORM = h.FormValues(
    prompt="a red circle",
    negative_prompt="",
    size="Custom",
    width=256,
    height=256,
    seed="5",
    random_seed=False,
    num_images=2,
    prior_steps=3,
    prior_guidance=4.0,
    decoder_steps=2,
    decoder_guidance=0.0,
)


def form(**changes) -> h.FormValues:
    return h.FormValues(**(FORM.as_dict() | changes))


def test_presets_are_multiples_of_128_and_custom_sizes_snap():
    for _, w, h_ in h.SIZE_PRESETS:
        assert w % 128 == 0 and h_ % 128 == 0
    assert h.resolve_size("1152×896 (9:7)", None, None) == (1152, 896, "")
    assert h.resolve_size("Custom", 1000, 720) == (
        1024,
        768,
        "Snapped to multiples of 128: width 1000 → 1024, height 720 → 768",
    )
    assert h.resolve_size("Custom", 5000, 20)[:2] == (2048, 128)
    assert h.resolve_size("Custom", 512, 640) == (512, 640, "")


def test_token_counter_names_whole_cut_words_and_unknown_words(studio):
    assert h.token_info(studio, "a red circle") == "<div class='cs-tokens'>3 / 75 tokens</div>"
    text = h.token_info(studio, " ".join(["red"] * 74 + ["blue", "square"]))
    assert "<b>76 / 75 tokens</b>" in text and "cut: <i>square</i>" in text
    long = h.token_info(studio, " ".join(["red"] * 75 + ["blue"] * 40))
    assert "cut: <i>blue blue" in long and long.count("blue") < 20  # a long cut is shortened, not printed whole


def test_demo_model_marks_words_it_does_not_know(tmp_path, studio):
    from cascade_studio.config import Settings
    from cascade_studio.engine import CascadeEngine

    store = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    demo = Studio(JobQueue(CascadeEngine.from_settings(Settings(model="demo", device="cpu")), store), store)
    try:
        text = h.token_info(demo, "a lighthouse at dusk, oil painting")
        assert "<mark>lighthouse</mark> <mark>dusk</mark> <mark>oil</mark> <mark>painting</mark>" in text
        assert "This model knows only its training words: it draws 1-3 circles" in text
        assert "<mark>" not in h.token_info(demo, "a red circle on a white background")
        assert "22 tokens" in text  # the demo's own window, not CLIP's 75
        first = h.token_info(demo, demo.first_prompt)  # what a first visit finds under the prompt it holds
        assert demo.first_prompt == "a red circle on a white background" and "<mark>" not in first
        assert "This model knows only its training words" in first and studio.first_prompt == ""  # a real model: none
    finally:
        demo.queue.close()


def test_build_request_from_the_form_refuses_what_it_cannot_run(studio):
    req = h.build_request(studio, FORM)
    assert (req.width, req.height, req.seed, req.num_images) == (256, 256, 5, 2)
    assert h.build_request(studio, form(random_seed=True)).seed is None
    assert h.build_request(studio, form(seed="")).seed is None  # an empty seed box means random
    with pytest.raises(StudioError, match=r"num_images: must be a whole number from 1 to 8 \(got 2.5\)"):
        h.build_request(studio, form(num_images=2.5))
    with pytest.raises(StudioError, match="prior_guidance: must be a finite number from 0 to 20"):
        h.build_request(studio, form(prior_guidance=25.0))
    with pytest.raises(StudioError) as err:  # every bad field at once, each with its range; nothing changed
        h.build_request(studio, form(prior_steps=0, decoder_guidance=-3, seed="abc", decoder_steps=None))
    message = str(err.value)
    assert "prior_steps: must be a whole number from 1 to 100 (got 0)" in message
    assert "decoder_guidance: must be a finite number from 0 to 20 (got -3.0)" in message
    assert "seed: must be a whole number from 0 to 4294967295, or none for a random seed (got 'abc')" in message
    assert "decoder_steps: must be a whole number from 1 to 100 (got nothing)" in message


def test_gallery_columns_keep_every_image_in_view():
    assert [h.gallery_columns(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 2, 2, 4, 4]


def test_status_details_and_reuse(studio):
    first = run(studio, seed=7, num_images=2)
    assert h.status_text(studio, first).startswith("**Done** in ") and "seeds 7, 8" in h.status_text(studio, first)
    tuned = run(studio, seed=7, num_images=2, decoder_steps=4)
    assert "prior: cached" in h.status_text(studio, tuned)
    long = run(studio, seed=7, prompt="a red circle " + "on a very plain white background " * 20)
    assert long.warnings and h.status_text(studio, long).endswith(f"  \n**Note:** {long.warnings[-1]}")
    record = studio.store.get_job(first.id)
    assert "**Seed:** 8 (image 2 of 2" in h.image_details(record, 1)
    assert h.settings_of(record, 1) == record.request.model_dump() | {"seed": 8, "num_images": 1}
    assert [caption for _, caption in h.gallery_items(studio.store, record.images)] == ["seed 7", "seed 8"]


def test_ab_comparison_lists_what_changed(studio):
    a, b = run(studio, seed=3), run(studio, seed=3, prior_guidance=6.0, decoder_steps=4)
    (path_a, path_b), text = h.compare(studio.store, f"{a.id}:0", f"{b.id}:0")
    assert text == "A → B: prior guidance 4 → 6, decoder steps 2 → 4, seed same"
    assert Image.open(path_a).size == Image.open(path_b).size == (256, 256)
    keys = [key for _, key in h.history_choices(studio.store)]
    assert keys[:2] == [f"{b.id}:0", f"{a.id}:0"]  # newest first
    with pytest.raises(StudioError, match="no longer in the history"):
        h.lookup(studio.store, "missing:0")


def test_png_info_restores_settings(studio, tmp_path):
    job = run(studio, seed=11, negative_prompt="blurry", num_images=2)
    path = studio.store.image_file(job.images[1])
    assert h.settings_from_png(str(path)) == job.request.model_dump() | {"seed": 12, "num_images": 1}
    other = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a dog\nNegative prompt: cat\nSteps: 25, CFG scale: 7, Seed: 3, Size: 832x1216")
    Image.new("RGB", (8, 8)).save(other, pnginfo=info)
    assert h.settings_from_png(str(other)) == {
        "prompt": "a dog",
        "negative_prompt": "cat",
        "prior_steps": 25,
        "prior_guidance": 7.0,
        "seed": 3,
        "width": 832,
        "height": 1216,
    }
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(StudioError, match="carries no generation parameters"):
        h.settings_from_png(str(plain))


def test_sweep_grid(studio):
    base = make_request(prompt="a red circle", width=256, height=256, prior_steps=2, decoder_steps=2, seed=4)
    xs, ys, cells = h.sweep_requests(base, "prior_guidance", "2, 6", "seed", "1, 2, 3")
    assert (xs, ys) == ([2.0, 6.0], [1, 2, 3]) and len(cells) == 6
    assert [(c[2].prior_guidance, c[2].seed) for c in cells[:3]] == [(2.0, 1), (6.0, 1), (2.0, 2)]
    images = []
    for *_, req in cells:
        job = studio.queue.submit(req)
        for _ in job.watch():
            pass
        images.append(Image.open(studio.store.image_file(job.images[0])).convert("RGB"))
    sheet = h.sweep_grid(images, xs, ys, "prior_guidance", "seed")
    import numpy as np

    # Cells stand apart by a white gap, with room for labels above: with solid cells the layout is plain to see.
    solid = [Image.new("RGB", (256, 256), (40 * k, 200, 0)) for k in range(6)]
    grid = np.asarray(h.sweep_grid(solid, xs, ys, "prior_guidance", "seed")).astype(int)
    reds = {(40 * k, 200, 0) for k in range(6)}
    cells = np.array([[tuple(px) in reds for px in row] for row in grid[:, :, :]])
    columns = [x for x in range(1, grid.shape[1]) if cells[:, x].any() and not cells[:, x - 1].any()]
    rows = [y for y in range(1, grid.shape[0]) if cells[y].any() and not cells[y - 1].any()]
    assert len(columns) == 2 and columns[1] - columns[0] == 256 + 8 and len(rows) == 3 and rows[1] - rows[0] == 264
    assert rows[0] >= 32  # a label row of at least 16-px text above the cells
    assert tuple(grid[rows[1], columns[1]]) == (120, 200, 0)  # row 2, column 2: the fourth cell
    small = h.sweep_grid([im.resize((128, 128)) for im in images], xs, ys, "prior_guidance", "seed")
    assert small.width > 2 * 256  # the demo's 128-px cells are enlarged so their labels fit
    path = h.save_sweep(studio.store, sheet, base, "prior_guidance", xs, "seed", ys)
    assert "Sweep: X: prior_guidance = 2.0, 6.0; Y: seed = 1, 2, 3" in Image.open(path).text["parameters"]
    with pytest.raises(StudioError, match="at most 16 cells"):
        h.sweep_requests(base, "seed", ",".join(map(str, range(17))), None, "")
    with pytest.raises(StudioError, match="write numbers separated by commas"):
        h.sweep_requests(base, "prior_steps", "a, b", None, "")
    with pytest.raises(StudioError, match="prior_steps=0"):
        h.sweep_requests(base, "prior_steps", "0, 5", None, "")


def test_queue_limits_are_readable_messages(tmp_path, engine):
    store = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    studio = Studio(JobQueue(engine, store, max_queued=5, per_client=1), store)
    first = h.submit(studio, make_request(prompt="x", width=256, height=256, prior_steps=30, decoder_steps=2), "me")
    with pytest.raises(StudioError, match=r"you already have 1 unfinished jobs \(at most 1\)"):
        h.submit(studio, make_request(prompt="x", width=256, height=256), "me")
    for _ in first.watch():
        pass
    studio.queue.close()


def test_small_previews_are_enlarged_for_the_page():
    small = Image.new("RGB", (48, 32), "red")
    big = h.preview_image(small)
    assert big.size == (192, 128) and big.getpixel((100, 60)) == (255, 0, 0)
    official = Image.new("RGB", (192, 192))
    assert h.preview_image(official) is official and h.preview_image(None) is None


def test_status_shows_a_progress_bar_queue_position_and_time_left(studio):
    blocker = studio.queue.submit(make_request(prompt="x", width=512, height=512, prior_steps=60, decoder_steps=2))
    next(j for j in blocker.watch(timeout=0.01) if j.status == "running")
    waiting = studio.queue.submit(
        make_request(prompt="y", width=256, height=256, prior_steps=2, decoder_steps=2), client="me"
    )
    queued = h.status_html(studio, waiting)
    assert "Queued:</b> 1st in line · 1 waiting, 1 running · you have 1 unfinished" in queued
    assert "<div class='cs-bar'><div style='width:0%'></div></div>" in queued
    for seen in blocker.watch(timeout=0.05):
        if seen.progress is not None and seen.progress.step >= 10:
            running = h.status_html(studio, seen)
            break
    assert "Prior</b> step" in running and " s left" in running
    width = int(running.split("width:")[1].split("%")[0])
    assert 0 < width < 100
    studio.queue.cancel(blocker.id)
    for _ in waiting.watch():
        pass
    assert "cs-bar" not in h.status_html(studio, waiting) and "cs-done" in h.status_html(studio, waiting)
    error = h.status_html(studio, message="**Error:** width: must be <a multiple>", error=True)
    assert "cs-error" in error and "&lt;a multiple&gt;" in error  # escaped


def test_history_pages_search_delete_and_zip(studio):
    import zipfile

    jobs = [run(studio, prompt=f"a {colour} circle", seed=i) for i, colour in enumerate(["red", "blue", "red"])]
    page = h.history_page(studio.store, "red")
    assert page.total_jobs == 2 and page.pages == 1 and len(page.items) == 2 and page.label.endswith("2 generations")
    assert page.keys == [f"{jobs[2].id}:0", f"{jobs[0].id}:0"]  # newest first
    assert h.history_page(studio.store, "RED").total_jobs == 2 and h.history_page(studio.store, "50%").total_jobs == 0
    assert h.history_page(studio.store, "", page=99).page == 1  # clamped to the pages there are
    path, count = h.export_history(studio.store)
    with zipfile.ZipFile(path) as archive:
        assert count == 3 and len(archive.namelist()) == 3 and all(n.endswith(".png") for n in archive.namelist())
    assert h.delete_generation(studio.store, f"{jobs[0].id}:0") == f"Deleted generation {jobs[0].id[:8]} (1 image)."
    assert h.history_page(studio.store, "red").total_jobs == 1
    assert not studio.store.image_file(jobs[0].images[0]).exists()
    with pytest.raises(StudioError, match="select an image in the history first"):
        h.delete_generation(studio.store, None)
    with pytest.raises(StudioError, match="no images to download matching 'green'"):
        h.export_history(studio.store, "green")


def test_many_generations_page_past_the_first_page(studio):
    for i in range(30):  # 30 jobs of one image: more than a page holds
        studio.store.create_job(f"{i:032x}", make_request(prompt=f"p{i}", seed=i), studio.engine.identity, "me")
        studio.store.set_status(f"{i:032x}", "done")
    first, second = h.history_page(studio.store, page=1), h.history_page(studio.store, page=2)
    assert first.pages == 2 and first.total_jobs == 30 and second.page == 2


# --- LoRAs and training ----------------------------------------------------------------------------------------------


@pytest.fixture
def demo_studio(tmp_path, demo_engine):
    """The demo model (a closed vocabulary, so unknown words are marked) with a LoRA folder holding one LoRA whose
    header names its trigger word."""
    from cascade_studio.models.lora import LoraLibrary
    from tests.models.test_lora import write

    saved = demo_engine.lora_library
    demo_engine.lora_library = LoraLibrary(tmp_path / "loras")
    demo_engine.lora_library.folder.mkdir()
    write(demo_engine, "style", metadata={"cascade_studio.trigger_words": "tealish"})
    store = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    queue = JobQueue(demo_engine, store, max_queued=4, per_client=4)
    yield Studio(queue, store)
    queue.close()
    demo_engine.remove_loras()
    demo_engine.lora_library = saved


def test_picked_loras_reach_the_request_and_the_image_details(demo_studio):
    studio = demo_studio
    assert studio.lora_names() == ["style"]
    picked = form(width=128, height=128, num_images=1, lora_1="style", lora_1_weight=0.5, lora_3=h.NO_LORA)
    request = h.build_request(studio, picked)
    assert [(lora.name, lora.weight) for lora in request.loras] == [("style", 0.5)]
    assert request.loras[0].sha256 and len(request.loras[0].sha256) == 12
    job = studio.queue.submit(request)
    for _ in job.watch():
        pass
    assert job.status == "done", job.error
    record = studio.store.get_job(job.id)
    assert f"**LoRAs:** style × 0.5 (sha256 {request.loras[0].sha256})" in h.image_details(record, 0)
    plain = h.build_request(studio, form(width=128, height=128))
    assert "LoRAs none → style × 0.5" in h.describe_changes(plain, 5, request, 5)

    with pytest.raises(StudioError, match=r"loras\.0\.weight: .*-4 to 4"):
        h.build_request(studio, picked.__class__(**(picked.as_dict() | {"lora_1_weight": 9})))
    with pytest.raises(StudioError, match=r"loras\.0\.weight"):
        h.build_request(studio, picked.__class__(**(picked.as_dict() | {"lora_1_weight": None})))
    with pytest.raises(StudioError, match=r"loras\.0\.name: no LoRA named 'gone'.*known: style"):
        h.build_request(studio, form(lora_1="gone"))


def test_trigger_words_are_shown_inserted_once_and_not_marked_unknown(demo_studio):
    studio = demo_studio
    assert studio.lora_words_text(["style", h.NO_LORA]) == "**style**: tealish"
    assert studio.with_trigger_words("a red circle", ["style"]) == "tealish, a red circle"
    assert studio.with_trigger_words("tealish, a red circle", ["style"]) == "tealish, a red circle"
    assert studio.with_trigger_words("", ["style"]) == "tealish"
    assert "<mark>tealish</mark>" in h.token_info(studio, "a tealish circle")
    assert "tealish" not in h.token_info(studio, "a tealish circle", ("style",))


def test_a_picked_lora_takes_the_weight_and_words_its_user_gave_it(demo_studio):
    """A1111's user metadata beside the file (its Lora card editor and Civitai Helper write it)."""
    studio = demo_studio
    sidecar = studio.engine.lora_library.find("style").with_suffix(".json")
    assert studio.lora_weight("style", 1.0) == 1.0  # no sidecar: the row keeps its weight
    sidecar.write_text(json.dumps({"activation text": "tealish, flat", "preferred weight": 0.7, "notes": "mine"}))
    assert studio.lora_weight("style", 1.0) == 0.7 and studio.lora_weight(h.NO_LORA, 0.4) == 0.4
    assert studio.lora_words_text(["style"]) == "**style**: tealish, flat"
    assert studio.with_trigger_words("a red circle", ["style"]) == "tealish, flat, a red circle"
    for odd in ({"preferred weight": 9}, {"preferred weight": 0}, {"preferred weight": "0.5"}, [0.5]):
        sidecar.write_text(json.dumps(odd))  # out of range, A1111's 'none', a string, not an object
        assert studio.lora_weight("style", 1.0) == 1.0 and studio.lora_words("style") == "tealish"
    sidecar.write_text("{not json")
    assert studio.lora_weight("style", 0.5) == 0.5 and studio.lora_words("style") == "tealish"


def test_the_train_tab_reads_captions_and_names_what_is_missing(tmp_path):
    from cascade_studio.ui.panels.train import caption_rows, training_spec

    for name in ("b.png", "a.png"):
        Image.new("RGB", (32, 32), "teal").save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a teal square\n")
    paths = [str(tmp_path / n) for n in ("b.png", "a.png", "a.txt")]
    rows = caption_rows(paths)
    assert rows == [["a.png", "a teal square"], ["b.png", ""]]

    with pytest.raises(StudioError, match="caption: b.png has no caption; write one or give a trigger word"):
        training_spec(paths, rows, name="mine")
    rows[1][1] = "a teal circle"  # edited in the table
    spec = training_spec(paths, rows, name="mine", steps=20.0, rank=4.0, trigger="")
    assert [p.caption for p in spec.images] == ["a teal square", "a teal circle"] and spec.steps == 20
    assert training_spec(paths, [], name="mine", trigger="sks").trigger == "sks"
    with pytest.raises(StudioError, match="pictures: add 1 to 200 pictures"):
        training_spec([str(tmp_path / "a.txt")], [], name="mine", trigger="sks")
    with pytest.raises(StudioError, match="name: .*letters, digits"):
        training_spec(paths, rows, name="my lora!")
    with pytest.raises(StudioError, match=r"steps: must be a whole number from 1 to 1000000 \(got 0\)"):
        training_spec(paths, rows, name="mine", steps=0)
    # The folded-away settings: whole numbers from Gradio's floats, 0 in alpha and the text encoder's rate (a Number
    # box is never empty) left to the defaults; 0 in the decoder's lowest t is a value of its own.
    more = dict(lr=1e-3, batch=4.0, alpha=0.0, seed=7.0, resolution=128.0, decoder=False, text_encoder=True)
    spec = training_spec(paths, rows, name="mine", text_encoder_lr=0.0, decoder_min_t=0.0, **more)
    assert (spec.lr, spec.batch, spec.seed, spec.resolution) == (1e-3, 4, 7, 128) and isinstance(spec.batch, int)
    assert spec.decoder_min_t == 0.0  # a real value here (Stage B learns at every step), not "the default"
    assert training_spec(paths, rows, name="mine", preserve_weight=3.0).preserve_weight == 3.0
    assert training_spec(paths, rows, name="mine", trigger="sks", trigger_embedding=True).trigger_embedding is True
    assert (spec.alpha, spec.decoder, spec.text_encoder, spec.text_encoder_lr) == (None, False, True, None)
    with pytest.raises(StudioError, match=r"decoder_min_t: must be from 0 up to \(not including\) 1 \(got 1.0\)"):
        training_spec(paths, rows, name="mine", decoder_min_t=1.0)
    with pytest.raises(StudioError, match=r"lr: must be above 0 and at most 0.1 \(got 0.5\)"):
        training_spec(paths, rows, name="mine", lr=0.5)
    with pytest.raises(StudioError, match=r"resolution: must be a multiple of 128 from 128 to 2048 \(got 100\)"):
        training_spec(paths, rows, name="mine", resolution=100.0)


def test_a_sweep_over_the_lora_weight(demo_studio):
    base = h.build_request(demo_studio, form(width=128, height=128, lora_1="style", lora_1_weight=0.8))
    xs, _, cells = h.sweep_requests(base, "lora_weight", "0, 0.5, 1", "seed", "3")
    assert xs == [0.0, 0.5, 1.0] and [c[2].loras[0].weight for c in cells] == xs
    assert all(c[2].loras[0].name == "style" and c[2].loras[0].sha256 == base.loras[0].sha256 for c in cells)
    with pytest.raises(StudioError, match="sweep value lora_weight=9"):
        h.sweep_requests(base, "lora_weight", "9", None, "")
    plain = h.build_request(demo_studio, form(width=128, height=128))
    with pytest.raises(StudioError, match="pick a LoRA first"):
        h.sweep_requests(plain, "lora_weight", "0, 1", None, "")


@pytest.fixture
def picture_studio(tmp_path, demo_engine):
    store = HistoryStore(tmp_path / "h.sqlite", tmp_path / "out")
    queue = JobQueue(demo_engine, store, max_queued=4, per_client=4)
    yield Studio(queue, store)
    queue.close()


def test_the_picture_panel_gives_the_picture_its_painted_mask_and_the_outpaint_border(picture_studio):
    picture = Image.new("RGB", (128, 128), (40, 80, 220))
    strokes = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    strokes.paste((255, 0, 255, 255), (10, 10, 40, 40))
    values = form(width=128, height=128, num_images=1, strength=0.6, fit="pad")
    request = h.build_request(picture_studio, values, {"background": picture, "layers": [strokes]})
    assert request.strength == 0.6 and request.fit == "pad"
    store = picture_studio.store
    with Image.open(store.picture_file(request.mask)) as mask:
        assert mask.getpixel((20, 20)) == 255 and mask.getpixel((80, 80)) == 0  # painted = repaint

    unpainted = h.build_request(picture_studio, values, {"background": picture, "layers": [None]})
    assert unpainted.init_image == request.init_image and unpainted.mask is None  # no paint: image-to-image

    grown = h.build_request(picture_studio, h.FormValues(**(values.as_dict() | {"grow": ["right"], "grow_by": 128})),
                            {"background": picture, "layers": []})  # fmt: skip
    assert (grown.width, grown.height) == (256, 128)
    with Image.open(store.picture_file(grown.mask)) as mask:
        assert mask.getpixel((200, 64)) == 255 and mask.getpixel((64, 64)) == 0
    assert h.build_request(picture_studio, values, None).init_image is None  # an empty editor: text alone

    with pytest.raises(StudioError, match="outpaint: grow by a whole number of pixels from 1 to 2048"):
        h.build_request(picture_studio, h.FormValues(**(values.as_dict() | {"grow": ["top"], "grow_by": 0})),
                        {"background": picture, "layers": []})  # fmt: skip
    prompted = h.build_request(picture_studio, values, None, [None, picture, None, None])  # a filled slot
    assert len(prompted.image_prompts) == 1 and store.picture_file(prompted.image_prompts[0].image).is_file()
    fields = h.image_prompt_fields(picture_studio, [None, picture], form(image_prompt_2_weight=0.4))
    assert len(fields["image_prompts"]) == 1 and fields["image_prompts"][0]["weight"] == 0.4


def test_use_these_settings_puts_the_picture_and_its_mask_back(picture_studio):
    from cascade_studio.ui.panels.picture import editor_value

    picture = Image.new("RGB", (128, 128), (40, 80, 220))
    strokes = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    strokes.paste((255, 0, 255, 255), (64, 0, 128, 128))
    values = form(width=128, height=128, num_images=1)
    first = h.build_request(picture_studio, values, {"background": picture, "layers": [strokes]})
    restored = editor_value(picture_studio.store, first.model_dump())
    again = h.build_request(picture_studio, values, restored)  # the same picture and mask, by hash
    assert (again.init_image, again.mask) == (first.init_image, first.mask)
    assert editor_value(picture_studio.store, {"prompt": "text only"}) is None  # text-to-image empties the panel
