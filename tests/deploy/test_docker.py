"""The Dockerfiles pass hadolint (no Docker engine runs here, so they are linted, not built)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "deploy" / "docker"


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.cpu"])
def test_dockerfile_lints_clean(name):
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the test extras (pip install -e '.[test]')")
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(DOCKER / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (DOCKER / name).read_text()
    assert "USER 1000" in text and "/v1/health" in text and 'VOLUME ["/data"]' in text
