"""Switching the loaded model while the server runs: what is offered, the switch as a queued job with progress,
the old model's memory let go, a failed switch that leaves the previous model serving, and the lock."""

from __future__ import annotations

import shutil
import time

import pytest
from diffusers import StableCascadeUNet
from safetensors.torch import save_file

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.service.switch import available_models
from tests.models.fake_hub import to_original
from tests.service.conftest import running_server, tiny, wait_done


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    """A CASCADE_MODEL_DIR: two model folders, a Stage C file that fits them, and clutter that fits nothing."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_model_dir, root / "tiny")
    shutil.copytree(tiny_model_dir, root / "tiny-copy")
    prior = StableCascadeUNet.from_pretrained(tiny_model_dir / "prior")
    save_file(to_original(prior.state_dict()), str(root / "my_stage_c.safetensors"))
    (root / "notes.txt").write_text("not a model")
    (root / "empty").mkdir()
    return root


def test_what_is_offered(model_dir, hub_cache):
    ids = [c.id for c in available_models(Settings(model_dir=model_dir, cache_dir=hub_cache))]
    assert ids[:5] == ["demo", "full", "lite", "folder:tiny", "folder:tiny-copy"]
    assert "folder:tiny+my_stage_c" in ids and "folder:tiny-copy+my_stage_c" in ids  # fits their architecture
    assert "full+my_stage_c" not in ids and "folder:empty" not in ids  # the official Stage C is another shape
    assert [c.id for c in available_models(Settings(cache_dir=model_dir / "none"))] == ["demo"]


def wait_task(http, job_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while (body := http.get(f"/v1/model/switches/{job_id}").json())["status"] in ("queued", "running"):
        assert time.time() < deadline, body
        time.sleep(0.1)
    return body


def test_switch_through_the_api(tmp_path, model_dir, tiny_model_dir):
    engine = CascadeEngine.from_settings(Settings(model=str(tiny_model_dir), device="cpu"))  # this test's own
    with running_server(tmp_path, engine, model_dir=model_dir, model=str(tiny_model_dir)) as (http, queue):
        listed = http.get("/v1/models").json()
        assert listed["object"] == "list" and {"demo", "folder:tiny"} <= {m["id"] for m in listed["data"]}
        assert [m["id"] for m in listed["data"] if m["loaded"]] == ["folder:tiny"]
        # A switch waits in line behind a running generation, then runs.
        busy = http.post("/v1/generations", json=tiny(seed=1, prior_steps=30)).json()
        switch = http.post("/v1/model", json={"model": "demo"})
        assert switch.status_code == 202 and switch.json()["position"] >= 1, switch.text
        assert wait_done(http, busy["id"])["status"] == "done"  # the running job finished on the old model
        done = wait_task(http, switch.json()["id"])
        assert done["status"] == "done" and done["result"]["old_model_released"] is True, done
        assert done["result"]["memory_before"] > 0 and done["progress"]["stage"].startswith("loading")
        assert http.get("/v1/health").json()["model"] == "cascade-studio-demo"
        assert http.get("/v1/model").json()["loaded"]["id"] == "demo"
        made = wait_done(http, http.post("/v1/generations", json={"prompt": "a red circle", "seed": 2}).json()["id"])
        assert made["model"] == "cascade-studio-demo" and made["request"]["width"] == 128  # the demo's defaults

        refused = http.post("/v1/model", json={"model": "nope"})
        assert refused.status_code == 422 and "model: must be one of demo, " in refused.json()["detail"][0]
        assert http.post("/v1/model", json={"model": "demo"}).status_code == 409

        # A model that breaks between listing and loading: the switch fails, the previous model serves on.
        shutil.copytree(model_dir / "tiny", tmp_path / "models" / "broken", dirs_exist_ok=True)
        settings = queue.settings.model_copy(update={"model_dir": tmp_path / "models"})
        queue.settings = settings
        assert any(c.id == "folder:broken" for c in available_models(settings))
        (tmp_path / "models" / "broken" / "prior" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
        failed = wait_task(http, http.post("/v1/model", json={"model": "folder:broken"}).json()["id"])
        assert failed["status"] == "failed" and failed["error"], failed
        assert http.get("/v1/health").json()["model"] == "cascade-studio-demo"  # loaded again
        again = wait_done(http, http.post("/v1/generations", json={"prompt": "a red circle", "seed": 3}).json()["id"])
        assert again["status"] == "done"


def test_no_model_switch_locks_the_model(tmp_path, engine):
    with running_server(tmp_path, engine, model_switch=False) as (http, _):
        refused = http.post("/v1/model", json={"model": "demo"})
        assert refused.status_code == 403 and "--no-model-switch" in refused.json()["detail"][0]
        assert http.get("/v1/model").json()["switchable"] is False
