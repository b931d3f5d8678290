"""Scale-out on Ray Serve: an ingress serving the same /v1 API, in front of N model replicas.

    serve run cascade_studio.scale:app replicas=2 gpus_per_replica=1   # settings from CASCADE_* variables
    serve deploy deploy/ray/serve.yaml                                  # on a Ray cluster (deploy/ray/README.md)

The ingress keeps the job queue and the history (one line for everybody, as on a single server); its worker
threads, one per replica, send each job to whichever replica Ray Serve routes it to. A replica that dies mid-job
costs one retry on another replica; a second failure fails the job with the replica's error.

Resources are explicit: each model replica asks for `cpus_per_replica` CPUs and `gpus_per_replica` GPUs, the
ingress for `ingress_cpus` (default 0: it only moves requests). A placement the cluster cannot meet fails at once
with what is missing, instead of Ray waiting for it forever.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import ray
from PIL import Image
from ray import serve

from .config import Settings
from .engine import CancelToken, CascadeEngine, GenerationCancelled, GenerationRequest, GenerationResult, make_request
from .models import ModelIdentity
from .service.api import create_api
from .service.guard import Credentials, Guard
from .store import HistoryStore


class ModelReplica:
    """One engine on one device (num_gpus per replica is a deployment option)."""

    def __init__(self, settings: dict):
        self.engine = CascadeEngine.from_settings(Settings(**settings))
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.node = ray.get_runtime_context().get_node_id()

    def describe(self) -> dict:
        return self.engine.describe() | {
            "identity": self.engine.identity.model_dump(),
            "replica": self.name,
            "defaults": self.engine.pipelines.defaults,
            "node": self.node,
        }

    def generate(self, request: dict) -> dict:
        result = self.engine(GenerationRequest(**request))
        pngs = []
        for image in result.images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return {
            "request": result.request.model_dump(),
            "images": pngs,
            "seeds": result.seeds,
            "timings": result.timings,
            "prior_cached": result.prior_cached,
            "warnings": result.warnings,
            "replica": self.name,
            "node": self.node,
        }


class RemoteEngine:
    """Stands in for a CascadeEngine inside the ingress's JobQueue; the work happens on the replicas."""

    def __init__(self, handle, retries: int = 1):
        self.handle, self.retries = handle, retries
        # Built inside the ingress's event loop, where a handle may not block: ask from a helper thread. The
        # queue's worker threads, which make every later call, have no event loop.
        with ThreadPoolExecutor(1) as pool:
            info = pool.submit(lambda: handle.describe.remote().result()).result()
        self.identity = ModelIdentity(**info["identity"])
        self.defaults = info["defaults"]
        self._info = {k: info[k] for k in ("model", "device", "dtype", "speedups")}
        self.replicas_used: Counter[str] = Counter()
        self.nodes_used: Counter[str] = Counter()
        self.retried = 0  # jobs sent again after their replica died
        self._lock = threading.Lock()

    def describe(self) -> dict:
        with self._lock:
            return self._info | {
                "replicas_used": dict(self.replicas_used),
                "nodes_used": dict(self.nodes_used),
                "retries": self.retried,
            }

    def request(self, /, **fields) -> GenerationRequest:
        return make_request(**(self.defaults | fields))

    def __call__(self, request: GenerationRequest, progress=None, cancel: CancelToken | None = None):
        cancel = cancel or CancelToken()
        request = request.with_seed()
        failure: Exception | None = None
        for _ in range(self.retries + 1):
            if cancel.cancelled:
                raise GenerationCancelled
            start = time.perf_counter()
            response = self.handle.generate.remote(request.model_dump())
            try:
                out = self._wait(response, cancel)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                failure = exc  # the replica died or went away: try another one
                with self._lock:
                    self.retried += 1
                continue
            with self._lock:
                self.replicas_used[out["replica"]] += 1
                self.nodes_used[out["node"]] += 1
            images = [Image.open(io.BytesIO(png)).convert("RGB") for png in out["images"]]
            timings = out["timings"] | {"total": time.perf_counter() - start}
            return GenerationResult(
                GenerationRequest(**out["request"]),
                images,
                out["seeds"],
                timings,
                out["prior_cached"],
                self.identity,
                out["warnings"],
            )
        raise RuntimeError(
            f"model replica failed {self.retries + 1} times; last error: "
            f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
        )

    @staticmethod
    def _wait(response, cancel: CancelToken) -> dict:
        while True:
            try:
                return response.result(timeout_s=0.2)
            except asyncio.TimeoutError:  # TimeoutError itself from 3.11 on; 3.10 too
                if cancel.cancelled:
                    response.cancel()
                    raise GenerationCancelled from None


