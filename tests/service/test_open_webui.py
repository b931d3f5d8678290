"""The requests Open WebUI's image router sends for its OpenAI and Automatic1111 engines, field for field (from its
backend/open_webui/routers/images.py, as ../shared/notes/peers-and-clients.md records them), and what it reads back."""

from __future__ import annotations

import base64
import io

from PIL import Image

from tests.service.conftest import running_server


def test_open_webuis_openai_and_automatic1111_engines(tmp_path, engine):
    with running_server(tmp_path, engine, api_token="k3y") as (http, queue):
        auth = {"Authorization": "Bearer k3y"}
        # OpenAI engine: model, prompt, n, size (its default 512x512), response_format b64_json.
        body = {"model": "dall-e-2", "prompt": "a red circle", "n": 1, "size": "512x512", "response_format": "b64_json"}
        answer = http.post("/v1/images/generations", json=body, headers=auth, timeout=120)
        assert answer.status_code == 200, answer.text
        item = answer.json()["data"][0]
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
            assert image.size == (512, 512)
        # With the URL format it fetches data[i].url with the same Bearer header.
        url = http.post("/v1/images/generations", json=body | {"response_format": "url"}, headers=auth).json()
        assert http.get(url["data"][0]["url"], headers=auth).content[:4] == b"\x89PNG"

        # Automatic1111 engine: the model list, then txt2img with prompt, batch_size, width, height, steps, negative.
        models = http.get("/sdapi/v1/sd-models", headers=auth).json()
        assert models[0]["model_name"] == queue.engine.identity.name  # the loaded one first
        body = {"prompt": "a blue square", "batch_size": 1, "width": 256, "height": 256, "steps": 3,
                "negative_prompt": "red"}  # fmt: skip
        answer = http.post("/sdapi/v1/txt2img", json=body, headers=auth, timeout=120)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["images"]) == 1 and '"seed"' in answer.json()["info"]
        assert http.post("/sdapi/v1/txt2img", json=body).status_code == 401  # the key is needed here too
