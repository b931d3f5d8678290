"""Finding and loading weights: the Hub cache layout, local folders, and the errors when something is missing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.models import ModelConfigError, ModelNotFoundError, load_pipelines, resolve_model
from cascade_studio.models.device import resolve_device, resolve_dtype
from cascade_studio.models.presets import DECODER_REPO, PRESETS, PRIOR_REPO
from cascade_studio.models.schedulers import WuerstchenScheduler
from cascade_studio.models.source import repo_revisions
from tests.conftest import small_request, write_hub_snapshot


def test_presets_load_from_the_hub_cache_with_bf16_variant(hub_cache):
    for name, prior_sub, decoder_sub in [("full", "prior", "decoder"), ("lite", "prior_lite", "decoder_lite")]:
        source = resolve_model(name, cache_dir=hub_cache)
        assert source.dirs["prior"].name == prior_sub and source.dirs["decoder"].name == decoder_sub
        assert source.identity.name == f"stable-cascade-{name}" and source.identity.variant == "bf16"
        assert source.identity.revisions == {
            "stabilityai/stable-cascade-prior": "a" * 40,
            "stabilityai/stable-cascade": "b" * 40,
        }
    engine = CascadeEngine.from_settings(Settings(model="lite", cache_dir=hub_cache, device="cpu"))
    assert engine.pipelines.prior.prior.dtype == torch.float32  # bf16 files, fp32 on the CPU
    assert engine(small_request(seed=1)).images[0].size == (256, 256)


def test_one_text_encoder_is_shared(engine):
    p = engine.pipelines
    assert p.prior.text_encoder is p.decoder.text_encoder and p.prior.tokenizer is p.decoder.tokenizer


def test_the_official_scheduler_name_loads_ours_one_per_pipeline(tiny_model_dir, engine):
    """The official folders name diffusers' DDPMWuerstchenScheduler; we load its twin without host waits."""
    assert (
        json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "DDPMWuerstchenScheduler"
    )
    p = engine.pipelines
    assert type(p.prior.scheduler) is WuerstchenScheduler and type(p.decoder.scheduler) is WuerstchenScheduler
    assert p.prior.scheduler is not p.decoder.scheduler  # each keeps its own timesteps while sampling


def test_pinned_revisions_per_repo(hub_cache):
    with pytest.raises(ModelNotFoundError, match="--prior-revision v2 --decoder-revision v2"):
        resolve_model("full", revisions={PRIOR_REPO: "v2", DECODER_REPO: "v2"}, cache_dir=hub_cache)
    prior_repo = hub_cache / "models--stabilityai--stable-cascade-prior"
    decoder_repo = hub_cache / "models--stabilityai--stable-cascade"
    for repo in (prior_repo, decoder_repo):
        (repo / "refs" / "v2").write_text((repo / "refs" / "main").read_text())
    try:
        both = {PRIOR_REPO: "v2", DECODER_REPO: "v2"}
        assert resolve_model("full", revisions=both, cache_dir=hub_cache).identity.preset == "full"
        # A commit names one repo: each repo takes its own.
        source = resolve_model("full", revisions={PRIOR_REPO: "a" * 40, DECODER_REPO: "b" * 40}, cache_dir=hub_cache)
        assert source.identity.revisions == {PRIOR_REPO: "a" * 40, DECODER_REPO: "b" * 40}
        with pytest.raises(ModelNotFoundError, match=f"stabilityai/stable-cascade at {'a' * 40}: decoder"):
            resolve_model("full", revisions={DECODER_REPO: "a" * 40}, cache_dir=hub_cache)
    finally:
        for repo in (prior_repo, decoder_repo):
            (repo / "refs" / "v2").unlink()
    with pytest.raises(ModelConfigError, match="is a commit of one repo"):
        repo_revisions("c" * 40)
    assert repo_revisions("v1", decoder_revision="d" * 40) == {PRIOR_REPO: "v1", DECODER_REPO: "d" * 40}


def test_missing_weights_say_what_size_and_how(tmp_path, tiny_model_dir, hub_cache):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("full", cache_dir=tmp_path)
    msg = str(err.value)
    assert "stabilityai/stable-cascade-prior: prior (7.2 GB)" in msg
    assert "stabilityai/stable-cascade: decoder (3.1 GB), vqgan, text_encoder (1.4 GB), tokenizer, scheduler" in msg
    assert "about 11.8 GB in all" in msg and "cascade-studio download full" in msg

    # An fp32-only prior counts: it is loaded and cast (the official Stage A may have no bf16 file at all).
    write_hub_snapshot(tmp_path, "stabilityai/stable-cascade-prior", "c" * 40, tiny_model_dir, ["prior"])
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("full", cache_dir=tmp_path)
    assert "stable-cascade-prior" not in str(err.value) and "about 4.6 GB in all" in str(err.value)
    subfolders = ["decoder", "vqgan", "text_encoder", "tokenizer", "scheduler"]
    write_hub_snapshot(tmp_path, "stabilityai/stable-cascade", "d" * 40, tiny_model_dir, subfolders)
    source = resolve_model("full", cache_dir=tmp_path)
    assert source.weights["prior"].variant is None and source.identity.variant is None
    engine = CascadeEngine.from_settings(Settings(model="full", cache_dir=tmp_path, device="cpu", dtype="bf16"))
    assert engine.pipelines.prior.prior.dtype == torch.bfloat16  # the fp32 files, cast as they load
    assert engine(small_request(seed=2, width=128, height=128)).images[0].size == (128, 128)


def test_each_preset_fetches_its_own_components_only():
    full, lite = PRESETS["full"].components(), PRESETS["lite"].components()
    assert lite["prior"] == (PRIOR_REPO, "prior_lite") and lite["decoder"] == (DECODER_REPO, "decoder_lite")
    assert full["prior"] == (PRIOR_REPO, "prior") and full["text_encoder"] == (DECODER_REPO, "text_encoder")
    assert set(PRESETS["full"].by_repo()[PRIOR_REPO]) == {"prior"}  # one text encoder, from the decoder repo
    assert "image_encoder" in PRESETS["full"].components(image_prompts=True)
    assert PRESETS["full"].approx_gb() > PRESETS["lite"].approx_gb()


def test_local_folder_missing_component(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "vqgan")
    with pytest.raises(ModelNotFoundError, match=r"model folder .* is missing vqgan"):
        resolve_model(str(folder))


def test_pickled_weights_are_never_loaded(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "prior" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelNotFoundError, match="missing prior.*pickled .bin weights are never loaded"):
        resolve_model(str(folder))


def test_unknown_model_spec():
    with pytest.raises(
        ModelNotFoundError, match="neither auto, demo, a preset \\(full, lite\\) nor an existing folder"
    ):
        resolve_model("/no/such/folder")


def test_scheduler_outside_the_allowlist_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text()) | {"_class_name": "EvilScheduler"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="'EvilScheduler', which is not one of the known schedulers"):
        load_pipelines(resolve_model(str(folder)), torch.device("cpu"), torch.float32)


def test_device_and_dtype_choices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelConfigError, match="fp16 is not supported: the Stable Cascade prior overflows"):
        resolve_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ModelConfigError, match="device: 'potato' is not a torch device"):
        resolve_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(ModelConfigError, match="torch sees no CUDA GPU"):
            resolve_device("cuda")


def test_cpu_offload_needs_a_gpu(tiny_model_dir):
    with pytest.raises(ModelConfigError, match="cpu_offload: needs a CUDA device"):
        load_pipelines(resolve_model(str(tiny_model_dir)), torch.device("cpu"), torch.float32, cpu_offload=True)
