"""The OpenAI Images API, driven by the official `openai` package against a real server: both response formats,
seeds that reproduce, the shared queue and history, and every error raised as the package's own exception class
with our message naming the field."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from cascade_studio.metadata import read_png
from tests.service.conftest import running_server, tiny

FAST = {"prior_steps": 3, "decoder_steps": 2}  # the tiny model's quick settings, as our extension fields


def client_for(http: httpx.Client, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{str(http.base_url).rstrip('/')}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("openai"), engine, per_client_jobs=1) as pair:
        yield pair


def test_generate_as_base64_and_as_url_with_seeds_that_reproduce(served, tmp_path):
    http, queue = served
    client = client_for(http)
    asked = dict(prompt="a red circle <lora:none:0>", n=2, size="256x256", extra_body={"seed": 5, **FAST})
    with pytest.raises(openai.BadRequestError, match="loras.0.name: no LoRA named 'none'"):
        client.images.generate(**asked, response_format="b64_json")
    asked["prompt"] = "a red circle"
    b64 = client.images.generate(**asked, response_format="b64_json")
    assert len(b64.data) == 2 and b64.created > 0 and b64.data[0].revised_prompt == "a red circle"
    first = base64.b64decode(b64.data[0].b64_json)
    with Image.open(io.BytesIO(first)) as image:
        assert image.size == (256, 256)
    path = tmp_path / "0.png"
    path.write_bytes(first)
    assert read_png(path).seed == 5 and read_png(path).request.prior_steps == 3  # its recipe, as everywhere

    by_url = client.images.generate(**asked)  # the default format: a URL on this server
    url = by_url.data[1].url
    assert url.startswith(str(http.base_url)) and url.endswith(".png")
    by_b64 = io.BytesIO(base64.b64decode(b64.data[1].b64_json))
    with Image.open(io.BytesIO(httpx.get(url).content)) as a, Image.open(by_b64) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # image 2 is seed 6 both times: the same pixels
    assert http.get("/v1/history", params={"limit": 5}).json()["total"] >= 2  # in the history like any other


def test_errors_come_as_the_packages_own_classes_naming_the_field(served):
    http, queue = served
    client = client_for(http)
    cases = [
        (dict(size="1000x1000"), "size: must be a multiple of 128 from 128 to 2048", "size"),
        (dict(size="big"), "size: must be 'WIDTHxHEIGHT'", "size"),
        (dict(n=9), "n: must be a whole number from 1 to 8", "n"),
        (dict(quality="ultra"), "quality: must be one of auto, standard, hd, low, medium, high", "quality"),
        (dict(model="midjourney"), "model: this server runs", "model"),
        (dict(extra_body={"prior_steps": 0}), "prior_steps: must be a whole number from 1", "prior_steps"),
        (dict(extra_body={"sampler": "euler"}), "sampler: not a field of this endpoint", "sampler"),
    ]
    for fields, words, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a red circle", **fields)
        assert words in caught.value.message, (fields, caught.value.message)
        assert caught.value.param == param and caught.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as caught:  # the tiny model has no image encoder
        client.images.edit(image=("a.png", b"\x89PNG", "image/png"), prompt="make it blue")
    assert caught.value.param == "image" and "not a picture that can be read" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught, pytest.deprecated_call():  # the package's own warning
        client.images.create_variation(image=("a.png", b"\x89PNG", "image/png"))
    assert "not a picture that can be read" in caught.value.message


def test_a_full_share_of_the_queue_is_a_rate_limit_error(served):
    http, queue = served
    long = http.post("/v1/generations", json=tiny(prior_steps=100, num_images=8, width=512, height=512)).json()
    try:
        with pytest.raises(openai.RateLimitError, match="unfinished"):
            client_for(http).images.generate(prompt="a red circle", size="256x256", extra_body=FAST)
    finally:
        http.delete(f"/v1/generations/{long['id']}")


def test_the_api_token_is_the_bearer_key(tmp_path, engine):
    with running_server(tmp_path, engine, api_token="s3cret") as (http, _):
        with pytest.raises(openai.AuthenticationError):
            client_for(http, key="wrong").images.generate(prompt="a red circle", size="256x256", extra_body=FAST)
        ok = client_for(http, key="s3cret").images.generate(
            prompt="a red circle", size="256x256", response_format="b64_json", extra_body=FAST
        )
        assert len(ok.data) == 1 and ok.data[0].b64_json
        models = client_for(http, key="s3cret").models.list()
        assert [m.id for m in models.data] and all(m.object == "model" for m in models.data)
