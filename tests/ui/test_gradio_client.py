"""Programs call the studio's named endpoint with gradio_client and get images plus seeds."""

from __future__ import annotations

from gradio_client import Client
from PIL import Image

from cascade_studio.train.analyze import analyze


def test_named_generate_endpoint(studio_url):
    client = Client(studio_url, verbose=False)
    gallery, info = client.predict(
        prompt="a blue square on a green background", negative_prompt="", width=256, height=256, seed=21,
        prior_steps=20, prior_guidance=4.0, decoder_steps=3, decoder_guidance=0.0, num_images=2,
        api_name="/generate",
    )
    assert info["seeds"] == [21, 22]
    assert len(gallery) == 2
    for item, seed in zip(gallery, info["seeds"]):
        assert item["caption"] == f"seed {seed}"
        image = Image.open(item["image"])
        assert image.size == (256, 256) and analyze(image).background == "green"  # the text steers the image
