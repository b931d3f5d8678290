"""The training command end to end, at a few steps per stage: its folder loads and generates like any model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableCascadeUNet
from safetensors.torch import load_file

from cascade_studio.cli import main
from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.engine.inputs import from_image
from cascade_studio.models.source import DEMO_DIR
from cascade_studio.train.run import SHIPPED_RECIPE, TrainConfig, train_demo


def tiny_config() -> TrainConfig:
    return TrainConfig(
        steps_a=2,
        steps_a_decoder=2,
        steps_b=2,
        steps_b_text=2,
        b_text_rounds=(2,),  # as the shipped recipe: a second round, on fresh scenes
        steps_a_decoder_plain=2,
        steps_c=2,
        steps_c_image=2,
        steps_c_low_noise=2,
        steps_previewer=2,
        decoder_scenes=16,
        prior_scenes=16,
        image_scenes=16,
        low_noise_scenes=16,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "demo"
    logs: list[str] = []
    return out, train_demo(out, tiny_config(), log=logs.append), logs


def test_train_demo_writes_a_loadable_model(trained):
    out, report, logs = trained
    stages = {"stage A", "stage B", "stage C", "stage B text", "previewer", "stage A decoder", "image tower"}
    assert stages | {"stage C low noise"} == set(report["final_losses"])
    assert any(line.startswith("stage C low noise step 2/2 loss") for line in logs)
    assert any(line.startswith("stage C step 2/2 loss") for line in logs)
    assert sum(line.startswith("stage B text step 2/2 loss") for line in logs) == 2  # two rounds
    assert sum(line.startswith("stage A decoder step 2/2 loss") for line in logs) == 2  # plain, then any colour
    assert len(report["losses"]["stage B text"]) == len(report["losses"]["stage A decoder"]) == 4
    assert (out / "loss.png").is_file()
    assert (out / "image_encoder" / "config.json").is_file()  # for `eval-demo --stage decoder`
    card = json.loads((out / "cascade_studio.json").read_text())
    assert card["name"] == "cascade-studio-demo" and card["defaults"]["width"] == 128
    assert (
        json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "VPredictionWuerstchenScheduler"
    )
    # The same loading and generation code as the official weights; the folder's defaults apply.
    engine = CascadeEngine.from_settings(Settings(model=str(out), device="cpu"))
    assert engine.pipelines.previewer is not None
    result = engine(engine.request(prompt="a red circle on a white background", seed=0, prior_steps=2, decoder_steps=2))
    assert result.images[0].size == (128, 128) and result.model.name == "cascade-studio-demo"


class Stop(Exception):
    """Stands for the run being killed (Ctrl-C, a reboot) partway through a part."""


def test_a_stopped_run_resumes_where_it_left_off_to_the_same_weights(trained, tmp_path):
    """The shipped recipe runs for hours: a run stopped in its second Stage B text round goes on from the
    checkpoint the first round left, with the random numbers it would have drawn, and ends bit for bit where the
    unstopped run (the fixture, same config) did."""
    out, seen = tmp_path / "demo", []

    def stop_in_the_second_round(line: str) -> None:
        seen.append(line)
        if sum(x.startswith("stage B text step") for x in seen) == 3:  # round 2, its first step
            raise Stop

    with pytest.raises(Stop):
        train_demo(out, tiny_config(), log=stop_in_the_second_round)
    assert not (out / "decoder").exists() and (out / "checkpoint" / "decoder").is_dir()
    assert main(["train-demo", "--out", str(out)]) == 2  # a fresh run would throw the stopped one away
    assert main(["train-demo", "--out", str(tmp_path / "none"), "--resume"]) == 2
    # A run killed between the two renames of a save has only the previous checkpoint, moved aside: it goes on from it.
    (out / "checkpoint").rename(out / "checkpoint.old")

    assert main(["train-demo", "--out", str(out), "--resume"]) == 0
    assert not [p for p in out.iterdir() if p.name.startswith("checkpoint")]  # a finished run keeps no checkpoint
    shipped = sorted(p.relative_to(trained[0]) for p in trained[0].rglob("*.safetensors"))
    assert shipped == sorted(p.relative_to(out) for p in out.rglob("*.safetensors")) and len(shipped) == 7
    for path in shipped:
        a, b = load_file(trained[0] / path), load_file(out / path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    for path in trained[0].glob("*/config.json"):  # no checkpoint path recorded in a component's config
        assert (out / path.relative_to(trained[0])).read_text() == path.read_text(), path
    card, unstopped = (json.loads((d / "cascade_studio.json").read_text()) for d in (out, trained[0]))
    assert card["losses"] == unstopped["losses"] and card["config"] == unstopped["config"]
    # The card says the run was resumed, after which part and on what (its times are the parts' own).
    assert "resumed" not in unstopped
    assert [{k: r[k] for k in ("after", "device", "threads")} for r in card["resumed"]] == [
        {"after": "stage B text round 1", "device": "cpu", "threads": unstopped["threads"]}
    ]


def test_a_fresh_run_trains_each_stage_for_the_steps_the_shipped_model_had():
    """`train-demo` without --quick is the shipped model's recipe: the steps its card sums over all its runs."""
    card = json.loads((DEMO_DIR / "cascade_studio.json").read_text())["config"]
    cfg = TrainConfig(**SHIPPED_RECIPE)
    assert cfg.steps_b_text + sum(cfg.b_text_rounds) == card["steps_b_text"] == 103_500
    assert cfg.steps_a_decoder_plain + cfg.steps_a_decoder == card["steps_a_decoder"] == 11_000
    for key in ("steps_a", "steps_b", "steps_c", "steps_previewer", "steps_c_image", "prior_scenes", "batch_c"):
        assert getattr(cfg, key) == card[key], key


