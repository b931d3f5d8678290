"""Many users at once, and a crash mid-job: every accepted job finishes and is stored once, nothing half-written.

Loopback only, bounded in count and time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.service.conftest import running_server, tiny, wait_done
from tests.ui.conftest import CLI, free_port


def test_fifty_clients_two_requests_each(tmp_path, engine):
    with running_server(tmp_path, engine, max_queued=8, per_client_jobs=100) as (http, queue):
        base = str(http.base_url)
        health_codes, health_slowest, stop = [], [0.0], threading.Event()

        def poll_health():
            with httpx.Client(base_url=base, timeout=10) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    health_codes.append(c.get("/v1/health").status_code)
                    health_slowest[0] = max(health_slowest[0], time.perf_counter() - t)
                    time.sleep(0.05)

        def client(n: int) -> list[tuple[int, str | None, str | None]]:
            out = []
            with httpx.Client(base_url=base, timeout=60) as c:
                for k in range(2):
                    r = c.post("/v1/generations", json=tiny(seed=n * 10 + k, prior_steps=2, decoder_steps=1))
                    out.append((r.status_code, r.json().get("id"), r.headers.get("retry-after")))
            return out

        poller = threading.Thread(target=poll_health)
        poller.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(50) as pool:
            results = [r for batch in pool.map(client, range(50)) for r in batch]
        accepted = [job_id for status, job_id, _ in results if status == 202]
        rejected = [(status, retry) for status, _, retry in results if status != 202]
        finals = [wait_done(http, job_id, timeout=120) for job_id in accepted]
        elapsed = time.perf_counter() - start
        stop.set()
        poller.join()

        assert len(results) == 100 and accepted and rejected
        assert all(status == 429 and retry == "10" for status, retry in rejected)
        assert all(f["status"] == "done" and len(f["images"]) == 1 for f in finals)
        history = http.get("/v1/history", params={"limit": 100}).json()
        stored = [item["id"] for item in history["items"]]
        assert sorted(stored) == sorted(accepted) and len(set(stored)) == len(stored)  # each exactly once
        assert health_codes and set(health_codes) == {200}
        print(
            f"\nload: 50 clients x 2 requests in {elapsed:.1f}s: {len(accepted)} accepted and done, "
            f"{len(rejected)} refused with 429; /v1/health answered {len(health_codes)} times, "
            f"slowest {health_slowest[0] * 1000:.0f} ms"
        )


def start(model_dir, out, port):
    proc = subprocess.Popen(
        [CLI, "serve", "--model", str(model_dir), "--port", str(port), "--out", str(out), "--threads", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.time() + 120
    while True:
        try:
            if http.get("/v1/health").status_code == 200:
                return proc, http
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.3)


def test_kill_minus_nine_mid_job_then_restart(tmp_path, tiny_model_dir):
    out, port = tmp_path / "out", free_port()
    proc, http = start(tiny_model_dir, out, port)
    try:
        job = http.post(
            "/v1/generations", json=tiny(seed=5, prior_steps=100, num_images=8, width=1024, height=1024)
        ).json()
        deadline = time.time() + 60
        while "progress" not in http.get(f"/v1/generations/{job['id']}").json():
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        http.close()

    proc, http = start(tiny_model_dir, out, port)
    try:
        after = http.get(f"/v1/generations/{job['id']}").json()
        assert after["status"] == "failed" and after["error"].startswith("interrupted") and after["images"] == []
        files = [p for p in out.rglob("*") if p.is_file()]
        assert not [p for p in files if p.suffix == ".png"]  # no partial or orphan image
        assert not [p for p in files if p.name.startswith(".tmp-")]
        done = wait_done(http, http.post("/v1/generations", json=tiny(seed=6)).json()["id"])
        assert done["status"] == "done"  # the database and the server work after the crash
    finally:
        proc.terminate()
        proc.wait(15)
        http.close()
