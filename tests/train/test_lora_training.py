"""LoRA training end to end, in a few steps: the CLI writes a kohya-format file with its metadata, loss plot,
samples and checkpoints, resumes from a checkpoint, and the result generates and lists; captions and bad datasets;
a cancelled training leaves a checkpoint and the base model untouched; the official layout trains through
Stability's EfficientNet encoder."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cascade_studio.cli import main
from cascade_studio.config import Settings
from cascade_studio.engine import CancelToken, CascadeEngine, GenerationCancelled
from cascade_studio.metadata import read_png
from cascade_studio.models.image_encoder import EfficientNetEncoder
from cascade_studio.models.lora import KOHYA_PREFIX, LoraLibrary, LoraStack
from cascade_studio.models.source import EFFNET_FILE
from cascade_studio.train.concepts import write_concept
from cascade_studio.train.lora import LoraTrainConfig, TrainingError, load_dataset, resolve, train_lora


def header(path) -> tuple[list[str], dict]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), dict(f.metadata())


def test_cli_trains_resumes_and_the_lora_generates(tmp_path, capsys):
    data = write_concept("teal", tmp_path / "teal", n=6)
    out = tmp_path / "loras" / "teal.safetensors"
    model = ["--model", "demo", "--threads", "2"]
    common = [*model, "--out", str(tmp_path / "outputs")]
    train = ["train-lora", str(data), "--steps", "6", "--batch", "2", "--rank", "4", "--preserve", "2", *model]
    assert main([*train, "--out", str(out), "--sample-every", "3", "--save-every", "4"]) == 0
    keys, meta = header(out)
    assert keys and all(
        re.fullmatch(r"lora_(prior_unet|unet|prior_te)_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in keys
    )
    # The demo model's defaults adapt the prior, Stage B and the text encoder (its Stage B reads shape from words).
    adapted = {role for role, prefix in KOHYA_PREFIX.items() if any(k.startswith(prefix) for k in keys)}
    assert adapted == {"prior", "decoder", "text_encoder"}
    assert meta["cascade_studio.base_model"] == "cascade-studio-demo" and meta["cascade_studio.rank"] == "4"
    assert meta["cascade_studio.steps"] == "6" and len(meta["cascade_studio.dataset_hash"]) == 12
    assert json.loads(meta["cascade_studio.base_identity"])["preset"] == "demo"
    assert meta["cascade_studio.adapts"] == "lora_prior_unet,lora_unet,lora_prior_te"  # what was trained
    assert meta["cascade_studio.decoder_min_t"] == "0.3"  # the demo's: Stage B learnt where shape is decided
    assert out.with_suffix(".loss.png").is_file() and (tmp_path / "loras" / "teal.sample-3.png").is_file()
    checkpoint = tmp_path / "loras" / "teal-step4.resume.safetensors"
    assert checkpoint.is_file() and (tmp_path / "loras" / "teal-step4.safetensors").is_file()
    log = capsys.readouterr().err
    assert "dataset: 6 pictures" in log and "already the right size" in log

    resumed = tmp_path / "loras" / "teal-more.safetensors"
    more = ["train-lora", str(data), "--steps", "8", "--batch", "2", "--rank", "4", "--preserve", "0", *model]
    more += ["--out", str(resumed)]
    assert main([*more, "--rank", "8", "--resume", str(checkpoint)]) == 2  # set up otherwise: refused, by its settings
    assert "resume: teal-step4.safetensors was trained with other settings (rank 4, trigger (none)" in (
        capsys.readouterr().err
    )
    assert main([*more, "--resume", str(checkpoint)]) == 0
    assert "resuming from step 4" in capsys.readouterr().err and header(resumed)[1]["cascade_studio.steps"] == "8"

    (tmp_path / "outputs" / "loras").mkdir(parents=True)
    shutil.copy(out, tmp_path / "outputs" / "loras")  # into the LoRA folder: by name from now on
    (tmp_path / "outputs" / "loras" / "teal.json").write_text('{"preferred weight": 0.75}')  # A1111's, beside it
    assert main(["loras", "--out", str(tmp_path / "outputs")]) == 0
    assert re.search(
        r"teal\s+sha256:[0-9a-f]{12}\s+kohya, adapts decoder, prior, text_encoder.*, preferred weight 0.75\n",
        capsys.readouterr().out,
    )
    gen = ["generate", "a large teal circle in the centre on a white background", "--seed", "1", *common]
    assert main([*gen, "--lora", "teal:0.8", "--lora", f"{resumed}:0.5"]) == 0
    png = sorted((tmp_path / "outputs").rglob("*.png"))[-1]
    request = read_png(png).request
    assert [(lora.name, lora.weight) for lora in request.loras] == [("teal", 0.8), ("teal-more", 0.5)]
    assert all(lora.sha256 for lora in request.loras)

    # reproduce: bit-identical while the files are there; which one is missing, when one is not.
    folder = ["--lora-dir", str(tmp_path / "outputs" / "loras")]
    assert main(["reproduce", str(png), "--lora", str(resumed), *folder, "--out", str(tmp_path / "r")]) == 0
    assert "identical pixels" in capsys.readouterr().err
    assert main(["reproduce", str(png), *folder, "--out", str(tmp_path / "r2")]) == 2
    assert "made with the LoRA(s) teal-more (sha256:" in capsys.readouterr().err


def test_captions_the_trigger_and_sizes(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (300, 200), "red").save(folder / "wide.png")
    Image.new("RGB", (256, 256), "blue").save(folder / "square.jpg")
    (folder / "square.txt").write_text("a blue square")
    lines = []
    with pytest.raises(TrainingError, match=r"images: wide.png has no caption \(wide.txt\) and no --trigger"):
        load_dataset(folder, None, 256, square_only=False, log=lines.append)
    examples = load_dataset(folder, "zzv", 512, square_only=False, log=lines.append)
    assert {e.source.name: e.caption for e in examples} == {"square.jpg": "zzv a blue square", "wide.png": "zzv"}
    assert {e.source.name: e.image.size for e in examples} == {"square.jpg": (512, 512), "wide.png": (640, 384)}
    assert "2 resized (1 of them cropped" in lines[-1] and "0 already the right size" in lines[-1]
    (folder / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(TrainingError, match="images: broken.png is not a picture"):
        load_dataset(folder, "zzv", 256, square_only=False, log=lines.append)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="holds no .png"):
        load_dataset(tmp_path / "empty", "x", 256, square_only=False, log=lines.append)


def test_a_cancelled_training_checkpoints_and_leaves_the_model_as_it_was(tmp_path, demo_engine):
    data = write_concept("cross", tmp_path / "cross", n=4)
    prior = demo_engine.pipelines.prior.prior
    before = {k: v.clone() for k, v in prior.state_dict().items()}
    cancel, lines = CancelToken(), []

    def stop_at_3(p) -> None:
        if p.step == 3:
            cancel.cancel()

    cfg = LoraTrainConfig(images=data, out=tmp_path / "cross.safetensors", steps=50, batch=2, rank=2, preserve=0)
    with pytest.raises(GenerationCancelled):
        train_lora(demo_engine, cfg, log=lines.append, progress=stop_at_3, cancel=cancel)
    assert (tmp_path / "cross-step3.safetensors").is_file() and (tmp_path / "cross-step3.resume.safetensors").is_file()
    assert any("Resume with: cascade-studio train-lora" in line for line in lines)
    after = prior.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_the_official_layout_trains_through_the_efficientnet_encoder(tmp_path, tiny_model_dir):
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model)
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file(EfficientNetEncoder().state_dict(), str(model / EFFNET_FILE))  # random, laid out as Stability's
    engine = CascadeEngine.from_settings(Settings(model=str(model), device="cpu"))
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, colour in enumerate(("red", "green")):
        Image.new("RGB", (256, 384), colour).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} picture")
    lines: list[str] = []
    cfg = LoraTrainConfig(images=folder, out=tmp_path / "o.safetensors", steps=2, resolution=256, preserve=2)
    summary = train_lora(engine, cfg, log=lines.append)
    # No trigger word to take out of the captions and no model domain to draw from: said, not guessed.
    assert any("preservation: skipped (it needs a trigger word" in line for line in lines)
    keys, meta = header(summary["file"])
    assert keys and all(k.startswith("lora_prior_unet_") for k in keys)  # the official default: the prior only
    assert meta["cascade_studio.resolution"] == "256" and summary["steps"] == 2


def test_preservation_pictures_come_from_the_base_model_without_the_trigger_word(tmp_path, demo_engine):
    data = write_concept("teal", tmp_path / "teal", n=4)
    out = tmp_path / "teal.safetensors"
    lines: list[str] = []
    cfg = LoraTrainConfig(images=data, out=out, trigger="teal", steps=2, batch=2, rank=2, preserve=3)
    train_lora(demo_engine, cfg, log=lines.append)
    said = next(line for line in lines if line.startswith("preservation:"))
    assert "drew 3 pictures" in said
    example = re.search(r"such as '([^']*)'", said)[1]  # the demo model's own scenes, never the new word
    assert "teal" not in example.split() and example.endswith("background")
    assert header(out)[1]["cascade_studio.preservation_pictures"] == "3"

    lines.clear()
    cfg.preserve_prompts, cfg.preserve = ["a blue square on a white background"], 1
    train_lora(demo_engine, cfg, log=lines.append)
    assert any("such as 'a blue square on a white background'" in line for line in lines)


def test_a_heavier_preservation_weight_changes_pictures_without_the_word_less(tmp_path, demo_engine):
    """--preserve-weight (kohya's prior_loss_weight): the same training, held harder to the base model's own
    predictions, moves what the model draws for prompts without the trigger word less."""
    data = write_concept("cross", tmp_path / "cross", n=4)
    prompts = [f"a large {c} square in the centre on a white background" for c in ("red", "blue", "yellow")]

    def pictures(loras: list[dict]) -> np.ndarray:
        made = [
            demo_engine(demo_engine.request(prompt=p, seed=i, loras=loras)).images[0] for i, p in enumerate(prompts)
        ]
        return np.stack([np.asarray(image, dtype=np.float32) for image in made])

    base, moved = pictures([]), {}
    saved, demo_engine.lora_library = demo_engine.lora_library, LoraLibrary(tmp_path)  # this test's own folder
    try:
        for weight in (1.0, 30.0):
            out = tmp_path / f"cross-{weight:g}.safetensors"
            cfg = LoraTrainConfig(
                images=data, out=out, trigger="cross", steps=12, batch=2, rank=4, preserve=2, preserve_weight=weight
            )
            train_lora(demo_engine, cfg, log=lambda _: None)
            meta = header(out)[1]
            assert meta["cascade_studio.preservation_weight"] == meta["ss_prior_loss_weight"] == str(weight)
            moved[weight] = float(np.abs(pictures([{"name": out.stem, "weight": 1}]) - base).mean())
    finally:
        demo_engine.remove_loras()
        demo_engine.lora_library = saved
    assert 0 < moved[30.0] < moved[1.0], moved


def test_stage_b_learns_your_pictures_where_shape_is_decided_and_is_kept_at_every_step(tmp_path, demo_engine):
    """The demo's recipe (bench/lora_recipes.py measured why): Stage B learns the user's pictures at noise levels
    t >= 0.3 only, leaving the last steps (edges, corners) to the base model, while preservation holds it to
    the base model at every step; the preservation prompts are the model's scenes, every other one in its caption
    phrasings."""
    import random

    from cascade_studio.train.lora import _batch_loss, domain_prompts, encode_dataset, kept_loss

    prompts = domain_prompts(demo_engine, 20, 0)
    assert all(p.endswith("background") for p in prompts[::2]) and sum(p.endswith("background") for p in prompts) < 20
    data = write_concept("cross", tmp_path / "cross", n=4)
    cfg = resolve(LoraTrainConfig(images=data, out=tmp_path / "o.safetensors", trigger="cross"), demo_engine)
    encoded = encode_dataset(demo_engine, load_dataset(data, "cross", 128, True, log=lambda _: None), True)
    p = demo_engine.pipelines
    models, seen = {"prior": p.prior.prior, "decoder": p.decoder.decoder}, []
    hook = p.decoder.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            _batch_loss(demo_engine, models, encoded, rng, cfg, generator, True, 0.1)
            yours = torch.cat(seen)
            kept_loss(demo_engine, models, encoded, rng, cfg, generator, True)
    finally:
        hook.remove()
    assert cfg.decoder_min_t == 0.3 and len(yours) == cfg.batch and yours.min() >= 0.3
    assert torch.cat(seen[1:]).min() < 0.3  # preservation's, every step
    with pytest.raises(TrainingError, match=r"decoder_min_t: must be from 0 up to \(not including\) 1 \(got 1.0\)"):
        resolve(LoraTrainConfig(images=data, out=tmp_path / "o.safetensors", decoder_min_t=1.0), demo_engine)


def test_a_bad_rank_is_said_once_as_the_rank(tmp_path, demo_engine):
    """alpha left to the rank's (scale 1) is not a second error of the user's; an alpha they gave is checked."""
    data = write_concept("teal", tmp_path / "teal", n=2)
    with pytest.raises(TrainingError) as refused:
        resolve(LoraTrainConfig(images=data, out=tmp_path / "o.safetensors", rank=0), demo_engine)
    assert str(refused.value) == "rank: must be a whole number from 1 to 256 (got 0)"
    with pytest.raises(TrainingError, match=r"^rank: .*; alpha: must be above 0 and at most 1024 \(got 0.0\)$"):
        resolve(LoraTrainConfig(images=data, out=tmp_path / "o.safetensors", rank=0, alpha=0.0), demo_engine)


def test_8bit_adam_off_cuda_is_refused_saying_why(tmp_path, demo_engine):
    data = write_concept("teal", tmp_path / "teal", n=2)
    cfg = LoraTrainConfig(images=data, out=tmp_path / "o.safetensors", steps=1, batch=2, preserve=0)
    cfg.optimizer = "adamw8bit"
    with pytest.raises(TrainingError, match="optimizer: adamw8bit runs on CUDA only"):
        train_lora(demo_engine, cfg, log=lambda line: None)
    cfg.optimizer = "sgd"
    with pytest.raises(TrainingError, match="optimizer: must be adamw or adamw8bit"):
        train_lora(demo_engine, cfg, log=lambda line: None)
    assert not demo_engine.loras.active and not any(
        "lora_A" in n for n, _ in demo_engine.pipelines.prior.prior.named_parameters()
    )


def test_the_same_settings_train_the_same_lora(tmp_path, demo_engine):
    """The adapter starts from the seed, as the batches and noise do: a training repeats exactly."""
    from safetensors.torch import load_file

    data = write_concept("cross", tmp_path / "cross", n=3)
    files = []
    for name in ("a", "b"):
        cfg = LoraTrainConfig(images=data, out=tmp_path / f"{name}.safetensors", steps=2, batch=2, rank=2, preserve=0)
        files.append(load_file(train_lora(demo_engine, cfg, log=lambda line: None)["file"]))
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_a_text_encoder_lora_learns_there_and_leaves_the_encoder_as_it_was(tmp_path, demo_engine):
    data = write_concept("teal", tmp_path / "teal", n=4)
    text_encoder = demo_engine.pipelines.prior.text_encoder
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    base = demo_engine(demo_engine.request(prompt="a teal circle on a white background", seed=2)).images[0]
    out = tmp_path / "teal.safetensors"
    cfg = LoraTrainConfig(images=data, out=out, trigger="teal", steps=6, batch=2, preserve=0, text_encoder=True)
    train_lora(demo_engine, cfg, log=lambda _: None)
    after = text_encoder.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    keys, meta = header(out)
    assert meta["cascade_studio.adapts"] == "lora_prior_unet,lora_unet,lora_prior_te"
    text_keys = [k for k in keys if k.startswith("lora_prior_te_text_model_encoder_layers_")]
    assert text_keys and any(k.endswith("self_attn_q_proj.lora_up.weight") for k in text_keys)
    saved, demo_engine.lora_library = demo_engine.lora_library, LoraLibrary(tmp_path)  # this test's own folder
    try:
        request = demo_engine.request(prompt="a teal circle on a white background", seed=2, loras=[{"name": "teal"}])
        with_lora = demo_engine(request).images[0]
        assert "text_encoder" in demo_engine.loras.roles and with_lora.tobytes() != base.tobytes()
    finally:
        demo_engine.remove_loras()
        demo_engine.lora_library = saved
    again = demo_engine(demo_engine.request(prompt="a teal circle on a white background", seed=2)).images[0]
    assert again.tobytes() == base.tobytes()  # off again: the text cache does not keep the LoRA's embeddings


def test_the_trigger_word_learns_its_own_tokens_and_prompts_without_it_read_as_before(tmp_path, demo_engine):
    """--trigger-embedding: the trigger's own token rows learn (textual inversion beside the LoRA), bundled in the
    file as bundle_emb.<word>.clip_g; loaded, a prompt without the word is read exactly as by the base model, one
    with it is not; the text encoder is as it was after training and after unloading."""
    from cascade_studio.train.lora import encode_text

    data = write_concept("cross", tmp_path / "cross", n=4)
    text_encoder = demo_engine.pipelines.prior.text_encoder
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    prompts = ["a red square on a white background", "a red cross on a white background"]
    with torch.no_grad():
        base = encode_text(demo_engine, prompts)
    out, lines = tmp_path / "cross.safetensors", []
    cfg = LoraTrainConfig(
        images=data, out=out, trigger="cross", steps=6, batch=2, preserve=0, text_encoder=False, trigger_embedding=True
    )
    train_lora(demo_engine, cfg, log=lines.append)
    after = text_encoder.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert any(line.startswith("trigger embedding: 'cross' is read as 5 token(s) (c r o s s</w>)") for line in lines)
    keys, meta = header(out)
    assert "bundle_emb.cross.clip_g" in keys and not any(k.startswith("lora_prior_te_") for k in keys)
    assert meta["cascade_studio.trigger_embedding"] == "true"
    assert meta["cascade_studio.adapts"] == "lora_prior_unet,lora_unet"

    weights = demo_engine.read_lora(out)
    assert len(weights.token_values) == 5
    try:
        with demo_engine.layers_lock, torch.no_grad():
            demo_engine.loras.activate([(weights, 1.0)])
            hidden, pooled = encode_text(demo_engine, prompts)
    finally:
        demo_engine.remove_loras()
    assert torch.equal(hidden[0], base[0][0]) and torch.equal(pooled[0], base[1][0])
    assert not torch.equal(hidden[1], base[0][1])
    after = text_encoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())

    with pytest.raises(TrainingError, match=r"trigger_embedding: must be off without a trigger word"):
        train_lora(demo_engine, LoraTrainConfig(images=data, out=out, trigger_embedding=True), log=lambda _: None)


def test_adapters_off_gives_the_base_model_and_switches_back(demo_engine):
    """The teacher of preservation: inside `adapters_off` the adapted prior predicts exactly what the base prior
    does; outside, the trained adapter acts again and still learns."""
    from cascade_studio.train.lora import ADAPTER, adapters_off, add_adapter

    prior = demo_engine.pipelines.prior.prior
    x, t = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5])
    hidden, pooled = torch.randn(1, 24, 64), torch.randn(1, 1, 64)
    image = torch.zeros(1, 1, 16)
    with torch.no_grad():
        base = prior(x, t, clip_text_pooled=pooled, clip_text=hidden, clip_img=image).sample
    stack = LoraStack({"prior": prior})
    try:
        params = add_adapter(prior, rank=2, alpha=2)
        with torch.no_grad():
            for module in prior.modules():
                if hasattr(module, "lora_B") and ADAPTER in module.lora_B:
                    module.lora_B[ADAPTER].weight.fill_(0.05)
            adapted = prior(x, t, clip_text_pooled=pooled, clip_text=hidden, clip_img=image).sample
            with adapters_off({"prior": prior}):
                off = prior(x, t, clip_text_pooled=pooled, clip_text=hidden, clip_img=image).sample
        assert torch.equal(off, base) and not torch.allclose(adapted, base, atol=1e-3)
        assert params and all(p.requires_grad for p in params)
    finally:
        stack.unload()
