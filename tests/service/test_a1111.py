"""The AUTOMATIC1111 API, driven by the real `webuiapi` client against a real server: txt2img with its defaults,
seeds and batches that reproduce, what is refused and why, models, options, progress, interrupt and png-info."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import webuiapi

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from tests.service.conftest import running_server

SMALL = dict(width=256, height=256, steps=3)


@pytest.fixture(scope="module")
def served(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("a1111"), engine, per_client_jobs=4) as pair:
        http, queue = pair
        yield webuiapi.WebUIApi(host="127.0.0.1", port=http.base_url.port), http, queue


def test_txt2img_batches_seeds_and_reproduces_alone(served):
    api, http, queue = served
    result = api.txt2img(prompt="a red circle", seed=11, batch_size=2, **SMALL)  # with all of webuiapi's defaults
    assert len(result.images) == 2 and result.images[0].size == (256, 256)
    info = result.info
    assert info["all_seeds"] == [11, 12] and info["steps"] == 3 and info["cfg_scale"] == 7.0
    assert "sampler_name" in info["ignored"] and "Seed: 11" in info["infotexts"][0]
    again = api.txt2img(prompt="a red circle", seed=12, **SMALL)  # image 2 of the batch, alone
    alone, in_batch = (np.asarray(im, dtype=int) for im in (again.images[0], result.images[1]))
    assert np.abs(alone - in_batch).max() <= 1  # batched maths round differently: within 1/255, as everywhere
    assert http.get("/v1/history").json()["total"] >= 2  # the same history as every other front end

    random = api.txt2img(prompt="a red circle", seed=-1, **SMALL)
    assert random.info["seed"] >= 0

    told = http.post("/sdapi/v1/png-info", json={"image": result.json["images"][0]}).json()
    assert "Seed: 11" in told["info"] and told["parameters"]["seed"] == 11


def test_what_cannot_be_done_is_refused_naming_the_field(served):
    api, http, _ = served
    for fields, words in [
        (dict(enable_hr=True), "enable_hr: high-resolution fix"),
        (dict(restore_faces=True), "restore_faces: face restoration"),
        (dict(width=500), "width: must be a multiple of 128"),
        (dict(steps=0), "steps: must be a whole number from 1"),
        (dict(batch_size=4, n_iter=3), "batch_size x n_iter must be from 1 to 8 images (got 4 x 3)"),
    ]:
        with pytest.raises(RuntimeError) as caught:
            api.txt2img(prompt="a red circle", **(SMALL | fields))
        status, text = caught.value.args
        assert status == 422 and words in text, (fields, text)
    refused = http.post("/sdapi/v1/img2img", json={"init_images": []})
    assert refused.status_code == 422 and refused.json()["detail"][0].startswith("init_images: must be a list of one")


def test_models_options_samplers_loras(served):
    api, _, queue = served
    name = queue.engine.identity.name
    models = api.get_sd_models()
    assert models[0]["title"] == api.get_options()["sd_model_checkpoint"] and models[0]["model_name"] == name
    assert "demo" in [m["title"] for m in models]  # what it could switch to
    assert api.set_options({"sd_model_checkpoint": models[0]["title"]}) == {}  # already loaded: nothing to do
    refused = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "no-such-model"})
    assert refused.status_code == 422 and "sd_model_checkpoint: must be one of" in refused.text
    assert [s["name"] for s in api.get_samplers()] == ["DDPMWuerstchen"]
    assert api.get_loras() == []


def test_progress_and_interrupt_stop_a_running_job(served):
    api, _, _ = served
    outcome: dict = {}

    def long_run():
        try:
            api.txt2img(prompt="a blue square", seed=3, batch_size=8, width=512, height=512, steps=100)
        except RuntimeError as exc:
            outcome["error"] = exc.args

    thread = threading.Thread(target=long_run)
    thread.start()
    deadline = time.time() + 60
    while (progress := api.get_progress())["state"]["sampling_step"] < 1:
        assert time.time() < deadline, progress
        time.sleep(0.1)
    assert 0 < progress["progress"] < 1 and progress["state"]["job"]
    api.interrupt()
    thread.join(60)
    assert outcome["error"][0] == 409 and "cancelled" in outcome["error"][1]
    assert api.get_progress()["textinfo"] == "idle"


def test_setting_the_checkpoint_switches_the_model_as_a1111_does(tmp_path, tiny_model_dir):
    engine = CascadeEngine.from_settings(Settings(model=str(tiny_model_dir), device="cpu"))  # this test's own:
    with running_server(tmp_path, engine, model=str(tiny_model_dir)) as (http, queue):  # a switch releases it
        api = webuiapi.WebUIApi(host="127.0.0.1", port=http.base_url.port)
        assert api.set_options({"sd_model_checkpoint": "demo"}) == {}  # answers once the model is loaded
        assert api.get_options()["sd_model_checkpoint"] == "demo" and queue.engine.identity.preset == "demo"
        result = api.txt2img(prompt="a red circle on a white background", seed=1, steps=10)
        assert result.images[0].size == (512, 512) and result.info["sd_model_name"] == "cascade-studio-demo"
