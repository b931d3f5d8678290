"""A real studio server (subprocess, loopback, free port) for the browser and gradio_client tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("cascade-studio"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "studio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio_out(tmp_path_factory) -> Path:
    """The studio server's output folder: its images and history database."""
    return tmp_path_factory.mktemp("studio-out")


@pytest.fixture(scope="module")
def studio_url(studio_out):
    """The studio serving the shipped demo model, as a user would start it."""
    port, out = free_port(), studio_out
    log = open(out / "server.log", "w")
    # One torch thread: the browser and the server's event loop need the other core on a 2-core machine.
    proc = subprocess.Popen(
        [CLI, "serve", "--model", "demo", "--port", str(port), "--out", str(out), "--threads", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"studio did not start: {(out / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
