"""The studio's handlers with the tiny model: sizes, tokens, requests, A/B differences, PNG info, sweeps."""

from __future__ import annotations

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


FORM = dict(
    prompt="a red circle",
    negative="",
    size="Custom",
    width=256,
    height=256,
    seed=5,
    randomize=False,
    prior_steps=3,
    prior_guidance=4.0,
    decoder_steps=2,
    decoder_guidance=0.0,
    num_images=2,
)


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


def test_token_counter_names_the_cut_words(studio):
    assert h.token_info(studio, "a red circle") == "3 / 75 tokens"
    text = h.token_info(studio, " ".join(["red"] * 76 + ["square"]))
    assert text.startswith("**77 / 75 tokens**") and "*red square*" in text


def test_build_request_from_the_form(studio):
    req = h.build_request(studio, *FORM.values())
    assert (req.width, req.height, req.seed, req.num_images) == (256, 256, 5, 2)
    assert h.build_request(studio, *(FORM | {"randomize": True}).values()).seed is None
    with pytest.raises(StudioError, match=r"num_images: must be a whole number from 1 to 8 \(got 2.5\)"):
        h.build_request(studio, *(FORM | {"num_images": 2.5}).values())
    with pytest.raises(StudioError, match="prior_guidance: must be a finite number from 0 to 20"):
        h.build_request(studio, *(FORM | {"prior_guidance": 25.0}).values())


def test_status_details_and_reuse(studio):
    first = run(studio, seed=7, num_images=2)
    assert h.status_text(studio, first).startswith("**Done** in ") and "seeds 7, 8" in h.status_text(studio, first)
    tuned = run(studio, seed=7, num_images=2, decoder_steps=4)
    assert "prior: cached" in h.status_text(studio, tuned)
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
    assert sheet.size == (120 + 2 * 256, 28 + 3 * 256)
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
