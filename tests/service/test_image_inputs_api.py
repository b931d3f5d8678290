"""Pictures over every API, on the demo model and a real server: /v1 takes base64, a history image's id or a stored
hash; the real `openai` client edits with OpenAI's transparent-means-repaint mask; the real `webuiapi` client runs
img2img with a mask. The kept pixels stay the input's, the PNG names its inputs by hash, bad pictures get a 4xx
naming the field."""

from __future__ import annotations

import base64
import io
import json
import warnings

import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from tests.service.conftest import running_server, wait_done

SCENE = {"prompt": "a red circle on a blue background", "seed": 3}


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_engine):
    with running_server(tmp_path_factory.mktemp("pictures"), demo_engine, per_client_jobs=20) as pair:
        yield pair


@pytest.fixture(scope="module")
def scene(served):
    """A finished text-to-image generation: its image id and its pixels."""
    http, _ = served
    done = wait_done(http, http.post("/v1/generations", json=SCENE).json()["id"])
    image = done["images"][0]
    return image["id"], Image.open(io.BytesIO(http.get(image["url"]).content)).convert("RGB")


def test_v1_takes_a_history_image_base64_or_a_stored_hash(served, scene):
    http, queue = served
    image_id, pixels = scene
    asked = {"prompt": "a green square on a yellow background", "seed": 5, "strength": 0.0}
    by_id = wait_done(http, http.post("/v1/generations", json=asked | {"init_image": image_id}).json()["id"])
    assert by_id["status"] == "done", by_id
    made = Image.open(io.BytesIO(http.get(by_id["images"][0]["url"]).content))
    stored = json.loads(made.text["cascade_studio"])["request"]
    assert made.text["parameters"].count("Denoising strength: 0") == 1 and len(stored["init_image"]) == 64
    assert queue.store.picture_file(stored["init_image"]).is_file()  # kept, content-addressed, for reproduce
    kept = np.abs(np.asarray(made.convert("RGB"), float) - np.asarray(pixels, float)).mean()
    assert kept < 4  # strength 0: the input back through Stage B and A

    by_b64 = http.post("/v1/generations", json=asked | {"init_image": b64png(pixels)}).json()
    by_hash = http.post("/v1/generations", json=asked | {"init_image": stored["init_image"]}).json()
    for job in (by_b64, by_hash):
        assert wait_done(http, job["id"])["status"] == "done"


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"init_image": "bm90IGEgcGljdHVyZQ=="}, "init_image: not a picture that can be read"),
        ({"init_image": "f" * 64}, "init_image: no stored picture has sha256"),
        ({"init_image": "f" * 32}, "init_image: no image ffffffff"),
        ({"mask": b64png(Image.new("L", (8, 8), 255))}, "mask: needs an init_image"),
        ({"image_prompts": [{"image": "f" * 32}]}, "image_prompts.0.image: no image"),
    ],
)
def test_bad_pictures_get_422_naming_the_field(served, fields, words):
    http, _ = served
    answer = http.post("/v1/generations", json={"prompt": "a red circle"} | fields)
    assert answer.status_code == 422 and any(words in m for m in answer.json()["detail"]), answer.text


def test_openai_edit_repaints_only_the_transparent_part(served, scene):
    http, _ = served
    _, pixels = scene
    client = openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key="x", max_retries=0, timeout=60)
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 128))  # transparent left half: repaint it
    as_png = {}
    for name, image in (("image", pixels), ("mask", mask)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        as_png[name] = (f"{name}.png", buffer.getvalue(), "image/png")
    edited = client.images.edit(
        image=as_png["image"],
        mask=as_png["mask"],
        prompt="a green square on a yellow background",
        size="128x128",
        response_format="b64_json",
        extra_body={"seed": 5},
    )
    made = np.asarray(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB"), int)
    source = np.asarray(pixels, int)
    assert np.abs(made[:, 64:] - source[:, 64:]).max() <= 2 and np.abs(made[:, :64] - source[:, :64]).mean() > 20
    # The openai package marks variations (DALL-E 2's endpoint) deprecated; the clients people run still call it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "deprecated", DeprecationWarning)
        varied = client.images.create_variation(image=as_png["image"], size="128x128", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(varied.data[0].b64_json))).size == (128, 128)


def test_webuiapi_img2img_with_a_mask(served, scene):
    http, _ = served
    _, pixels = scene
    api = webuiapi.WebUIApi(host="127.0.0.1", port=http.base_url.port)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (64, 0, 128, 128))  # white right half: repaint it
    result = api.img2img(
        images=[pixels],
        mask_image=mask,
        prompt="a green square on a yellow background",
        seed=8,
        width=128,
        height=128,
        steps=10,
        cfg_scale=2.0,
        denoising_strength=1.0,
    )
    made, source = np.asarray(result.image.convert("RGB"), int), np.asarray(pixels, int)
    assert np.abs(made[:, :64] - source[:, :64]).max() <= 2 and np.abs(made[:, 64:] - source[:, 64:]).mean() > 20
    assert "Denoising strength: 1" in result.info["infotexts"][0]
    assert "mask_blur" in result.info["ignored"]
