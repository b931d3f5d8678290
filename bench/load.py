"""How the server holds up under a burst of clients and a flood of event streams (loopback only, bounded).

    python bench/load.py                 # demo model, 2 CPU threads; writes bench/results/load.json

1. 50 clients, each from its own loopback address (127.0.0.10-59), send 2 generation requests at once while a
   poller asks /v1/health every 20 ms: how many were accepted and refused (429), whether every accepted job
   finished and was stored exactly once (0 lost), and health's latency during the burst.
2. 200 event streams held open on a queued job (8 per address, the per-client cap): health's latency meanwhile,
   and the process's thread count before and after.
"""

from __future__ import annotations

import cascade_studio  # noqa: F401 - first: it makes torchvision importable (see _torchvision.py)

# isort: split
import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

from cascade_studio.config import Settings
from cascade_studio.server import build_server, uvicorn_config

REQUEST = {"prompt": "a red circle on a white background", "prior_steps": 10, "decoder_steps": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float]) -> dict:
    ms = [1000 * v for v in latencies]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
    }


class Poller(threading.Thread):
    """Asks /v1/health every `every` seconds until stopped; keeps each answer's latency."""

    def __init__(self, base: str, every: float = 0.02):
        super().__init__(daemon=True)
        self.base, self.every, self.latencies, self.codes = base, every, [], []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as http:
            while not self.stop.is_set():
                t = time.perf_counter()
                self.codes.append(http.get("/v1/health").status_code)
                self.latencies.append(time.perf_counter() - t)
                time.sleep(self.every)


def burst(base: str, clients: int = 50, each: int = 2) -> dict:
    def client(n: int) -> list[tuple[int, str | None]]:
        transport = httpx.HTTPTransport(local_address=f"127.0.0.{10 + n}")
        with httpx.Client(base_url=base, transport=transport, timeout=60) as http:
            out = []
            for k in range(each):
                r = http.post("/v1/generations", json=REQUEST | {"seed": n * 10 + k})
                out.append((r.status_code, r.json().get("id")))
            return out

    poller = Poller(base)
    poller.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    accepted = [job for status, job in results if status == 202]
    with httpx.Client(base_url=base, timeout=60) as http:
        finals = []
        for job in accepted:
            while (body := http.get(f"/v1/generations/{job}").json())["status"] in ("queued", "running"):
                time.sleep(0.05)
            finals.append(body)
        elapsed = time.perf_counter() - start
        poller.stop.set()
        poller.join()
        stored = [item["id"] for item in http.get("/v1/history", params={"limit": 100}).json()["items"]]
    done = [f["id"] for f in finals if f["status"] == "done"]
    lost = len(accepted) - len(set(done) & set(stored))
    return {
        "clients": clients,
        "requests": len(results),
        "accepted": len(accepted),
        "refused_429": sum(status == 429 for status, _ in results),
        "other_status": sorted({status for status, _ in results} - {202, 429}),
        "lost": lost,
        "stored_twice": len(stored) - len(set(stored)),
        "seconds": round(elapsed, 1),
        "health": summary(poller.latencies),
        "health_not_200": sum(c != 200 for c in poller.codes),
    }


def streams(base: str, port: int, count: int = 200) -> dict:
    with httpx.Client(base_url=base, transport=httpx.HTTPTransport(local_address="127.0.0.200"), timeout=60) as owner:
        blocker = owner.post(
            "/v1/generations",
            json=REQUEST | {"seed": 1, "prior_steps": 100, "num_images": 8, "width": 512, "height": 512},
        ).json()
        queued = owner.post("/v1/generations", json=REQUEST | {"seed": 2}).json()
        threads_before = threading.active_count()
        sockets = []
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.1.{i // 8}", 0))
            s.sendall(f"GET /v1/generations/{queued['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sockets.append(s)
        opened = sum(s.recv(4096).startswith(b"HTTP/1.1 200") for s in sockets)
        poller = Poller(base)
        poller.start()
        time.sleep(5)
        poller.stop.set()
        poller.join()
        threads_open = threading.active_count()
        for s in sockets:
            s.close()
        owner.delete(f"/v1/generations/{blocker['id']}")
        owner.delete(f"/v1/generations/{queued['id']}")
    time.sleep(1)
    return {
        "streams_open": opened,
        "health": summary(poller.latencies),
        "threads_before": threads_before,
        "threads_with_streams_open": threads_open,
        "threads_after": threading.active_count(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "load.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(model="demo", device="cpu", output_dir=Path(tmp), port=port)
        app, queue = build_server(settings)
        server = uvicorn.Server(uvicorn_config(app, settings))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        try:
            report = {
                "date": time.strftime("%Y-%m-%d"),
                "threads": args.threads,
                "max_queued": settings.max_queued,
                "per_client_jobs": settings.per_client_jobs,
                "burst": burst(base),
                "streams": streams(base, port),
            }
        finally:
            server.should_exit = True
            thread.join(10)
            queue.close()
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    b, s = report["burst"], report["streams"]
    print(
        f"burst: {b['requests']} requests from {b['clients']} addresses: {b['accepted']} accepted, "
        f"{b['refused_429']} refused (429), {b['lost']} lost; health p50 {b['health']['p50_ms']} ms, "
        f"p99 {b['health']['p99_ms']} ms, max {b['health']['max_ms']} ms over {b['health']['n']} checks"
    )
    print(
        f"streams: {s['streams_open']} open; health p50 {s['health']['p50_ms']} ms, p99 {s['health']['p99_ms']} ms, "
        f"max {s['health']['max_ms']} ms; threads {s['threads_before']} -> {s['threads_with_streams_open']} -> "
        f"{s['threads_after']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
