"""The /v1 API over a real socket: each endpoint, the event stream, cancellation, auth and bad input."""

from __future__ import annotations

import io
import json
import time

import pytest
from PIL import Image

from cascade_studio.service.client import APIError, CascadeClient
from tests.service.conftest import running_server, tiny, wait_done


@pytest.fixture(scope="module")
def api(tmp_path_factory, engine):
    with running_server(tmp_path_factory.mktemp("api"), engine, per_client_jobs=20) as served:
        yield served


def test_generation_lifecycle(api):
    http, _ = api
    created = http.post("/v1/generations", json=tiny(seed=40, num_images=2))
    assert created.status_code == 202
    job = created.json()
    assert job["status"] in ("queued", "running") and job["seeds"] == [40, 41] and len(job["id"]) == 32
    done = wait_done(http, job["id"])
    assert done["status"] == "done" and done["timings"]["total"] > 0 and done["model"] == "tiny"
    assert [im["seed"] for im in done["images"]] == [40, 41]
    png = http.get(done["images"][1]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (256, 256) and json.loads(image.text["cascade_studio"])["seed"] == 41
    history = http.get("/v1/history", params={"limit": 5}).json()
    assert history["items"][0]["id"] == job["id"] and history["total"] >= 1
    health = http.get("/v1/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and set(health["queue"]) == {"queued", "running"}
    assert http.get("/docs").status_code == 200 and "/v1/generations" in http.get("/openapi.json").text


def test_event_stream_order(api):
    http, _ = api
    job = http.post("/v1/generations", json=tiny(seed=1, prior_steps=4, decoder_steps=3)).json()
    with http.stream("GET", f"/v1/generations/{job['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        names, data = [], []
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line[7:])
            elif line.startswith("data: "):
                data.append(json.loads(line[6:]))
    assert names[-1] == "done" and data[-1]["status"] == "done" and len(data[-1]["images"]) == 1
    steps = [(d["stage"], d["step"]) for n, d in zip(names, data) if n == "progress"]
    assert steps == sorted(steps, key=lambda s: (s[0] != "prior", s[1]))  # prior steps, then decoder steps, in order
    assert steps[-1] == ("decoder", 3) and ("prior", 4) in steps
    assert all(n in ("queued", "progress") for n in names[:-1])
    # A finished job's stream sends its outcome at once.
    with http.stream("GET", f"/v1/generations/{job['id']}/events") as again:
        assert [line for line in again.iter_lines() if line.startswith("event: ")] == ["event: done"]


def test_cancel_queued_and_running(api):
    http, queue = api
    long = http.post("/v1/generations", json=tiny(seed=2, prior_steps=100, num_images=8, width=512, height=512)).json()
    waiting = http.post("/v1/generations", json=tiny(seed=3)).json()
    assert http.get(f"/v1/generations/{waiting['id']}").json()["status"] == "queued"
    assert http.get(f"/v1/generations/{waiting['id']}").json()["position"] >= 1
    assert http.delete(f"/v1/generations/{waiting['id']}").status_code == 202
    assert wait_done(http, waiting["id"])["status"] == "cancelled"
    deadline = time.time() + 60
    while http.get(f"/v1/generations/{long['id']}").json()["status"] != "running":
        assert time.time() < deadline, "the long job never started"
        time.sleep(0.02)
    assert http.delete(f"/v1/generations/{long['id']}").status_code == 202
    ended = wait_done(http, long["id"])
    assert ended["status"] == "cancelled" and ended["images"] == []
    again = http.delete(f"/v1/generations/{long['id']}")
    assert again.status_code == 409 and "already ended (cancelled)" in again.json()["detail"][0]


BAD = [
    # (what, method, path, body or raw text, status, words in the message)
    ("malformed JSON", "POST", "/v1/generations", "{", 400, "body: not valid JSON"),
    ("JSON array", "POST", "/v1/generations", [], 422, "body: must be a JSON object"),
    ("JSON null", "POST", "/v1/generations", None, 422, "body: must be a JSON object"),
    ("JSON string", "POST", "/v1/generations", "a cat", 422, "body: must be a JSON object"),
    ("no prompt", "POST", "/v1/generations", {}, 422, "prompt: required"),
    ("prompt number", "POST", "/v1/generations", {"prompt": 5}, 422, "prompt: must be text"),
    ("prompt list", "POST", "/v1/generations", {"prompt": ["a"]}, 422, "prompt: must be text"),
    ("prompt 2001 chars", "POST", "/v1/generations", {"prompt": "x" * 2001}, 422, "at most 2000 characters"),
    ("100 kB prompt", "POST", "/v1/generations", {"prompt": "x" * 100_000}, 422, "at most 2000 characters"),
    ("33 MB body", "POST", "/v1/generations", {"init_image": "A" * 33_600_000}, 413, "at most 33554432 bytes"),
    ("100 kB model", "POST", "/v1/model", {"model": "x" * 100_000}, 413, "request body: at most 65536 bytes"),
    (
        "negative prompt object",
        "POST",
        "/v1/generations",
        {"prompt": "a", "negative_prompt": {}},
        422,
        "negative_prompt: must be text",
    ),
    ("width 720", "POST", "/v1/generations", {"prompt": "a", "width": 720}, 422, "width: must be a multiple of 128"),
    ("width string", "POST", "/v1/generations", {"prompt": "a", "width": "1024"}, 422, "width: must be"),
    ("width float", "POST", "/v1/generations", {"prompt": "a", "width": 1024.5}, 422, "width: must be"),
    ("width negative", "POST", "/v1/generations", {"prompt": "a", "width": -128}, 422, "width: must be"),
    ("width huge", "POST", "/v1/generations", {"prompt": "a", "width": 10**30}, 422, "width: must be"),
    ("height zero", "POST", "/v1/generations", {"prompt": "a", "height": 0}, 422, "height: must be"),
    (
        "prior steps zero",
        "POST",
        "/v1/generations",
        {"prompt": "a", "prior_steps": 0},
        422,
        "prior_steps: must be a whole number from 1 to 100",
    ),
    ("prior steps huge", "POST", "/v1/generations", {"prompt": "a", "prior_steps": 10**9}, 422, "prior_steps: must be"),
    ("prior steps bool", "POST", "/v1/generations", {"prompt": "a", "prior_steps": True}, 422, "prior_steps: must be"),
    (
        "decoder steps negative",
        "POST",
        "/v1/generations",
        {"prompt": "a", "decoder_steps": -5},
        422,
        "decoder_steps: must be",
    ),
    (
        "guidance NaN",
        "POST",
        "/v1/generations",
        '{"prompt": "a", "prior_guidance": NaN}',
        422,
        "prior_guidance: must be a finite number",
    ),
    (
        "guidance Infinity",
        "POST",
        "/v1/generations",
        '{"prompt": "a", "prior_guidance": Infinity}',
        422,
        "prior_guidance: must be a finite number",
    ),
    (
        "guidance negative",
        "POST",
        "/v1/generations",
        {"prompt": "a", "decoder_guidance": -1},
        422,
        "decoder_guidance: must be",
    ),
    (
        "guidance word",
        "POST",
        "/v1/generations",
        {"prompt": "a", "decoder_guidance": "high"},
        422,
        "decoder_guidance: must be",
    ),
    (
        "zero images",
        "POST",
        "/v1/generations",
        {"prompt": "a", "num_images": 0},
        422,
        "num_images: must be a whole number from 1 to 8",
    ),
    ("nine images", "POST", "/v1/generations", {"prompt": "a", "num_images": 9}, 422, "num_images: must be"),
    (
        "seed negative",
        "POST",
        "/v1/generations",
        {"prompt": "a", "seed": -1},
        422,
        "seed: must be a whole number from 0 to 4294967295",
    ),
    ("seed too big", "POST", "/v1/generations", {"prompt": "a", "seed": 2**32}, 422, "seed: must be"),
    ("seed text", "POST", "/v1/generations", {"prompt": "a", "seed": "abc"}, 422, "seed: must be"),
    ("unknown field", "POST", "/v1/generations", {"prompt": "a", "sampler": "euler"}, 422, "sampler: unknown field"),
    ("traversal job id", "GET", "/v1/generations/..%2F..%2Fetc%2Fpasswd", None, 404, "is not an endpoint"),
    ("short job id", "GET", "/v1/generations/abc", None, 404, "is not a generation id"),
    ("unknown job id", "GET", "/v1/generations/" + "0" * 32, None, 404, "no generation"),
    ("traversal image id", "GET", "/v1/images/..%2Fhistory.sqlite", None, 404, "is not an endpoint"),
    ("dotted image id", "GET", "/v1/images/..history.sqlite", None, 404, "image: no image"),
    ("image id not hex", "GET", "/v1/images/ZZZZ.png", None, 404, "image: no image"),
    ("cancel bad id", "DELETE", "/v1/generations/%00", None, 404, "is not a generation id"),
    ("events bad id", "GET", "/v1/generations/" + "g" * 32 + "/events", None, 404, "is not a generation id"),
    (
        "history limit 0",
        "GET",
        "/v1/history?limit=0",
        None,
        422,
        "limit: must be a whole number from 1 to 100 (got '0')",
    ),
    ("history limit huge", "GET", "/v1/history?limit=100000", None, 422, "limit: must be a whole number from 1 to 100"),
    ("history offset text", "GET", "/v1/history?offset=x", None, 422, "offset: must be a whole number from 0 to"),
]


@pytest.mark.parametrize("what, method, path, body, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(api, what, method, path, body, status, words):
    http, _ = api
    if isinstance(body, str) and method == "POST" and (body.startswith("{") or body == "{"):
        response = http.request(method, path, content=body, headers={"content-type": "application/json"})
    elif body is None and method != "POST":
        response = http.request(method, path)
    else:
        response = http.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert any(words in message for message in response.json()["detail"]), response.json()
    assert http.get("/v1/health").status_code == 200


def test_unicode_prompt_is_fine(api):
    http, _ = api
    job = http.post("/v1/generations", json=tiny(prompt="赤い円 🟥 on ünïcode", seed=9)).json()
    assert wait_done(http, job["id"])["request"]["prompt"] == "赤い円 🟥 on ünïcode"


def test_python_client(api):
    http, _ = api
    client = CascadeClient(str(http.base_url))
    images, seeds = client.generate(
        "a blue square", width=256, height=256, prior_steps=3, decoder_steps=2, num_images=2, seed=70
    )
    assert seeds == [70, 71] and [im.size for im in images] == [(256, 256)] * 2
    with pytest.raises(APIError) as err:
        client.submit("x", width=300)
    assert err.value.status == 422 and err.value.messages == [
        "width: must be a multiple of 128 from 128 to 2048 (got 300)"
    ]
    client.close()


def test_api_token(tmp_path, engine):
    with running_server(tmp_path, engine, api_token="s3cret") as (http, _):
        refused = http.post("/v1/generations", json=tiny())
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["detail"][0]
        assert http.get("/v1/history", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = http.post("/v1/generations", json=tiny(), headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 202
        assert http.get("/v1/health").status_code == 200  # liveness stays open for load balancers


def test_job_is_stored_when_its_client_disconnects(api):
    http, _ = api
    job = http.post("/v1/generations", json=tiny(seed=12, prior_steps=30)).json()
    with http.stream("GET", f"/v1/generations/{job['id']}/events") as response:
        next(response.iter_lines())  # the first event, then the client goes away mid-job
    done = wait_done(http, job["id"])
    assert done["status"] == "done" and len(done["images"]) == 1
    assert http.get(done["images"][0]["url"]).status_code == 200


def test_warnings_short_ids_and_file_modes(api):
    """A /v1 client learns of cut words at once; the studio's 8-character job id works in the API; PNGs are
    ordinary readable files (mkstemp once left them 0600)."""
    http, queue = api
    long = " ".join(["red"] * 80)
    created = http.post("/v1/generations", json=tiny(prompt=long, seed=31)).json()
    assert any("these words are cut" in w for w in created["warnings"]), created
    done = wait_done(http, created["id"][:8])
    assert done["id"] == created["id"] and done["warnings"] == created["warnings"]
    assert http.get(f"/v1/generations/{created['id'][:8]}/events").status_code == 200
    missing = http.get("/v1/generations/ffffffff")
    assert missing.status_code == 404 and "is the start of no generation id" in missing.json()["detail"][0]
    path = queue.store.image_file(queue.store.get_image(done["images"][0]["id"]))
    assert path.stat().st_mode & 0o777 == 0o644


def test_docs_are_served_from_the_package(api):
    http, _ = api
    page = http.get("/docs").text
    assert "cdn.jsdelivr.net" not in page and "/static-offline-docs/swagger-ui-bundle.js" in page
    assert http.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    schema = http.get("/openapi.json").json()
    assert "GenerationView" in schema["components"]["schemas"] and "Health" in schema["components"]["schemas"]
