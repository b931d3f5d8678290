"""The command line: generation, metadata, reproduction, and one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade_studio.cli import build_parser, main

CLI = str(Path(sys.executable).with_name("cascade-studio"))
SMALL = ["--width", "256", "--height", "256", "--prior-steps", "4", "--decoder-steps", "3"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"HF_HUB_OFFLINE": "1"} | (env or {}),
    )


def test_same_command_in_two_processes_gives_identical_pngs(tiny_model_dir, tmp_path):
    outputs = []
    for run in ("a", "b"):
        proc = run_cli(
            "generate",
            "a red circle",
            "--model",
            str(tiny_model_dir),
            "-n",
            "2",
            "--seed",
            "9",
            *SMALL,
            "--out",
            str(tmp_path / run),
            "--threads",
            "2",
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().split("\n")
        assert [line.split("\t")[1] for line in lines] == ["seed 9", "seed 10"]
        assert "model: tiny (float32, cpu)" in proc.stderr and "done in" in proc.stderr
        outputs.append([np.asarray(Image.open(line.split("\t")[0])) for line in lines])
    for a, b in zip(*outputs):
        assert np.array_equal(a, b)


def test_bad_arguments_give_one_line_and_exit_2(tiny_model_dir):
    proc = run_cli("generate", "x", "--model", str(tiny_model_dir), "--width", "720")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "cascade-studio: error: width: must be a multiple of 128 from 128 to 2048 (got 720)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "x", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (
            ["generate", "x", "--prior-steps", "0", "--decoder-guidance", "nan"],
            "prior_steps: must be a whole number from 1 to 100 (got 0); decoder_guidance: must be a finite number",
        ),
        (["generate", "x", "-n", "9"], "num_images: must be a whole number from 1 to 8 (got 9)"),
        (["generate", "x", "--dtype", "fp16", "--model", "MODEL"], "dtype: fp16 is not supported"),
        (["generate", "x", "--threads", "0"], "torch_threads: must be a whole number of at least 1 (got 0)"),
        (["--port", "0"], "port: must be a whole number from 1 to 65535 (got 0)"),
        (
            ["generate", "x", "--speedup", "graphs", "--device", "cpu", "--model", "MODEL"],
            "speedup: 'graphs' needs a CUDA device; on this device choose off or compile",
        ),
        (["generate"], "the following arguments are required: prompt"),
        (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
        (["--port", "abc"], "argument --port: invalid int value: 'abc'"),  # options alone mean serve
        (["info", "/no/such.png"], "image: /no/such.png is not a file"),
        (["download", "huge"], "argument preset: invalid choice: 'huge'"),
        (
            ["eval-demo", "--stage", "decoder", "--model", "MODEL"],
            "stage: decoder needs the image encoder the decoder was trained with",
        ),
        (
            ["eval-demo", "--stage", "decoder", "--prior-steps", "5", "--model", "MODEL"],
            "stage: the decoder alone takes only --decoder-steps and --decoder-guidance",
        ),
        (
            ["eval-demo", "--stage", "vqgan", "--decoder-steps", "5", "--model", "MODEL"],
            "stage: Stage A alone (vqgan) takes no sampling settings",
        ),
        (["eval-demo", "--seeds", "0", "--model", "MODEL"], "seeds: must be a whole number from 1 to 100 (got 0)"),
        (["eval-demo", "--against", "/no/such.json", "--model", "MODEL"], "against: /no/such.json is not a file"),
        (["train-demo", "--out", "x", "--text-lr", "0"], "text-lr: must be above 0 and at most 0.01 (got 0.0)"),
        (["train-demo", "--out", "x", "--stage", "a-decoder"], "stage: only with --from"),
        (["train-demo", "--from", "MODEL", "--out", "x", "--quick"], "quick: only for a fresh run"),
        (["train-demo", "--out", "x", "--resume", "--quick"], "resume: goes on with a stopped fresh run as it was"),
    ],
)
def test_bad_arguments_table(args, message, tiny_model_dir, capsys):
    args = [str(tiny_model_dir) if a == "MODEL" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cascade-studio: error: ") and message in err


def test_every_command_prints_its_help(capsys):
    """`--help` formats every option's help (a bare "%" in one once broke `eval-demo --help`)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = sub.choices
    assert {"generate", "serve", "train-demo", "eval-demo", "train-lora"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        assert "usage: cascade-studio " + name in capsys.readouterr().out, name


def test_train_lora_refuses_a_setting_out_of_range_naming_it(tiny_model_dir, capsys):
    """Training settings are checked against the model's defaults once it is loaded, before any picture is read."""
    args = ["train-lora", str(tiny_model_dir), "--out", "x.safetensors", "--decoder-min-t", "1"]
    assert main([*args, "--model", str(tiny_model_dir)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "cascade-studio: error: decoder_min_t: must be from 0 up to (not including) 1 (got 1.0)"
    args[-2:] = ["--preserve-weight", "0"]
    assert main([*args, "--model", str(tiny_model_dir)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "cascade-studio: error: preserve_weight: must be above 0 and at most 100 (got 0.0)"
    args[-2:] = ["--trigger-embedding", "--rank", "4"]
    assert main([*args, "--model", str(tiny_model_dir)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("cascade-studio: error: trigger_embedding: must be off without a trigger word")


def test_missing_weights_offline_explain_the_download(tmp_path):
    proc = run_cli("generate", "a cat", "--model", "full", "--cache-dir", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Stable Cascade 'full' weights are not on this machine" in proc.stderr
    assert "about 11.8 GB in all. Get them with `cascade-studio download full`" in proc.stderr


def test_download_offline_fails_cleanly(tmp_path):
    proc = run_cli("download", "lite", "--cache-dir", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "download of stabilityai/stable-cascade-prior failed" in proc.stderr


def test_models_lists_presets_and_disk_use(hub_cache, capsys):
    assert main(["models", "--cache-dir", str(hub_cache)]) == 0
    out = capsys.readouterr().out
    assert "full: ready (stabilityai/stable-cascade-prior@aaaaaaaaaa" in out and "lite: ready" in out
    assert "stabilityai/stable-cascade: " in out and " GB on disk" in out


def test_info_and_reproduce(tiny_model_dir, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "a blue square",
                "--negative",
                "red, green",
                "--model",
                str(tiny_model_dir),
                "-n",
                "2",
                "--seed",
                "40",
                *SMALL,
                "--out",
                str(tmp_path / "gen"),
            ]
        )
        == 0
    )
    second = Path(capsys.readouterr().out.strip().split("\n")[1].split("\t")[0])

    assert main(["info", str(second)]) == 0
    out = capsys.readouterr().out
    assert (
        "a blue square\nNegative prompt: red, green\nSteps: 4, Sampler: DDPMWuerstchen, CFG scale: 4.0, Seed: 41" in out
    )
    assert '"index": 1' in out

    # The model is found from the PNG's metadata; the whole batch reruns, so the pixels are identical.
    assert main(["reproduce", str(second), "--out", str(tmp_path / "again")]) == 0
    captured = capsys.readouterr()
    assert "identical pixels" in captured.err and "seed 41" in captured.out
    assert main(["reproduce", str(second), "--alone", "--out", str(tmp_path / "alone")]) == 0
    err = capsys.readouterr().err
    assert "identical pixels" in err or "max pixel difference 1/255" in err


def test_start_from_a_picture_inpaint_outpaint_and_reproduce_finding_the_inputs(tmp_path, capsys):
    scene = tmp_path / "scene.png"
    Image.new("RGB", (300, 200), (40, 80, 220)).save(scene)  # not the model's shape: cropped, and said
    mask = tmp_path / "mask.png"
    Image.new("L", (300, 200), 0).save(mask)
    common = ["--model", "demo", "--seed", "3", "--out", str(tmp_path / "out")]
    assert main(["generate", "a red circle on a blue background", "--init-image", str(scene), *common]) == 0
    made = capsys.readouterr()
    assert "init_image: 300x200 cropped at the centre to 128x128 (fit=crop)" in made.err
    first = Path(made.out.strip().split("\t")[0])
    inputs = list((tmp_path / "out" / "inputs").glob("*.png"))
    assert len(inputs) == 1  # kept beside the images, by hash

    # Moved elsewhere, the image finds its input again with --inputs; without it, reproduce names what is missing.
    moved = tmp_path / "elsewhere" / first.name
    moved.parent.mkdir()
    first.rename(moved)
    assert main(["reproduce", str(moved), "--out", str(tmp_path / "again")]) == 2
    assert "the image was made from the picture(s) init_image (sha256" in capsys.readouterr().err
    assert main(["reproduce", str(moved), "--inputs", str(inputs[0].parent), "--out", str(tmp_path / "again")]) == 0
    assert "identical pixels" in capsys.readouterr().err

    assert main(["generate", "a red circle", "--init-image", str(scene), "--mask", str(mask), *common]) == 0
    inpainted = Path(capsys.readouterr().out.strip().split("\t")[0])
    with Image.open(inpainted) as image:  # an all-black mask repaints nothing: the cropped input, to the pixel
        assert image.getpixel((5, 5)) == (40, 80, 220) and "Mask hash: " in image.text["parameters"]

    assert main(["generate", "", "--image-prompt", f"{scene}:0.8", *common]) == 0  # a picture alone, no text
    with Image.open(Path(capsys.readouterr().out.strip().split("\t")[0])) as image:
        assert "Image prompt hashes: " in image.text["parameters"]

    square = tmp_path / "square.png"
    Image.new("RGB", (128, 128), (245, 245, 245)).save(square)
    assert main(["generate", "a red circle", "--init-image", str(square), "--outpaint", "left=128", *common]) == 0
    with Image.open(Path(capsys.readouterr().out.strip().split("\t")[0])) as image:
        assert image.size == (256, 128) and image.getpixel((200, 64)) == (245, 245, 245)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--init-image", "/no/such.png"], "init_image: /no/such.png is not a file"),
        (["--init-image", "NOTPNG"], "init_image: not a picture that can be read"),
        (["--init-image", "PNG", "--strength", "1.5"], "strength: must be a finite number from 0 (keep the input)"),
        (["--mask", "PNG"], "mask: needs --init-image"),
        (["--init-image", "PNG", "--outpaint", "sideways=3"], "outpaint: 'sideways=3' is not SIDE=PIXELS"),
        (["--image-prompt", "PNG:2.5"], "image_prompts.0.weight: must be a finite number from 0"),
    ],
)
def test_bad_picture_arguments(args, message, tmp_path, capsys):
    png, notpng = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (32, 32)).save(png)
    notpng.write_text("not a picture")
    args = [str(png) if a == "PNG" else str(notpng) if a == "NOTPNG" else a.replace("PNG", str(png)) for a in args]
    assert main(["generate", "x", "--model", "demo", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err  # what the model cannot do is known once it is loaded: after its load line
    last = err.strip().splitlines()[-1]
    assert last.startswith("cascade-studio: error: ") and message in last and "Traceback" not in err, err
