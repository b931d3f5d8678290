"""Scale-out on Ray Serve across two Ray nodes on this machine (`ray start --head`, then `ray start --address`), on
CPU with the demo model; loopback only, bounded.

Each node has one CPU, so the two model replicas (one CPU each) must land on different nodes and the ingress,
which asks for none, fits beside them. 20 concurrent requests: all served, by both nodes, with images identical to
the single-process engine. A replica killed mid-job costs a retry on the other and no job. A placement the cluster
cannot meet fails at once, naming what is missing.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray  # a test extra, as hadolint is for test_docker: missing means the setup is wrong, not a reason to skip
import torch
from PIL import Image

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from tests.service.conftest import wait_done
from tests.ui.conftest import free_port

REQUEST = {"prompt": "a red circle on a white background", "prior_steps": 10, "decoder_steps": 5}
RAY = str(Path(sys.executable).with_name("ray"))
# Ray turns 127.0.0.1 into this machine's network address; another loopback address keeps all its traffic on the
# loopback interface. Token auth (on by default for `ray start`) is for clusters across machines.
NODE_IP = "127.0.0.2"
PROXY_WAIT = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
ENV = os.environ | {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # Serve gives a starting proxy 5 s to answer, three times, then kills it and starts another: on a busy 2-core
    # machine its imports take longer, and it never came up (serve.start gave up after 60 s).
    PROXY_WAIT: "30",
}


def ray_cli(*args: str) -> None:
    proc = subprocess.run([RAY, *args], env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from cascade_studio.scale import build_app

    gcs = free_port()
    ray_cli(
        "start",
        "--head",
        f"--port={gcs}",
        "--num-cpus=1",
        f"--node-ip-address={NODE_IP}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    )
    try:
        ray_cli(
            "start",
            f"--address={NODE_IP}:{gcs}",
            "--num-cpus=1",
            f"--node-ip-address={NODE_IP}",
            "--disable-usage-stats",
        )
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(
            address=f"{NODE_IP}:{gcs}",
            _node_ip_address=NODE_IP,
            log_to_driver=False,
            runtime_env={"env_vars": {k: ENV[k] for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", PROXY_WAIT)}},
        )
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.time() < deadline, ray.nodes()
            time.sleep(0.5)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(
            model="demo",
            device="cpu",
            torch_threads=1,
            output_dir=tmp_path_factory.mktemp("ray"),
            max_queued=64,
            per_client_jobs=64,
        )
        serve.run(build_app(settings, replicas=2, cpus_per_replica=1), name="cascade", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            yield http, settings
        serve.shutdown()
    finally:
        # Disconnect before the cluster goes, on a failed start too: Ray ends a driver that has lost its cluster for a
        # minute, and this driver is the whole test session (seen: a proxy that started too slowly on a busy machine).
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def test_a_placement_the_cluster_cannot_meet_fails_at_once(cluster):
    from cascade_studio.scale import PlacementError, build_app

    _, settings = cluster
    with pytest.raises(PlacementError) as err:  # two nodes of one CPU, both taken by the running replicas' CPU asks
        build_app(settings, replicas=3, cpus_per_replica=1)
    message = str(err.value)
    assert "(2 node(s), 2 CPU, 0 GPU) cannot place replica 3 (1 CPU)" in message and "ray start --address" in message
    with pytest.raises(PlacementError, match=r"cannot place replica 1 \(1 CPU, 1 GPU\)"):
        build_app(settings, replicas=1, gpus_per_replica=1)


def test_two_replicas_on_two_nodes_serve_twenty_concurrent_requests(cluster):
    http, _ = cluster
    with ThreadPoolExecutor(20) as pool:
        created = list(pool.map(lambda s: http.post("/v1/generations", json=REQUEST | {"seed": s}), range(20)))
    assert all(r.status_code == 202 for r in created)
    finals = [wait_done(http, r.json()["id"], timeout=240) for r in created]
    assert all(f["status"] == "done" for f in finals), [f["error"] for f in finals if f["status"] != "done"]
    health = http.get("/v1/health").json()
    assert len(health["replicas_used"]) == 2 and sum(health["replicas_used"].values()) == 20, health
    assert len(health["nodes_used"]) == 2, health  # one replica on each node

    threads = torch.get_num_threads()
    local = CascadeEngine.from_settings(Settings(model="demo", device="cpu", torch_threads=1))  # as the replicas
    for final in finals[:3]:
        seed = final["seeds"][0]
        served = np.asarray(Image.open(io.BytesIO(http.get(final["images"][0]["url"]).content)).convert("RGB"))
        alone = np.asarray(local(local.request(**REQUEST, seed=seed)).images[0])
        assert np.array_equal(served, alone)
    torch.set_num_threads(threads)


def test_a_replica_killed_mid_job_costs_a_retry_not_a_job(cluster):
    from ray import serve

    http, _ = cluster
    retries_before = http.get("/v1/health").json()["retries"]
    # Each job takes about 4 s on one thread, so the kill, 1 s after the first job starts, lands while both replicas
    # are busy. (With 1 s jobs it landed between two jobs on a fast run: no job was lost, and none was retried.)
    long_job = {"prior_steps": 100, "decoder_steps": 20, "num_images": 8}
    ids = [
        http.post("/v1/generations", json=REQUEST | long_job | {"seed": 100 + 10 * s}).json()["id"] for s in range(4)
    ]
    deadline = time.time() + 120
    while http.get(f"/v1/generations/{ids[0]}").json()["status"] != "running":
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(1)  # the job is on a replica now
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ModelReplica" in a["name"]]
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    ray.kill(victim, no_restart=False)
    finals = [wait_done(http, job_id, timeout=300) for job_id in ids]
    assert [f["status"] for f in finals] == ["done"] * 4, [f["error"] for f in finals]
    assert http.get("/v1/health").json()["retries"] > retries_before  # the killed replica's job ran again elsewhere
    # Serve replaces the killed replica: the application is healthy again (it reports UNHEALTHY meanwhile).
    deadline = time.time() + 180
    while serve.status().applications["cascade"].status != "RUNNING":
        assert time.time() < deadline, serve.status().applications["cascade"]
        time.sleep(1)
