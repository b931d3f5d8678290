"""The GPU speed benchmark, run in its `--tiny` mode on the CPU: the script a GPU session runs must work first time."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableCascadeUNet
from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock

from cascade_studio.models.architectures import ARCHITECTURES, random_components
from tests import in_process

ROOT = Path(__file__).resolve().parents[1]
# Parameter counts of the released weights (shared/reference/anchor_h200_2026-11-26.json).
RELEASED = {
    "full": {"prior": 3_589_103_632, "decoder": 1_562_941_136, "text_encoder": 694_659_840, "vqgan": 18_406_894},
    "lite": {"prior": 1_030_785_040, "decoder": 699_471_248, "text_encoder": 694_659_840, "vqgan": 18_406_894},
}


def test_official_architectures_have_the_released_parameter_counts():
    """Built on the meta device (no memory): the benchmark times the real model sizes, not guesses."""
    for name, counts in RELEASED.items():
        parts = random_components(name, torch.device("meta"), torch.bfloat16)
        assert {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()} == counts, name
    assert set(ARCHITECTURES) == {"full", "lite", "tiny"}


def test_tiny_benchmark_writes_a_report_and_the_engine_matches_stock(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_speed.py"),
            "--tiny",
            "--runs",
            "1",
            "--variants",
            "stock",
            "engine",
            "--profile",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=480,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_speed-tiny-cpu.json").read_text())
    assert report["device"].startswith("cpu") and report["diffusers"] and report["matmul_peak_tflops"] > 0
    tiny = report["models"]["tiny"]
    for label in ("stock", "engine"):
        row = tiny[label]
        assert row["b1_s_per_image"] > 0 and row["b4_s_per_image"] > 0 and row["first_call_b1_s"] > 0
        assert row["utilisation_b1"] > 0
    assert tiny["stock"]["prior_s"] > 0 and tiny["stock"]["decoder_s"] > 0 and tiny["flops_per_image"] > 0
    assert tiny["engine"]["max_abs_diff_vs_stock"] == 0  # same seed, same images: the engine adds no drift
    assert tiny["engine"]["same_images_twice"]
    # The trained demo model, eager vs compiled blocks (fp32 on the CPU): compiled blocks reorder float arithmetic,
    # so a pixel may move by a level or two of 255, no more; the tolerance the README states.
    trained = report["trained_weights"]
    assert trained["images"] == 6 and trained["engine_compiled"]["max_abs_diff_255"] <= 2
    assert (tmp_path / "gpu_speed-tiny-cpu.png").stat().st_size > 0
    profile = (tmp_path / "gpu_speed-tiny-cpu-profile-tiny.txt").read_text()
    assert "aten::" in profile  # the kernel table
    parts = dict(re.findall(r"^(\w+) +([\d.]+) ms wall$", profile, re.MULTILINE))  # wall time per part of one image
    assert (
        set(parts) == {"text_encoder", "prior_unet", "prior_scheduler", "decoder_unet", "decoder_scheduler", "stage_a"}
        and float(parts["prior_unet"]) > 0
    )


def test_plot_draws_a_bar_for_every_variant(tmp_path):
    """The plot is the last thing a GPU run writes: a row it cannot draw would lose the run's summary."""
    from PIL import Image

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_speed import VARIANTS, plot

    rows = {label: {"b1_s_per_image": 1.0 + k, "b4_s_per_image": 0.5 + k} for k, label in enumerate(VARIANTS)}
    plot({"device": "test", "size": 1024, "settings": "s", "models": {"full": rows}}, tmp_path / "plot.png")
    assert Image.open(tmp_path / "plot.png").height == 40 + 2 * len(VARIANTS) * 26  # a 20 px bar + 6 px gap each


def forward_inputs(name: str, batch: int) -> dict[str, torch.Tensor]:
    if name == "prior":
        return dict(
            clip_text=torch.randn(batch, 77, 1280),
            clip_text_pooled=torch.randn(batch, 1, 1280),
            clip_img=torch.randn(batch, 1, 768),
        )
    return dict(clip_text_pooled=torch.randn(batch, 1, 1280), effnet=torch.randn(batch, 16, 24, 24))


