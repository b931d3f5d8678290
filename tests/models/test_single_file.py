"""Single-file checkpoints (Stability's original-format Stage C / Stage B, ComfyUI's bundled files) in place of a
model's prior or decoder: read by diffusers' converter, the architecture told apart by the file's shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableCascadeUNet
from safetensors.torch import save_file

from cascade_studio.cli import main
from cascade_studio.engine import CascadeEngine
from cascade_studio.metadata import read_png
from cascade_studio.models import ModelConfigError, load_pipelines, resolve_model
from cascade_studio.models.architectures import OFFICIAL
from cascade_studio.models.single_file import match_config, unet_keys
from tests.conftest import small_request
from tests.models.fake_hub import to_original


@pytest.fixture(scope="module")
def stage_files(tiny_model_dir, tmp_path_factory):
    """The tiny model's prior and decoder written as Stability's single files, and as a ComfyUI bundle."""
    out = tmp_path_factory.mktemp("single")
    prior = StableCascadeUNet.from_pretrained(tiny_model_dir / "prior")
    decoder = StableCascadeUNet.from_pretrained(tiny_model_dir / "decoder")
    save_file(to_original(prior.state_dict()), str(out / "stage_c.safetensors"))
    save_file(to_original(decoder.state_dict()), str(out / "stage_b.safetensors"))
    bundle = {f"model.diffusion_model.{k}": v for k, v in to_original(prior.state_dict()).items()}
    bundle |= {"text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": torch.ones(4)}
    save_file(bundle, str(out / "comfyui_stage_c.safetensors"))
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(out / "clip.safetensors"))
    return out


def test_original_format_files_load_as_the_prior_and_decoder(tiny_model_dir, stage_files, engine):
    source = resolve_model(
        str(tiny_model_dir),
        prior_file=stage_files / "stage_c.safetensors",
        decoder_file=stage_files / "stage_b.safetensors",
    )
    assert set(source.identity.files) == {"prior", "decoder"}
    assert source.identity.files["prior"].startswith("stage_c.safetensors sha256:")
    swapped = CascadeEngine(load_pipelines(source, torch.device("cpu"), torch.float32))
    for role in ("prior", "decoder"):
        ours = getattr(swapped.pipelines, role)
        base = getattr(engine.pipelines, role)
        a, b = getattr(ours, role).state_dict(), getattr(base, role).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    request = small_request(seed=4)
    assert np.array_equal(np.asarray(swapped(request).images[0]), np.asarray(engine(request).images[0]))


def test_a_comfyui_bundle_loads_when_its_keys_allow(tiny_model_dir, stage_files):
    source = resolve_model(str(tiny_model_dir), prior_file=stage_files / "comfyui_stage_c.safetensors")
    pipelines = load_pipelines(source, torch.device("cpu"), torch.float32)
    assert pipelines.prior.prior.config.block_out_channels == [32, 32]


def test_the_wrong_file_is_named_for_what_it_is(tiny_model_dir, stage_files):
    with pytest.raises(
        ModelConfigError,
        match=r"stage_b.safetensors is Stage B \(the decoder\); pass it as "
        r"--decoder-file",
    ):
        load_pipelines(
            resolve_model(str(tiny_model_dir), prior_file=stage_files / "stage_b.safetensors"),
            torch.device("cpu"),
            torch.float32,
        )
    with pytest.raises(
        ModelConfigError,
        match=r"clip.safetensors holds no Stage C or Stage B UNet \(its tensors "
        r"start with text_model\)",
    ):
        load_pipelines(
            resolve_model(str(tiny_model_dir), prior_file=stage_files / "clip.safetensors"),
            torch.device("cpu"),
            torch.float32,
        )
    with pytest.raises(ModelConfigError, match="is not a .safetensors file"):
        resolve_model(str(tiny_model_dir), prior_file=tiny_model_dir / "prior" / "config.json")


@pytest.mark.parametrize("role, name", [("prior", "full"), ("prior", "lite"), ("decoder", "full"), ("decoder", "lite")])
def test_full_and_lite_are_told_apart_by_their_shapes(role, name):
    """The official architectures, on the meta device (no weights made): each file matches its own config only."""
    with torch.device("meta"):
        model = StableCascadeUNet(**OFFICIAL[role][name])
    shapes = {k: tuple(v.shape) for k, v in to_original(model.state_dict()).items()}
    assert match_config(unet_keys(shapes, None, role), OFFICIAL[role], None, role) == name


def test_generate_records_the_file_and_reproduce_asks_for_it(tiny_model_dir, stage_files, tmp_path, capsys):
    args = [
        "--model",
        str(tiny_model_dir),
        "--width",
        "128",
        "--height",
        "128",
        "--prior-steps",
        "2",
        "--decoder-steps",
        "1",
        "--seed",
        "5",
    ]
    assert (
        main(
            [
                "generate",
                "a red circle",
                *args,
                "--prior-file",
                str(stage_files / "stage_c.safetensors"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    png = next(tmp_path.glob("*.png"))
    capsys.readouterr()
    assert read_png(png).model.files["prior"].startswith("stage_c.safetensors sha256:")
    assert main(["reproduce", str(png), "--out", str(tmp_path / "again")]) == 1
    err = capsys.readouterr().err
    assert "made with the prior file stage_c.safetensors (sha256:" in err and "--prior-file" in err
    assert (
        main(
            [
                "reproduce",
                str(png),
                "--prior-file",
                str(stage_files / "stage_c.safetensors"),
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert "identical pixels" in capsys.readouterr().err
