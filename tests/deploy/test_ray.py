"""Scale-out on Ray Serve, locally on CPU with the demo model (Ray started by the test, loopback only, bounded).

2 replicas, 20 concurrent requests: all served, both replicas worked, images identical to the single-process
engine for the same seeds. Then a replica killed mid-run: its jobs are retried or fail with a clear error, and
every job ends with a status.
"""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from tests.service.conftest import wait_done
from tests.ui.conftest import free_port

ray = pytest.importorskip("ray", reason="Ray Serve comes with the test extras (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx")

REQUEST = {"prompt": "a red circle on a white background", "prior_steps": 10, "decoder_steps": 5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from cascade_studio.scale import build_app

    out = tmp_path_factory.mktemp("ray-out")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = Settings(model="demo", device="cpu", torch_threads=1, output_dir=out, max_queued=64,
                        per_client_jobs=64)
    serve.run(build_app(settings, replicas=2, cpus_per_replica=1), name="cascade", route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        yield http
    serve.shutdown()
    ray.shutdown()


def test_two_replicas_serve_twenty_concurrent_requests(cluster):
    http = cluster
    with ThreadPoolExecutor(20) as pool:
        created = list(pool.map(lambda s: http.post("/v1/generations", json=REQUEST | {"seed": s}), range(20)))
    assert all(r.status_code == 202 for r in created)
    finals = [wait_done(http, r.json()["id"], timeout=240) for r in created]
    assert all(f["status"] == "done" for f in finals), [f["error"] for f in finals if f["status"] != "done"]
    used = http.get("/v1/health").json()["replicas_used"]
    assert len(used) == 2 and sum(used.values()) == 20, used  # both replicas did work

    threads = torch.get_num_threads()
    local = CascadeEngine.from_settings(Settings(model="demo", device="cpu", torch_threads=1))  # as the replicas
    for final in finals[:3]:
        seed = final["seeds"][0]
        served = np.asarray(Image.open(io.BytesIO(http.get(final["images"][0]["url"]).content)).convert("RGB"))
        alone = np.asarray(local(local.request(**REQUEST, seed=seed)).images[0])
        assert np.array_equal(served, alone)
    torch.set_num_threads(threads)


def test_a_replica_killed_mid_run_loses_no_job(cluster):
    from ray import serve

    http = cluster
    ids = [http.post("/v1/generations", json=REQUEST | {"seed": 100 + s, "prior_steps": 60, "num_images": 4}).json()["id"]
           for s in range(6)]
    deadline = time.time() + 120
    while http.get(f"/v1/generations/{ids[0]}").json()["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.1)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "ModelReplica" in a["name"]]
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    ray.kill(victim, no_restart=False)
    finals = [wait_done(http, job_id, timeout=300) for job_id in ids]
    assert all(f["status"] in ("done", "failed") for f in finals)
    for failed in (f for f in finals if f["status"] == "failed"):
        assert "model replica failed" in failed["error"]
    assert sum(f["status"] == "done" for f in finals) >= 4  # retried on the surviving replica
    # Serve replaces the killed replica: the application is healthy again (it reports UNHEALTHY meanwhile).
    deadline = time.time() + 180
    while serve.status().applications["cascade"].status != "RUNNING":
        assert time.time() < deadline, serve.status().applications["cascade"]
        time.sleep(1)