@pytest.mark.parametrize("model", ["full", "lite"])
def test_block_benchmark_sizes_each_level_as_a_real_forward_runs_it(model):
    """gpu_blocks multiplies each level's unit by the side and count it reads off the config; a real forward of
    the official architecture at 1024² (on the meta device: shapes, no arithmetic) must run each level's
    ResBlocks at that side, that many times. The prior keeps 24×24 at both levels; the decoder halves."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_blocks import LATENT_SIDE, levels

    for index, name in enumerate(("prior", "decoder")):
        config, side = ARCHITECTURES[model][index], LATENT_SIDE[name]
        with torch.device("meta"):
            unet = StableCascadeUNet(**config).eval()
            seen: dict[int, list[int]] = {}
            top = len(unet.down_blocks) - 1
            up = ((top - j, blocks) for j, blocks in enumerate(unet.up_blocks))  # up blocks run deepest first
            for level, blocks in [*enumerate(unet.down_blocks), *up]:
                for block in blocks:
                    if isinstance(block, SDCascadeResBlock):
                        block.register_forward_pre_hook(
                            lambda module, args, level=level, seen=seen: seen.setdefault(level, []).append(
                                args[0].shape[-1]
                            )
                        )
            with torch.no_grad():
                unet(torch.randn(1, config["in_channels"], side, side), torch.rand(1), **forward_inputs(name, 1))
        assert sorted(seen) == list(range(top + 1)) and all(len(set(sides)) == 1 for sides in seen.values())
        assert [(sides[0], len(sides)) for _, sides in sorted(seen.items())] == levels(dict(unet.config), side)


def test_tiny_block_benchmark_reports_each_level(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_blocks.py"),
            "--tiny",
            "--options",
            "eager",
            "unit",
            "blocks_grn_split",
            "--batches",
            "1",
            "--repeat",
            "1",
            "--runs",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_blocks-tiny-cpu.json").read_text())
    rows = report["rows"]
    assert [(r["unet"], r["level"]) for r in rows] == [("prior", 0), ("prior", 1), ("decoder", 0), ("decoder", 1)]
    for row in rows:
        assert row["eager_ms"] > 0 and row["unit_ms"] > 0 and row["gflop_per_unit"] > 0
        assert row["eager_max_abs_diff"] == 0 and row["unit_max_abs_diff"] < 1e-4  # fp32: compiled matches eager
        assert row["blocks_grn_split_max_abs_diff"] < 1e-4  # the two-stage norm sums the same squares
    assert report["per_step_ms"]["tiny prior b1"]["eager"] == pytest.approx(
        sum(r["eager_ms_per_step"] for r in rows[:2])
    )


def test_decoder_denoise_scores_each_noise_level_and_split(tmp_path):
    """The diagnostic the model card cites runs on the shipped demo model and reports every t0 asked for."""
    out = tmp_path / "denoise.json"
    proc = in_process.script(ROOT / "bench" / "decoder_denoise.py", ["--n", "4", "--t0", "0.05", "1", "--out", out])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report["t0"]) == {"0.05", "1.0"}
    for levels in report["t0"].values():
        assert set(levels) == {"held-out", "training"} and len(levels) == 2
        for d in levels.values():
            assert 0 <= d["shape"] <= 1
    assert "t0 0.05" in proc.stdout and "t0 1.0" in proc.stdout


def test_decoder_oracle_trains_and_scores_the_asked_shapes(tmp_path):
    """The oracle-code diagnostic the model card cites trains a decoder and scores only the shapes it was asked for."""
    out = tmp_path / "oracle.json"
    args = ["--shapes", "square", "--steps", "3", "--scenes", "64", "--n", "3", "--out", out]
    args += ["--channels", "32", "64", "--patch-size", "1"]  # another decoder than the demo's
    proc = in_process.script(ROOT / "bench" / "decoder_oracle.py", args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["shapes"] == ["square"] and report["steps"] == 3 and len(report["losses"]) == 3
    assert report["decoder"] == {"block_out_channels": [32, 64], "patch_size": 1} and report["seconds_per_image"] > 0
    assert report["shape_right"] and set(report["shape_right"]) <= {"small square", "large square"}
    assert set(report["rates"]) == {"background", "colour", "position", "count", "shape"}
    assert "shape right: " in proc.stdout


def test_frozen_encoder_bench_teaches_an_encoder_and_scores_both_arms(tmp_path):
    """The frozen-encoder experiment the model card cites: each arm trains a decoder and is scored from true latents;
    the taught arms' encoder is taught first and its own head is scored on palette scenes of both splits."""
    out = tmp_path / "frozen.json"
    args = ["--steps", "3", "--encoder-steps", "3", "--scenes", "64", "--n", "2", "--seeds", "1", "--out", out]
    proc = in_process.script(ROOT / "bench" / "frozen_encoder.py", args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert list(report["arms"]) == ["joint", "frozen", "taught-joint"] and report["steps"] == 3
    for arm in report["arms"].values():
        assert len(arm["losses"]) == 3 and set(arm["splits"]) == {"held-out", "training"}
        assert set(arm["shape_probe"]) == {"held-out", "training"} and arm["minutes"] > 0
    for name in ("frozen", "taught-joint"):
        taught = report["arms"][name]
        assert len(taught["encoder_losses"]) == 3 and set(taught["head_shape_right"]) == {"held-out", "training"}
    assert set(report["arms"]["taught-joint"]["head_shape_right_after"]) == {"held-out", "training"}
    assert "frozen: the taught encoder's own head names the shape" in proc.stdout
    assert "taught-joint: the taught encoder's own head names the shape" in proc.stdout


def test_random_colours_never_make_a_held_out_pair():
    """The frozen arm's encoder sees no shape in a colour the analyser would name as a held-out pair with it."""
    import importlib.util

    from cascade_studio.train.analyze import nearest_colour
    from cascade_studio.train.scenes import HELD_OUT

    spec = importlib.util.spec_from_file_location("frozen_encoder", ROOT / "bench" / "frozen_encoder.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = random.Random(0)
    for shape in ("circle", "square", "triangle"):
        named = {nearest_colour(bench.random_colour(rng, shape) * 255) for _ in range(400)}
        assert named.isdisjoint({c for c, s in HELD_OUT if s == shape}) and len(named) >= 5, (shape, named)


def test_lora_concepts_bench_trains_scores_and_reports(tmp_path):
    """The README's LoRA figures come from this script: in a few steps it trains a concept and scores both sides."""
    out = tmp_path / "lora.json"
    args = ["--concepts", "cross", "--images", "4", "--n", "3", "--eval-n", "1", "--eval-seeds", "2", "--steps", "2"]
    args += ["--preserve", "1", "--weights", "1", "0.5", "--parts", "--pixel-prompts", "2", "--out", out]
    proc = in_process.script(ROOT / "bench" / "lora_concepts.py", [*args, "--prior-steps", "4", "--decoder-steps", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["settings"] == {"steps": 2, "preserve": 1} and report["eval_prompts_per_split"] == 2
    assert report["sampling"] == {"prior_steps": 4, "decoder_steps": 2}
    used = report["settings_used"]  # the defaults as they were, beside what was asked
    assert (used["steps"], used["preserve"], used["text_encoder"], used["preserve_weight"]) == (2, 1, True, 1.0)
    row = report["concepts"]["cross"]
    assert row["steps"] == 2 and row["train_seconds"] > 0
    assert row["held_out_with_lora"] in (0, 1 / 3, 2 / 3, 1) and row["eval_max_change_points"] >= 0
    assert set(row["eval_with_lora"]) == {"held-out", "training", "partial"} and "cross: trained 2 steps" in proc.stdout
    assert set(row["shape_rates_with_lora"]) == set(report["base_shape_rates"]) == set(row["eval_with_lora"])
    assert row["largest_shape_change"].split()[0] in row["eval_with_lora"] and "moved most: " in proc.stdout
    changes = row["eval_changes_points"]  # paired over the same prompts: each change is the rates' difference
    assert {key.split()[0] for key in changes} == set(row["eval_with_lora"])
    for key, (change, low, high) in changes.items():
        split, attribute = key.split()
        rates = row["eval_with_lora"][split][attribute], report["base_eval"][split][attribute]
        assert abs(change - (rates[0] - rates[1]) * 100) < 0.06
        assert low <= change <= high
    assert row["eval_max_change_points"] == max(abs(c[0]) for c in changes.values())
    at_half = row["by_weight"]["0.5"]  # each weight scored on its own; the first is the row's
    assert row["weight"] == 1 and at_half["weight"] == 0.5
    assert row["by_weight"]["1.0"]["eval_with_lora"] == row["eval_with_lora"]
    assert set(at_half["eval_with_lora"]) == set(row["eval_with_lora"]) and "cross at weight 0.5: " in proc.stdout
    assert set(row["by_part"]) == {"prior", "decoder", "text_encoder"}  # the demo's defaults adapt all three
    assert row["by_part"]["text_encoder"]["weight"] == 1 and "cross at its text encoder alone: " in proc.stdout


def test_stage_a_colours_bench_reports_each_set_for_the_stage_a_it_is_given(tmp_path):
    """The docs' Stage A colour figures come from this script; the shipped Stage A gives teal back as teal."""
    out = tmp_path / "stage_a.json"
    proc = in_process.script(ROOT / "bench" / "stage_a_colours.py", ["--n", "4", "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["scenes"] == 4 and report["palette_scenes_mean_error"] < report["random_colour_scenes_mean_error"]
    assert max(abs(a - b) for a, b in zip(report["teal_square_centre"], report["teal"])) < 12


def test_demo_sizes_bench_scores_each_size_both_ways(tmp_path):
    """The README's figures for the demo at other sizes come from this script; drawn at 128x128, a 256x256 picture
    is the 128x128 one enlarged, so it scores the same."""
    out = tmp_path / "sizes.json"
    args = ["--n", "2", "--sizes", "128x128,256x256,256x128", "--out", out]
    proc = in_process.script(ROOT / "bench" / "demo_sizes.py", args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sizes = json.loads(out.read_text())["sizes"]
    assert set(sizes) == {"128x128", "256x256", "256x128"}
    drawn = {size: dict(row["drawn at 128x128"]) for size, row in sizes.items()}
    assert all(row.pop("seconds") > 0 for row in drawn.values())
    assert drawn["256x256"] == drawn["128x128"] and set(drawn["256x128"]) == {*drawn["128x128"]}
    assert set(sizes["256x128"]["at the size asked for (before)"]) == {*drawn["128x128"], "seconds"}


def test_lora_gpu_bench_times_each_row_on_a_tiny_prior(tmp_path):
    """The script a GPU session runs for the LoRA step's time and memory: every row, with and without checkpointing."""
    out = tmp_path / "lora_gpu.json"
    proc = in_process.script(ROOT / "bench" / "lora_gpu.py", ["--tiny", "--steps", "1", "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["rank"] == 16 and 0 < report["adapter_parameters"] < report["prior_parameters"]
    rows = {(r["batch"], r["checkpointing"]): r for r in report["rows"]}
    assert set(rows) == {(1, True), (1, False), (4, True), (4, False)}
    assert all(r["seconds_per_step"] > 0 and r["loss_is_finite"] for r in rows.values())


def test_each_lora_recipe_changes_its_one_thing_and_puts_the_defaults_back(demo_engine):
    """The README's recipe figures come from bench/lora_recipes.py: each recipe patches what it says while it runs
    (checked without training) and the defaults are back after."""
    sys.path.insert(0, str(ROOT / "bench"))
    import lora_recipes

    from cascade_studio.train import lora
    from cascade_studio.train.lora import LoraTrainConfig, resolve

    cfg = resolve(LoraTrainConfig(images=ROOT, out=ROOT / "x.safetensors"), demo_engine)
    defaults = lora.domain_prompts(demo_engine, 20, 0)
    assert lora._lr_of(cfg, "decoder") == 2e-3
    with lora_recipes.recipe("scenes-only"):
        scenes = lora.domain_prompts(demo_engine, 20, 0)
        assert all(p.endswith("background") for p in scenes) and scenes[::2] == defaults[::2]
    with lora_recipes.recipe("decoder-lr"):
        assert lora._lr_of(cfg, "decoder") == 1e-3 and lora._lr_of(cfg, "prior") == cfg.lr
    with lora_recipes.recipe("no-prior"):
        assert lora._lr_of(cfg, "prior") == 0 and lora._lr_of(cfg, "decoder") == cfg.lr
    assert lora.domain_prompts(demo_engine, 20, 0) == defaults and lora._lr_of(cfg, "prior") == cfg.lr
    assert lora._lr_of.__module__ == lora.domain_prompts.__module__ == lora.__name__