def _mapper_weight(folder):
    return StableCascadeUNet.from_pretrained(folder / "decoder").clip_txt_pooled_mapper.weight


def test_from_adds_the_text_stage_to_a_model_trained_without_it(trained, tmp_path):
    # A model as the recipe left it before "stage B text" existed: no such stage on its card, the decoder's
    # pooled-text mapper at zero (text ignored).
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(trained[0], old)
    card = json.loads((old / "cascade_studio.json").read_text())
    for key in ("seconds", "losses", "final_losses"):
        del card[key]["stage B text"]
    (old / "cascade_studio.json").write_text(json.dumps(card))
    decoder = StableCascadeUNet.from_pretrained(old / "decoder")
    decoder.clip_txt_pooled_mapper.weight.data.zero_()
    decoder.save_pretrained(old / "decoder")

    assert main(["train-demo", "--from", str(old), "--out", str(new), "--scale", "0.0002"]) == 0
    assert "stage B text" in json.loads((new / "cascade_studio.json").read_text())["final_losses"]
    assert _mapper_weight(new).abs().sum() > 0  # the decoder now reads the caption
    assert _mapper_weight(old).abs().sum() == 0  # the source folder is left as it was
    engine = CascadeEngine.from_settings(Settings(model=str(new), device="cpu"))
    assert engine(engine.request(prompt="two blue squares", seed=1, prior_steps=2, decoder_steps=2)).images


def _decoder_weights(folder):
    return load_file(folder / "decoder" / "diffusion_pytorch_model.safetensors")


def test_from_trains_a_text_trained_decoder_on_and_sums_its_steps(trained, tmp_path):
    src, again = trained[0], tmp_path / "again"
    before, old = json.loads((src / "cascade_studio.json").read_text()), _decoder_weights(src)
    assert (
        main(
            [
                "train-demo",
                "--from",
                str(src),
                "--out",
                str(again),
                "--seed",
                "1",
                "--scale",
                "0.0004",
                "--text-lr",
                "1e-4",
            ]
        )
        == 0
    )
    card = json.loads((again / "cascade_studio.json").read_text())
    assert card["config"]["steps_b_text"] == before["config"]["steps_b_text"] + 2  # 2,500 x 0.0004 more steps
    assert len(card["losses"]["stage B text"]) == len(before["losses"]["stage B text"]) + 2
    assert card["added_later"][-1] | {"seconds": 0} == {
        "by": "cascade-studio train-demo --from --stage b-text",
        "stage": "stage B text",
        "continued": True,
        "seed": 1,
        "scale": 0.0004,
        "steps": 2,
        "lr": 1e-4,
        "decoder_scenes": 4,
        "seconds": 0,
        "device": "cpu",
        "threads": 2,
    }
    new = _decoder_weights(again)
    assert any(not torch.equal(old[k], new[k]) for k in old)  # the decoder trained on
    assert all(torch.equal(old[k], w) for k, w in _decoder_weights(src).items())  # the source is left as it was
    for part in ("prior", "vqgan", "text_encoder", "image_encoder", "previewer"):  # the other stages are kept
        for file in (src / part).iterdir():
            assert (again / part / file.name).read_bytes() == file.read_bytes()


