"""LoRA training through the API, on the demo model: pictures uploaded as base64, the job in the generation queue with
progress events, its samples served, the LoRA listed and used by name; bad uploads named by field."""

from __future__ import annotations

import base64
import json
import time

from cascade_studio.train.concepts import write_concept
from tests.service.conftest import running_server, wait_done


def pictures(tmp_path, n=4) -> list[dict]:
    folder = write_concept("teal", tmp_path / "data", n=n)
    return [
        {"image": base64.b64encode(p.read_bytes()).decode(), "caption": p.with_suffix(".txt").read_text()}
        for p in sorted(folder.glob("*.png"))
    ]


def wait_task(http, url: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while True:
        body = http.get(url).json()
        if body["status"] in ("done", "failed", "cancelled"):
            return body
        assert time.time() < deadline, body
        time.sleep(0.2)


def test_train_a_lora_over_the_api_and_generate_with_it(tmp_path, demo_engine):
    with running_server(tmp_path, demo_engine) as (http, queue):
        assert http.get("/v1/loras").json()["data"] == []
        spec = {"name": "api-teal", "images": pictures(tmp_path), "steps": 4, "batch": 2, "rank": 2, "sample_every": 2}
        spec["preserve"] = 2
        created = http.post("/v1/trainings", json=spec)
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["kind"] == "lora-training" and job["spec"]["pictures"] == 4 and "images" not in job["spec"]
        with http.stream("GET", f"/v1/trainings/{job['id']}/events") as events:
            names = [line.removeprefix("event: ") for line in events.iter_lines() if line.startswith("event: ")]
        assert "progress" in names and names[-1] == "done"
        done = wait_task(http, f"/v1/trainings/{job['id']}")
        assert done["status"] == "done", done
        result = done["result"]
        assert result["lora"] == "api-teal" and len(result["sha256"]) == 12 and result["steps"] == 4
        plot = http.get(f"/v1/trainings/{job['id']}/files/{result['loss_plot']}")
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
        assert http.get(f"/v1/trainings/{job['id']}/files/..%2Fapi-teal.safetensors").status_code == 404

        listed = http.get("/v1/loras").json()["data"]
        assert [(e["name"], e["sha256"], e["adapts"], e["preferred_weight"]) for e in listed] == [
            ("api-teal", result["sha256"], "decoder, prior, text_encoder", None)
        ]
        sidecar = {"activation text": "teal, flat colour", "preferred weight": 0.6}  # A1111's, beside the file
        (queue.engine.lora_library.folder / "api-teal.json").write_text(json.dumps(sidecar))
        (entry,) = http.get("/v1/loras").json()["data"]
        assert (entry["trigger_words"], entry["preferred_weight"]) == ("teal, flat colour", 0.6)
        body = {"prompt": "a large teal circle in the centre on a white background", "seed": 3}
        generated = http.post("/v1/generations", json=body | {"loras": [{"name": "api-teal", "weight": 0.8}]}).json()
        final = wait_done(http, generated["id"])
        assert final["status"] == "done", final
        assert final["request"]["loras"] == [{"name": "api-teal", "weight": 0.8, "sha256": result["sha256"]}]
        assert not final["warnings"]  # "teal" is a word the LoRA was trained on
        tagged = http.post("/v1/generations", json=body | {"prompt": body["prompt"] + " <lora:api-teal:0.8>"}).json()
        assert tagged["request"]["loras"][0]["name"] == "api-teal"

        missing = http.post("/v1/generations", json=body | {"loras": [{"name": "nowhere"}]})
        assert missing.status_code == 422 and "loras.0.name: no LoRA named 'nowhere'" in missing.json()["detail"][0]


def test_bad_trainings_are_refused_by_field(tmp_path, demo_engine):
    with running_server(tmp_path, demo_engine) as (http, queue):

        def refused(spec) -> list[str]:
            response = http.post("/v1/trainings", json=spec)
            assert response.status_code == 422, response.text
            return response.json()["detail"]

        good = pictures(tmp_path, n=1)
        assert any(m.startswith("name:") for m in refused({"name": "../x", "images": good}))
        named = "a name of 1 to 120 letters, digits, '.', '-' or '_' (the LoRA file's stem)"
        assert refused({"images": good}) == [f"name: required ({named})"]  # as /v1/generations says it
        assert refused({"name": "x" * 500, "images": good}) == [f"name: must be {named} (got '{'x' * 36}...)"]
        assert any(m.startswith("rank:") and "256" in m for m in refused({"name": "x", "images": good, "rank": 999}))
        late = refused({"name": "x", "images": good, "decoder_min_t": 1})
        assert late == ["decoder_min_t: must be from 0 up to (not including) 1 (got 1)"]
        heavy = refused({"name": "x", "images": good, "preserve_weight": 101})
        assert heavy == ["preserve_weight: must be above 0 and at most 100 (got 101)"]
        untriggered = refused({"name": "x", "images": good, "trigger_embedding": True})
        assert untriggered == [
            "trigger_embedding: must be off without a trigger word, whose own tokens it learns (got True)"
        ]
        assert refused({"name": "x"}) == ["images: give at least one picture (or a folder on the server)"]
        no_caption = [{"image": good[0]["image"]}]
        assert refused({"name": "x", "images": no_caption}) == [
            "images.0.caption: required when no trigger word is given"
        ]
        junk = [{"image": base64.b64encode(b"not a picture").decode(), "caption": "x"}]
        assert refused({"name": "x", "images": junk})[0].startswith("images.0.image: not a picture that can be read")
        assert refused({"name": "x", "images": good, "colour": 1})[0].startswith("colour:")
        assert http.get("/v1/trainings/" + "0" * 32).status_code == 404


def test_a_cancelled_training_ends_cancelled_with_a_checkpoint(tmp_path, demo_engine):
    with running_server(tmp_path, demo_engine) as (http, queue):
        spec = {"name": "stopped", "images": pictures(tmp_path), "steps": 500, "batch": 2, "rank": 2, "preserve": 0}
        job = http.post("/v1/trainings", json=spec).json()
        deadline = time.time() + 120
        while (http.get(f"/v1/trainings/{job['id']}").json().get("progress") or {}).get("step", 0) < 2:
            assert time.time() < deadline
            time.sleep(0.2)
        assert http.delete(f"/v1/trainings/{job['id']}").status_code == 202
        ended = wait_task(http, f"/v1/trainings/{job['id']}")
        assert ended["status"] == "cancelled"
        workdir = tmp_path / "out" / "trainings"
        assert list(workdir.rglob("stopped-step*.resume.safetensors"))
        assert http.get("/v1/loras").json()["data"] == []  # nothing half-trained in the LoRA folder
