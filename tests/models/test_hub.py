"""`download` and `models` against the official repos' real layouts, through huggingface_hub itself; only the Hub is
a stand-in (tests/models/fake_hub.py, on a loopback port). Then the downloaded cache runs offline."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from cascade_studio.cli import main
from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.models import ModelNotFoundError, resolve_model
from cascade_studio.models.hub import download
from cascade_studio.models.presets import DECODER_REPO, PRESETS, PRIOR_REPO
from tests.conftest import small_request
from tests.models.fake_hub import COMMITS, FakeHub, Served, build_repos
from tests.service.test_faults import _mount
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    return build_repos(tmp_path_factory.mktemp("hub-repos"))


def fetched(hub: FakeHub) -> set[str]:
    """Files downloaded (GET of a file, not HEAD): '<repo>/<path>'."""
    out = set()
    for method, path, _ in hub.requests:
        match = re.fullmatch(r"/(\w+/[\w-]+)/resolve/\w+/(.+)", path)
        if method == "GET" and match:
            out.add(f"{match.group(1)}/{match.group(2)}")
    return out


def hub_env(hub: FakeHub) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}


def test_download_fetches_exactly_what_each_component_needs(repos, tmp_path, capsys):
    cache, said = tmp_path / "cache", []
    with Served(FakeHub(repos)) as hub:
        files = download(PRESETS["full"], cache_dir=cache, endpoint=hub.url, log=said.append)
        prior_shards = {f"prior/diffusion_pytorch_model.bf16-0000{i}-of-00007.safetensors" for i in range(1, 8)}
        expected = {
            f"{PRIOR_REPO}/{p}"
            for p in {"prior/config.json", *prior_shards, "prior/diffusion_pytorch_model.safetensors.index.bf16.json"}
        }
        expected |= {
            f"{DECODER_REPO}/{p}"
            for p in (
                "decoder/config.json",
                "decoder/diffusion_pytorch_model.bf16.safetensors",
                "vqgan/config.json",
                "vqgan/diffusion_pytorch_model.safetensors",  # no bf16 in the repo: the fp32 file
                "text_encoder/config.json",
                "text_encoder/model.safetensors.index.bf16.json",
                "text_encoder/model.bf16-00001-of-00002.safetensors",
                "text_encoder/model.bf16-00002-of-00002.safetensors",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json",
                "scheduler/scheduler_config.json",
            )
        }
        assert fetched(hub) == expected  # not the fp32 prior or decoder, not stage_c_bf16, not the READMEs
        assert {f"{f.repo}/{f.path}" for f in files} == expected
        assert any("vqgan: the repo has no bf16 weights; fetching the full-precision file" in s for s in said)
        hub.requests.clear()
        said.clear()
        download(PRESETS["full"], cache_dir=cache, endpoint=hub.url, log=said.append)
        assert said[-1].startswith("stable-cascade-full: already complete") and not fetched(hub)
        download(PRESETS["lite"], cache_dir=cache, endpoint=hub.url, log=said.append)
        assert {p for p in fetched(hub) if "prior_lite/" in p} >= {
            f"{PRIOR_REPO}/prior_lite/diffusion_pytorch_model-00003-of-00007.bf16.safetensors",
            f"{PRIOR_REPO}/prior_lite/diffusion_pytorch_model.safetensors.bf16.index.json",
        }  # legacy shard names
        assert not [p for p in fetched(hub) if "/vqgan/" in p]  # shared with full, and cached already

    # Offline from here: both presets load from the cache and generate.
    for name in ("full", "lite"):
        source = resolve_model(name, cache_dir=cache)
        assert source.identity.revisions == {PRIOR_REPO: COMMITS[PRIOR_REPO], DECODER_REPO: COMMITS[DECODER_REPO]}
        assert source.weights["vqgan"].variant is None and source.weights["prior"].variant == "bf16"
    engine = CascadeEngine.from_settings(Settings(model="full", cache_dir=cache, device="cpu", dtype="bf16"))
    assert engine(small_request(seed=1, width=128, height=128)).images[0].size == (128, 128)
    code, listing, _ = cli(capsys, "models", "--cache-dir", str(cache))
    assert (
        code == 0 and "full: ready (stabilityai/stable-cascade-prior@1111111111" in listing and "lite: ready" in listing
    )
    small = ["--width", "128", "--height", "128", "--prior-steps", "2", "--decoder-steps", "1"]
    generated = run_cli(
        "generate", "a red circle", "--model", "lite", "--cache-dir", str(cache), *small, "--out", str(tmp_path / "o")
    )  # a separate process, offline
    assert generated.returncode == 0, generated.stderr[-2000:]

    # A shard lost from the cache: the component is incomplete, with how much is still to fetch.
    snapshot = cache / "models--stabilityai--stable-cascade-prior" / "snapshots" / COMMITS[PRIOR_REPO]
    (snapshot / "prior" / "diffusion_pytorch_model.bf16-00004-of-00007.safetensors").unlink()
    _, listing, _ = cli(capsys, "models", "--cache-dir", str(cache))
    assert re.search(r"full: not ready: prior incomplete: 6 of 7 shards, about [\d.]+ MB still to fetch", listing)
    with pytest.raises(ModelNotFoundError, match=r"prior \(incomplete: 6 of 7 shards"):
        resolve_model("full", cache_dir=cache)


def test_one_progress_bar_over_the_bytes_and_resume_after_a_drop(repos, tmp_path, monkeypatch):
    # huggingface_hub writes 10 MB at a time; with the tiny files here, 4 kB chunks leave a part on disk to resume from.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    with Served(FakeHub(repos, cut_after=20_000)) as hub:
        bar = io.StringIO()
        files = download(
            PRESETS["full"],
            cache_dir=tmp_path,
            endpoint=hub.url,
            log=lambda _: None,
            show_progress=True,
            progress_file=bar,
        )
        total = sum(f.size for f in files)
        resumed = [(path, rng) for method, path, rng in hub.requests if method == "GET" and rng]
    assert resumed and all(rng.startswith("bytes=") and int(rng[6:].split("-")[0]) > 0 for _, rng in resumed)
    assert resolve_model("full", cache_dir=tmp_path).identity.preset == "full"  # every cut file completed
    last = bar.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert (
        last.startswith("stable-cascade-full: 100%")
        and f"{total / 1024:.0f}k" in last.replace(".", "")
        or "100%" in last
    ), last  # one bar, over the bytes of every file


def test_no_room_on_the_disk_is_said_before_anything_downloads(repos, tmp_path):
    small = _mount(tmp_path / "small", "300k")
    try:
        with Served(FakeHub(repos)) as hub:
            with pytest.raises(ModelNotFoundError, match=r"needs [\d.]+ MB more in .*, and only [\d.]+ MB is free"):
                download(PRESETS["full"], cache_dir=small, endpoint=hub.url, log=lambda _: None)
            assert not [p for p in fetched(hub) if p.endswith(".safetensors")]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The command line in this process (as `cascade-studio ARGS` runs it): exit code, stdout, stderr."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_hub_answers_become_one_line_and_exit_code_1(repos, tmp_path, capsys, monkeypatch):
    with Served(FakeHub(repos, gated=True)) as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        code, _, err = cli(capsys, "download", "full", "--cache-dir", str(tmp_path))
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert "refused access to stabilityai/stable-cascade-prior (HTTP 401)" in err
    assert "https://huggingface.co/stabilityai/stable-cascade-prior" in err and "HF_TOKEN" in err
    with Served(FakeHub(repos)) as hub:
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        code, _, err = cli(capsys, "download", "full", "--prior-revision", "nope", "--cache-dir", str(tmp_path))
    assert code == 1 and "stabilityai/stable-cascade-prior has no revision 'nope' on the Hub" in err
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    code, _, err = cli(capsys, "download", "lite", "--cache-dir", str(tmp_path))
    assert code == 1 and "the Hub cannot be reached (HF_HUB_OFFLINE is set)" in err and err.count("\n") == 1
    code, _, err = cli(capsys, "download", "full", "--revision", "a" * 40, "--cache-dir", str(tmp_path))
    assert code == 2 and "pass it as --prior-revision or --decoder-revision" in err


def test_revisions_per_repo_are_used_and_reproduce_says_when_one_is_missing(repos, tmp_path, capsys):
    cache = tmp_path / "cache"
    with Served(FakeHub(repos)) as hub:
        download(
            PRESETS["lite"],
            cache_dir=cache,
            endpoint=hub.url,
            log=lambda _: None,
            revisions={PRIOR_REPO: COMMITS[PRIOR_REPO], DECODER_REPO: COMMITS[DECODER_REPO]},
        )
    out = tmp_path / "out"
    code, _, err = cli(
        capsys,
        "generate",
        "a red circle",
        "--model",
        "lite",
        "--cache-dir",
        str(cache),
        "--prior-revision",
        COMMITS[PRIOR_REPO],
        "--decoder-revision",
        COMMITS[DECODER_REPO],
        "--width",
        "128",
        "--height",
        "128",
        "--prior-steps",
        "2",
        "--decoder-steps",
        "1",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert code == 0, err
    png = next(out.glob("*.png"))
    code, _, err = cli(capsys, "reproduce", str(png), "--cache-dir", str(cache), "--out", str(tmp_path / "again"))
    assert code == 0 and "identical pixels" in err, err
    # The PNG names each repo's commit; with another commit in the cache, reproduce says what is missing.
    os.rename(
        cache / "models--stabilityai--stable-cascade" / "snapshots" / COMMITS[DECODER_REPO],
        cache / "models--stabilityai--stable-cascade" / "snapshots" / ("3" * 40),
    )
    code, _, err = cli(capsys, "reproduce", str(png), "--cache-dir", str(cache), "--out", str(tmp_path / "again"))
    assert code == 1 and f"made with stabilityai/stable-cascade@{'2' * 10}" in err
    assert f"--decoder-revision {COMMITS[DECODER_REPO]}" in err