def test_from_stage_a_decoder_trains_only_stage_a_decoder_half(trained, tmp_path):
    """The encoder half is what made every latent the other stages learnt on: it must not move."""
    src, again = trained[0], tmp_path / "again"
    before = json.loads((src / "cascade_studio.json").read_text())
    assert (
        main(
            [
                "train-demo",
                "--from",
                str(src),
                "--out",
                str(again),
                "--stage",
                "a-decoder",
                "--seed",
                "2",
                "--scale",
                "0.003",
            ]
        )
        == 0
    )
    old = load_file(src / "vqgan" / "diffusion_pytorch_model.safetensors")
    new = load_file(again / "vqgan" / "diffusion_pytorch_model.safetensors")
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.startswith(("up_blocks.", "out_block.")) for k in changed), changed
    assert json.loads((again / "vqgan" / "config.json").read_text()) == json.loads(
        (src / "vqgan" / "config.json").read_text()
    )  # no machine path, the same latent scale
    for part in ("prior", "decoder", "text_encoder", "image_encoder", "previewer"):
        for file in (src / part).iterdir():
            assert (again / part / file.name).read_bytes() == file.read_bytes()
    card = json.loads((again / "cascade_studio.json").read_text())
    assert card["config"]["steps_a_decoder"] == before["config"]["steps_a_decoder"] + 9  # 3,000 x 0.003 more
    assert card["added_later"][-1]["stage"] == "stage A decoder" and card["added_later"][-1]["continued"]
    assert card["added_later"][-1]["any_colour"] == 0.5
    engine = CascadeEngine.from_settings(Settings(model=str(again), device="cpu"))
    assert engine(engine.request(prompt="a red circle", seed=0, prior_steps=2, decoder_steps=2)).images


def test_from_stage_c_image_teaches_an_image_tower_and_leaves_text_prompts_as_they_were(trained, tmp_path):
    """Only the tower and the weight of the prior's image mapper learn, so a prompt without a picture gives the
    pixels it gave before; the new folder takes image prompts through the same code as the official tower."""
    src, again = trained[0], tmp_path / "again"
    assert main(["train-demo", "--from", str(src), "--out", str(again), "--stage", "c-image", "--scale", "0.002"]) == 0
    old = load_file(src / "prior" / "diffusion_pytorch_model.safetensors")
    new = load_file(again / "prior" / "diffusion_pytorch_model.safetensors")
    assert {k for k in old if not torch.equal(old[k], new[k])} == {"clip_img_mapper.weight"}
    card = json.loads((again / "cascade_studio.json").read_text())
    assert card["added_later"][-1]["stage"] == "image tower" and card["added_later"][-1]["continued"]

    before = CascadeEngine.from_settings(Settings(model=str(src), device="cpu"))
    engine = CascadeEngine.from_settings(Settings(model=str(again), device="cpu"))
    assert engine.pipelines.image_tower_path == again / "image_tower"
    text = dict(prompt="a red circle", seed=3, prior_steps=2, decoder_steps=2)
    assert engine(engine.request(**text)).images[0].tobytes() == before(before.request(**text)).images[0].tobytes()
    ref = from_image(engine(engine.request(**text)).images[0], "image_prompts.0.image")
    alone = engine.request(**(text | {"prompt": ""}), image_prompts=[{"image": ref.sha256}])
    assert engine(alone, pictures={ref.sha256: ref.image}).images[0].size == (128, 128)


def test_from_stage_c_low_noise_trains_the_prior_alone(trained, tmp_path):
    """Stage C low noise moves the prior and nothing else: the encoders keep every latent's and caption's meaning."""
    src, again = trained[0], tmp_path / "again"
    command = ["train-demo", "--from", str(src), "--out", str(again), "--stage", "c-low-noise", "--scale", "0.005"]
    assert main(command) == 0
    old = load_file(src / "prior" / "diffusion_pytorch_model.safetensors")
    new = load_file(again / "prior" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(old[k], new[k]) for k in old)
    for part in ("decoder", "vqgan", "text_encoder", "image_encoder", "previewer"):
        for file in (src / part).iterdir():
            assert (again / part / file.name).read_bytes() == file.read_bytes()
    run = json.loads((again / "cascade_studio.json").read_text())["added_later"][-1]
    assert (run["stage"], run["steps"], run["wrong_colour"], run["scenes"]) == ("stage C low noise", 3, 0.05, 100)
    engine = CascadeEngine.from_settings(Settings(model=str(again), device="cpu"))
    assert engine(engine.request(prompt="a red circle", seed=0, prior_steps=2, decoder_steps=2)).images


