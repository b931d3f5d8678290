"""Programs call the studio's named endpoint with gradio_client and get images plus seeds."""

from __future__ import annotations

from gradio_client import Client
from PIL import Image

from cascade_studio.store import HistoryStore
from cascade_studio.train.analyze import analyze


def generate(url: str, **fields):
    fields = (
        dict(
            prompt="a blue square on a green background",
            negative_prompt="",
            width=128,
            height=128,
            seed=21,
            prior_steps=20,
            prior_guidance=4.0,
            decoder_steps=3,
            decoder_guidance=0.0,
            num_images=2,
        )
        | fields
    )
    return Client(url, verbose=False).predict(**fields, api_name="/generate")


def test_named_generate_endpoint(studio_url):
    gallery, info = generate(studio_url)
    assert info["seeds"] == [21, 22]
    assert len(gallery) == 2
    for item, seed in zip(gallery, info["seeds"]):
        assert item["caption"] == f"seed {seed}"
        image = Image.open(item["image"])
        assert image.size == (128, 128) and analyze(image).background == "green"  # the text steers the image


def test_studio_jobs_are_recorded_under_the_callers_address(studio_url, studio_out):
    """The per-client cap counts a person, not a browser tab or a Gradio call: the studio records the same identity
    as the API does (the address; with --auth, the user at the address). One address once queued 11 jobs past a
    cap of 4 because each Gradio call counted as a new client."""
    jobs = [generate(studio_url, num_images=1)[1]["job"] for _ in range(2)]
    store = HistoryStore(studio_out / "history.sqlite", studio_out)
    assert [store.get_job(job).client for job in jobs] == ["127.0.0.1", "127.0.0.1"]
