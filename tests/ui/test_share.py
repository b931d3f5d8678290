"""`serve --share`: a public link when the internet allows one; either way the local studio keeps serving."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

from tests.ui.conftest import CLI, free_port


def test_share_reports_its_link_or_why_not_and_serves_locally(tiny_model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                CLI,
                "serve",
                "--model",
                str(tiny_model_dir),
                "--port",
                str(port),
                "--share",
                "--out",
                str(tmp_path),
                "--threads",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
        )
    try:
        deadline = time.time() + 120
        while "share:" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        line = next(x for x in log.read_text().splitlines() if x.startswith("share:"))
        # Offline (as on CI here) the reason is given; online, the gradio.live link.
        assert line.startswith(("share: no public link (", "share: public link https://")), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200 and "cascade-studio" in page.read().decode()
    finally:
        proc.terminate()
        proc.wait(15)