def test_stage_a_pictures_in_any_colour_keep_the_scene_and_change_only_its_two_colours():
    """Stage A's decoder also learns colours the scenes never use (a LoRA's new colour needs them drawn); the swap
    keeps each scene's drawing, and with no share asked for, the pictures and random numbers are as before."""
    import random

    import numpy as np

    from cascade_studio.train.scenes import PALETTE
    from cascade_studio.train.stages import scene_images

    plain, scenes = scene_images(random.Random(3), 8, 64)
    assert torch.equal(scene_images(random.Random(3), 8, 64, any_colour=0.0)[0], plain)
    swapped, same_scenes = scene_images(random.Random(3), 8, 64, any_colour=1.0)
    assert same_scenes == scenes
    palette = {tuple(c) for c in PALETTE.values()}
    for before, after in zip(plain, swapped):
        b = before.permute(1, 2, 0).reshape(-1, 3)
        a = (after.permute(1, 2, 0).reshape(-1, 3) * 255).round()
        colours = {tuple(c) for c in a.int().tolist()}
        assert len(colours) == 2 and not colours & palette  # two new colours (a draw from 16 M never hits the 8)
        # the same pixels share a colour before and after: the drawing is the scene's
        _, groups_before = np.unique(b.numpy(), axis=0, return_inverse=True)
        _, groups_after = np.unique(a.numpy(), axis=0, return_inverse=True)
        assert len(set(zip(groups_before.ravel().tolist(), groups_after.ravel().tolist()))) == 2


def test_from_stage_c_words_adds_words_as_the_ones_they_stand_for_and_trains_the_prior(tmp_path):
    """The words the captions gained ("ball", "box", "violet", "an", "one") join the shipped model's tokenizer after
    every id it had, each with the embedding of the word it stands for, and the rest of the text encoder stays: every
    prompt it could read is read as before. Then only the prior learns: the decoder, Stage A and the image tower stay
    as they were."""
    from transformers import CLIPTokenizer

    from cascade_studio.models.source import DEMO_DIR
    from cascade_studio.train.run import WORDS_ADDED

    src, again = tmp_path / "src", tmp_path / "again"
    shutil.copytree(DEMO_DIR, src)
    command = ["train-demo", "--from", str(src), "--out", str(again), "--stage", "c-words", "--scale", "0.002"]
    assert main(command) == 0
    before, after = CLIPTokenizer.from_pretrained(src / "tokenizer"), CLIPTokenizer.from_pretrained(again / "tokenizer")
    for prompt in ("a large red triangle in the centre on a black background", "three small squares at the top"):
        assert after(prompt).input_ids == before(prompt).input_ids
    for word in WORDS_ADDED:
        assert after.tokenize(word) == [f"{word}</w>"]
    old, new = (load_file(f / "text_encoder" / "model.safetensors") for f in (src, again))
    rows = "text_model.embeddings.token_embedding.weight"
    assert all(torch.equal(old[k], new[k]) for k in old if k != rows)
    assert torch.equal(new[rows][: len(before)], old[rows])
    for word, plain in WORDS_ADDED.items():
        assert torch.equal(
            new[rows][after.convert_tokens_to_ids(f"{word}</w>")], new[rows][before.vocab[f"{plain}</w>"]]
        )
    run = json.loads((again / "cascade_studio.json").read_text())["added_later"][-1]
    assert run["stage"] == "stage C words" and run["steps"] == 2
    assert set(run["words_added"]) == {w for w in WORDS_ADDED if f"{w}</w>" not in before.get_vocab()}
    old, new = (load_file(f / "prior" / "diffusion_pytorch_model.safetensors") for f in (src, again))
    assert any(not torch.equal(old[k], new[k]) for k in old)
    for part in ("decoder", "vqgan", "image_encoder", "previewer", "image_tower/image_encoder"):
        for file in (src / part).iterdir():
            assert (again / part / file.name).read_bytes() == file.read_bytes(), (part, file.name)
    engine = CascadeEngine.from_settings(Settings(model=str(again), device="cpu"))
    assert engine(engine.request(prompt="An orange ball.", seed=0, prior_steps=2, decoder_steps=2)).images
