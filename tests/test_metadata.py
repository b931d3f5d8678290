"""PNG metadata: A1111-readable parameters, a complete JSON chunk, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cascade_studio.engine import make_request
from cascade_studio.metadata import ImageMetadata, parameters_text, parse_parameters, read_png, save_png
from cascade_studio.models import ModelIdentity

MODEL = ModelIdentity(
    name="stable-cascade-full",
    preset="full",
    prior_repo="stabilityai/stable-cascade-prior",
    decoder_repo="stabilityai/stable-cascade",
    variant="bf16",
    revisions={"r": "abc"},
)


def meta(**fields) -> ImageMetadata:
    request = make_request(**({"prompt": "a cat", "seed": 123, "num_images": 2} | fields))
    return ImageMetadata(request, 1, MODEL)


def test_parameters_follow_a1111_layout():
    text = parameters_text(meta(negative_prompt="blurry"))
    assert text.split("\n") == [
        "a cat",
        "Negative prompt: blurry",
        "Steps: 20, Sampler: DDPMWuerstchen, CFG scale: 4.0, Seed: 124, Size: 1024x1024, Model: stable-cascade-full, "
        "Decoder steps: 10, Decoder CFG scale: 0.0, Version: cascade-studio 0.1.0",
    ]
    assert "Negative prompt" not in parameters_text(meta())  # omitted when empty


def test_values_with_commas_or_colons_are_quoted_like_a1111():
    model = MODEL.model_copy(update={"name": "my model, v2: final"})
    text = parameters_text(ImageMetadata(make_request(prompt="x", seed=1), 0, model))
    assert 'Model: "my model, v2: final",' in text
    assert parse_parameters(text)["seed"] == 1


def test_parse_an_a1111_text_from_another_tool():
    text = (
        'masterpiece, a castle\non a hill\nNegative prompt: lowres, "bad"\nSteps: 30, Sampler: Euler a, '
        'CFG scale: 7, Seed: 99, Size: 832x1216, Model hash: abc, Lora hashes: "a: 1, b: 2", Version: v1.9'
    )
    fields = parse_parameters(text)
    assert fields == {
        "prompt": "masterpiece, a castle\non a hill",
        "negative_prompt": 'lowres, "bad"',
        "prior_steps": 30,
        "prior_guidance": 7.0,
        "seed": 99,
        "width": 832,
        "height": 1216,
    }


def test_round_trip_through_a_png(tmp_path):
    original = meta(negative_prompt="dark, grainy", prior_guidance=6.5, decoder_steps=12, width=1152, height=896)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    path = save_png(image, tmp_path / "a.png", original)
    back = read_png(path)
    assert back == original and back.seed == 124
    assert back.alone() == original.request.model_copy(update={"seed": 124, "num_images": 1})
    with Image.open(path) as img:
        assert np.array_equal(np.asarray(img), np.asarray(image))
        assert json.loads(img.text["cascade_studio"])["model"]["revisions"] == {"r": "abc"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_a_png_with_only_a1111_parameters_can_be_read(tmp_path):
    path = tmp_path / "other.png"
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("parameters", "a dog\nSteps: 25, CFG scale: 5, Seed: 7, Size: 512x768")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    m = read_png(path)
    assert (m.request.prompt, m.request.prior_steps, m.seed, m.request.width, m.model) == ("a dog", 25, 7, 512, None)


def test_png_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError, match="carries no generation parameters"):
        read_png(path)


def test_failed_write_leaves_nothing(tmp_path):
    class Broken:
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_png(Broken(), tmp_path / "x.png", meta())
    assert list(tmp_path.iterdir()) == []