_inner = None  # this ingress replica's /v1 app, built in Ingress.__init__


async def _delegate(scope, receive, send):
    await _inner(scope, receive, send)


class Ingress:
    """The /v1 API of the single server, with a RemoteEngine in place of the local one."""

    def __init__(self, model, settings: dict, replicas: int):
        global _inner
        from .service.queue import JobQueue

        config = Settings(**settings)
        store = HistoryStore(config.history_db or config.output_dir / "history.sqlite", config.output_dir)
        queue = JobQueue(
            RemoteEngine(model),
            store,
            max_queued=config.max_queued,
            per_client=config.per_client_jobs,
            workers=replicas,
        )
        _inner = Guard(create_api(queue), Credentials(config.api_token))


class PlacementError(RuntimeError):
    """The cluster cannot place the deployments as asked; the message names what is missing."""


def check_placement(
    replicas: int,
    cpus_per_replica: float,
    gpus_per_replica: float,
    ingress_cpus: float,
    nodes: list[dict] | None = None,
) -> None:
    """Raise PlacementError unless the live nodes can hold the ingress and `replicas` model replicas, each replica
    on one node (Ray never splits an actor across nodes)."""
    nodes = [n["Resources"] for n in (nodes if nodes is not None else ray.nodes()) if n.get("Alive", True)]
    free = [[n.get("CPU", 0.0), n.get("GPU", 0.0)] for n in nodes]
    missing = []
    for name, cpu, gpu in [("the ingress", ingress_cpus, 0.0)] + [
        (f"replica {i + 1}", cpus_per_replica, gpus_per_replica) for i in range(replicas)
    ]:
        fits = [slot for slot in free if slot[0] >= cpu and slot[1] >= gpu]
        if not fits:
            missing.append(f"{name} ({cpu:g} CPU{f', {gpu:g} GPU' if gpu else ''})")
            continue
        best = max(fits, key=lambda slot: slot[0])
        best[0] -= cpu
        best[1] -= gpu
    if missing:
        total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
        total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
        raise PlacementError(
            f"scale: the cluster ({len(nodes)} node(s), {total_cpu:g} CPU, {total_gpu:g} GPU) cannot place "
            f"{', '.join(missing)}: {replicas} replicas x {cpus_per_replica:g} CPU"
            f"{f' + {gpus_per_replica:g} GPU' if gpus_per_replica else ''} and the ingress's {ingress_cpus:g} CPU are "
            "needed. Lower replicas= or cpus_per_replica=, or add a node (ray start --address HEAD:PORT)"
        )


def build_app(
    settings: Settings | None = None,
    *,
    replicas: int = 2,
    gpus_per_replica: float = 0,
    cpus_per_replica: float = 1,
    ingress_cpus: float = 0,
    autoscale_to: int | None = None,
):
    """The Ray Serve application: Ingress -> ModelReplica x replicas (autoscaling up to `autoscale_to`). With Ray
    already running, the placement is checked first (PlacementError names what is missing)."""
    from fastapi import FastAPI

    if ray.is_initialized():
        check_placement(replicas, cpus_per_replica, gpus_per_replica, ingress_cpus)
    settings_dict = (settings or Settings()).model_dump(mode="json", exclude_none=True)
    options: dict = {"ray_actor_options": {"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica}}
    if autoscale_to:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": autoscale_to,
            "target_ongoing_requests": 1,
        }
    else:
        options["num_replicas"] = replicas
    model = serve.deployment(ModelReplica, name="ModelReplica").options(max_ongoing_requests=1, **options)
    api = FastAPI(title="cascade-studio (Ray Serve)")
    api.mount("/", _delegate)
    ingress = serve.deployment(
        serve.ingress(api)(Ingress), name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": ingress_cpus}
    )
    return ingress.bind(model.bind(settings_dict), settings_dict, autoscale_to or replicas)


def app(args: dict[str, str]):
    """Application builder for `serve run` / `serve deploy`: replicas, gpus_per_replica, cpus_per_replica,
    ingress_cpus and max_replicas (turns on autoscaling) come from the args; model settings from CASCADE_*
    variables.

        serve run cascade_studio.scale:app replicas=2 gpus_per_replica=1
    """
    return build_app(
        replicas=int(args.get("replicas", 2)),
        gpus_per_replica=float(args.get("gpus_per_replica", 0)),
        cpus_per_replica=float(args.get("cpus_per_replica", 1)),
        ingress_cpus=float(args.get("ingress_cpus", 0)),
        autoscale_to=int(args["max_replicas"]) if "max_replicas" in args else None,
    )
