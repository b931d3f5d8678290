"""The README's commands, run as a reader would run them, so that the page cannot go stale.

Each fenced ```bash and ```python block of README.md runs here (demo model, offline, loopback only):
- the set-up and test lines must be exactly what `.ci/run` runs (CI runs them on a fresh machine);
- a line whose comment says `(needs the internet)` runs offline and must fail cleanly, exit code 1, no traceback;
- a line whose comment names an exit code must end with it;
- the serving line starts the studio and answers on its port;
- blocks that talk to a server (`localhost:7860`, `127.0.0.1:7860`) run against a real server on a free port.
A `cascade-studio …` line without pipes or redirections runs through the CLI's `main()` in this process, the
function the console script calls, with its words split and globbed as bash would: a process of its own spends
about 5 s importing torch, diffusers and transformers before it starts, a minute of the suite over these blocks.
Lines that need a process of their own (the server, the weights commands offline) still get one.
Commands given in running text are run too, unless they need what no machine here has (a Docker engine, the
Hub); those are listed with the reason, and the test fails when the README gains one that is not.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import in_process
from tests.ui.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ['PATH']}", "CASCADE_TORCH_THREADS": "2"}
# Commands in the running text that no machine here can run, and why (each is checked another way).
NOT_RUN = {
    "docker build -f deploy/docker/Dockerfile.gpu -t cascade-studio:gpu .": "no Docker engine (hadolint lints it)",
    "docker run --gpus all -v cascade-data:/data cascade-studio:gpu download full": "no Docker engine",
    "docker run --gpus all -p 7860:7860 -v cascade-data:/data cascade-studio:gpu": "no Docker engine",
    "serve run cascade_studio.scale:app replicas=2 gpus_per_replica=1": "needs GPUs (test_ray.py runs it on CPU)",
    "hf auth login": "asks the Hub for a token",
}


def blocks(language: str, section: str | None = None) -> list[str]:
    """The fenced blocks of a language, in the whole page or under one `## section` heading."""
    text = README
    if section is not None:
        text = re.split(r"^## ", README, flags=re.MULTILINE)
        text = next(part for part in text if part.startswith(section))
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def lines(block: str) -> list[str]:
    """Commands of a block; a trailing backslash continues a line."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def run(command: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    if command.startswith("cascade-studio ") and not set(command) & set("|&;<>$`#"):
        return run_in_process(command, cwd)
    return in_bash(command, cwd, timeout)


def in_bash(command: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_in_process(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """`cascade-studio ARGS` as bash would run it, in the test process (tests/in_process.py), in `cwd` with the
    README tests' thread count."""
    words = [found for word in shlex.split(command)[1:] for found in globbed(word, cwd)]
    proc = in_process.cli(words, cwd, {"CASCADE_TORCH_THREADS": ENV["CASCADE_TORCH_THREADS"]})
    return subprocess.CompletedProcess(command, proc.returncode, proc.stdout, proc.stderr)


def globbed(word: str, cwd: Path) -> list[str]:
    """A word as bash expands it: a pattern becomes the files it matches, sorted, or stays as it is if none."""
    if not any(c in word for c in "*?["):
        return [word]
    return sorted(glob.glob(word, root_dir=cwd)) or [word]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    out = tmp_path_factory.mktemp("readme-server")
    proc = subprocess.Popen(
        [
            str(BIN / "cascade-studio"),
            "serve",
            "--model",
            "demo",
            "--port",
            str(port),
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(f"http://127.0.0.1:{port}/v1/health", proc)
    yield port
    proc.terminate()
    proc.wait(15)


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None and time.time() < deadline, f"nothing answered on {url}"
            time.sleep(0.3)


def test_set_up_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")  # CI's pip is quiet
    setup, tests = lines(blocks("bash")[1])
    assert setup.split("#")[0].strip() in ci and tests.split("#")[0].strip() in ci
    user, serve = lines(blocks("bash")[0])
    # The user's install is the developer's without the test extras; the same torch pin.
    assert user.split("#")[0].strip() == setup.split("#")[0].strip().replace(' -e ".[test]"', " -e .")
    assert serve.split("#")[0].strip() == ".venv/bin/cascade-studio"


def test_plain_cascade_studio_serves_the_studio(tmp_path):
    """`.venv/bin/cascade-studio` (and `cascade-studio --port N`) serve the studio right after set-up."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "cascade-studio"), "--port", str(port)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/", proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert "cascade-studio" in page.read().decode()
    finally:
        proc.terminate()
        proc.wait(15)


def test_weights_commands(tmp_path):
    for command in lines(blocks("bash")[2]):  # a process each: huggingface_hub reads HF_HUB_OFFLINE on import
        result = in_bash(command.split("#")[0].replace(".venv/bin/", "") + f" --cache-dir {tmp_path}", tmp_path)
        if "(needs the internet)" in command:
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
            assert "download" in result.stderr and "failed" in result.stderr
        else:
            assert result.returncode == 0, result.stderr[-2000:]


def test_command_line_block_runs_as_written(tmp_path):
    said = {}
    for command in lines(blocks("bash", "Command line")[0]):
        expected = re.search(r"exit code (\d+)", command)
        result = run(command.split("#")[0], tmp_path)
        assert result.returncode == (int(expected.group(1)) if expected else 0), (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr
        said[command.split()[1]] = result
    assert len(list((tmp_path / "outputs").glob("*.png"))) == 2
    assert len(list((tmp_path / "outputs" / "again").glob("*.png"))) == 1  # the image asked for, remade
    assert "identical pixels" in said["reproduce"].stderr and "Seed: 8" in said["info"].stdout


def test_lora_block_runs_as_written(tmp_path):
    """The LoRA block on a folder of captioned pictures, with one change: the training runs 6 steps (and draws 2
    preservation pictures), not the model's 600, to keep the suite short."""
    from cascade_studio.train.concepts import write_concept

    write_concept("teal", tmp_path / "my_pictures", n=4)
    said = []
    for command in lines(blocks("bash", "LoRA")[0]):
        command = command.split("#")[0]
        if command.startswith("cascade-studio train-lora"):
            command += " --steps 6 --batch 2 --preserve 2 --model demo"
        result = run(command, tmp_path)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr[-2000:])
        said.append(result)
    assert (tmp_path / "loras" / "mystyle.safetensors").is_file() and "mystyle" in said[1].stdout
    assert len(list((tmp_path / "outputs" / "again").glob("*.png"))) == 1
    assert "identical pixels" in said[-1].stderr


def test_picture_block_runs_as_written(tmp_path):
    """The image-to-image, inpainting, outpainting and image-prompt lines, on a scene the demo model knows."""
    from PIL import Image

    from cascade_studio.train.scenes import Scene, render

    render(Scene("yellow", "red", "circle", "large", "centre", 1), 128).save(tmp_path / "scene.png")
    render(Scene("white", "blue", "square", "large", "left", 1), 128).save(tmp_path / "ref.png")
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (32, 32, 96, 96))
    mask.save(tmp_path / "mask.png")
    for command in lines(blocks("bash", "Start from a picture")[0]):
        expected = re.search(r"exit code (\d+)", command)
        result = run(command.split("#")[0], tmp_path)
        assert result.returncode == (int(expected.group(1)) if expected else 0), (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr
    made = sorted((tmp_path / "outputs").glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    assert len(made) == 5 and len(list((tmp_path / "outputs" / "inputs").glob("*.png"))) == 5  # ref.png too
    with Image.open(made[2]) as outpainted:  # the third line; then the two image-prompt lines
        assert outpainted.size == (256, 128)


def test_python_engine_snippet(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", blocks("python")[0]], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "square.png").is_file() and "[1, 2]" in result.stdout


def test_api_examples_against_a_server(server, tmp_path):
    port = str(server)
    for block in blocks("bash", "HTTP API"):
        script = "set -euo pipefail\n" + block.replace("7860", port)
        result = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "event: done" in result.stdout
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = []
    for code in blocks("python")[1:]:
        result = subprocess.run(
            [sys.executable, "-c", code.replace("7860", port)],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        printed.append(result.stdout)
    assert any("[1, 2]" in out for out in printed)  # gradio_client's seeds
    assert (tmp_path / "square.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the openai package's image


def test_every_command_in_the_running_text_runs_or_says_why_not(tmp_path):
    spans = re.findall(r"`((?:cascade-studio|docker|serve run|hf) [^`]*)`", README)
    unexplained = [s for s in spans if s not in NOT_RUN and not _runnable(s)]
    assert not unexplained, f"commands in the README that no test runs: {unexplained}"
    assert set(NOT_RUN) <= set(spans), "NOT_RUN lists commands the README no longer has"
    result = run("cascade-studio space export space", tmp_path)
    assert result.returncode == 0 and (tmp_path / "space" / "app.py").is_file(), result.stderr[-2000:]
    for path in re.findall(r"`(deploy/docker/Dockerfile\.\w+)`", README):
        assert (ROOT / path).is_file(), path


def _runnable(span: str) -> bool:
    """Spans that are synopses or commands run by the tests above."""
    words = shlex.split(span.replace("[", "").replace("]", "").replace("|", " "))
    return words[:2] in (
        ["cascade-studio", "serve"],
        ["cascade-studio", "reproduce"],
        ["cascade-studio", "--port"],
        ["cascade-studio", "space"],
        ["cascade-studio", "train-demo"],
        ["cascade-studio", "generate"],
    )
