"""`cascade-studio`: serve the studio (the default), generate images, inspect and reproduce PNGs, download and
list the official weights, train and evaluate the demo model."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

# Set before diffusers/transformers are first imported: their import-time notices (e.g. "CLIPImageProcessor
# requires torchvision") are not the user's concern. Errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pydantic import ValidationError  # noqa: E402

from . import __version__  # noqa: E402
from .config import SETTING_ALLOWED, Settings, bad_field, field_error, whole_number  # noqa: E402
from .engine.request import (  # noqa: E402
    ALLOWED,
    FITS,
    MAX_IMAGE_PROMPTS,
    MAX_SIZE,
    RequestError,
    make_request,
    nearest_size,
)
from .models.errors import ModelConfigError, ModelNotFoundError  # noqa: E402
from .models.presets import DECODER_REPO, PRESETS, PRIOR_REPO  # noqa: E402


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage dump, exit 2
        raise UsageError(message)


def _quiet_libraries() -> None:
    """Their per-file loading bars would bury our own progress bar."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise UsageError("; ".join(field_error(e, SETTING_ALLOWED) for e in exc.errors())) from None


def _load_engine(settings: Settings):
    from .engine import CascadeEngine

    _quiet_libraries()
    t = time.perf_counter()
    engine = CascadeEngine.from_settings(settings)
    p = engine.pipelines
    print(
        f"model: {engine.identity.name} ({str(p.dtype).removeprefix('torch.')}, {p.device}) "
        f"loaded in {time.perf_counter() - t:.1f}s",
        file=sys.stderr,
    )
    if engine.identity.preset == "demo":
        print(
            "note: this is the small demo model shipped with cascade-studio (simple shapes on plain backgrounds); "
            "for real images run `cascade-studio download full`",
            file=sys.stderr,
        )
    return engine


def _run(engine, request, out_dir: Path, index: int | None = None, pictures: dict | None = None):
    """Generate with a progress bar; save every image (or only `index`) with metadata; return the paths."""
    from tqdm import tqdm

    from .metadata import ImageMetadata, save_png

    total = request.prior_steps + request.decoder_steps
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    with tqdm(total=total, desc="prior", unit="step", file=sys.stderr, leave=False, disable=None) as bar:

        def on_progress(event) -> None:
            bar.set_description(event.stage)
            bar.update(1)

        result = engine(request, pictures=pictures, progress=on_progress)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    t = result.timings
    prior = "cached" if result.prior_cached else f"{t['prior']:.2f}s"
    print(
        f"done in {t['total']:.2f}s (text {t['text']:.2f}s, prior {prior}, decoder {t['decoder']:.2f}s)",
        file=sys.stderr,
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for i, (image, seed) in enumerate(zip(result.images, result.seeds)):
        if index is not None and i != index:
            continue
        path = _free_path(out_dir / f"{stamp}-{seed}.png")
        save_png(image, path, ImageMetadata(result.request, i, result.model))
        print(f"{path}\tseed {seed}")
        paths.append(path)
    return result, paths


def _free_path(path: Path) -> Path:
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def cmd_generate(args: argparse.Namespace) -> int:
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "width": args.width,
        "height": args.height,
        "prior_steps": args.prior_steps,
        "prior_guidance": args.prior_guidance,
        "decoder_steps": args.decoder_steps,
        "decoder_guidance": args.decoder_guidance,
        "num_images": args.num_images,
        "seed": args.seed,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    files = {}
    if args.lora:
        given["loras"], files = _lora_args(args.lora)
    pictures = _picture_args(args, given)
    make_request(**given)  # bad input fails here, before any model loads
    settings = _settings(args)
    engine = _load_engine(settings)
    for path in files.values():
        engine.lora_library.add(path)
    request = engine.request(**given)  # what only the model knows (an image tower, a LoRA's fit) fails here
    from .store.sqlite import keep_picture

    for picture in pictures:  # beside the images, as the studio keeps them: `reproduce` finds them there
        keep_picture(settings.output_dir, picture)
    _run(engine, request, settings.output_dir, pictures={p.sha256: p.image for p in pictures})
    return 0


def _picture_args(args: argparse.Namespace, given: dict) -> list:
    """--init-image, --mask, --outpaint, --image-prompt FILE[:WEIGHT] -> request fields (in `given`, by hash) and
    the pictures, decoded and checked as the API checks them."""
    from .engine.inputs import Picture, decode, from_image, outpaint

    def read(path: str, name: str, mask: bool = False) -> Picture:
        return decode(_existing(path, name).read_bytes(), name, mask=mask)

    out = []
    if args.init_image:
        init = read(args.init_image, "init_image")
        mask = read(args.mask, "mask", mask=True) if args.mask else None
        if args.outpaint:
            sides = _outpaint_sides(args.outpaint)
            canvas, border = outpaint(init.image, **sides)
            if mask is not None:  # the given mask, on the canvas, beside the new border
                border.paste(mask.image.resize(init.image.size), (sides["left"], sides["top"]))
            init, mask = from_image(canvas, "init_image"), from_image(border, "mask", mask=True)
            given.setdefault("width", nearest_size(canvas.width))
            given.setdefault("height", nearest_size(canvas.height))
            given.setdefault("strength", 1.0)
        given["init_image"] = init.sha256
        out.append(init)
        if mask is not None:
            given["mask"] = mask.sha256
            out.append(mask)
    elif args.mask or args.outpaint:
        raise UsageError(f"{'mask' if args.mask else 'outpaint'}: needs --init-image")
    if args.strength is not None:
        given["strength"] = args.strength
    if args.fit:
        given["fit"] = args.fit
    prompts = []
    for i, value in enumerate(args.image_prompt or []):
        path, _, weight = value.rpartition(":") if _is_number(value.rpartition(":")[2]) else (value, "", "")
        ref = read(path, f"image_prompts.{i}.image")
        prompts.append({"image": ref.sha256, "weight": float(weight) if weight else 1.0})
        out.append(ref)
    if prompts:
        given["image_prompts"] = prompts
    for note in (n for p in out for n in p.notes):
        print(f"note: {note}", file=sys.stderr)
    return out


def _outpaint_sides(text: str) -> dict[str, int]:
    """'left=256,right=128' -> the four sides in pixels (those not named: 0)."""
    from .engine.inputs import SIDES

    sides = dict.fromkeys(SIDES, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sides or not value.isdigit() or int(value) > MAX_SIZE:
            raise UsageError(
                f"outpaint: {part!r} is not SIDE=PIXELS (SIDE one of left, right, top, bottom; 0 to 2048 pixels)"
            )
        sides[name] = int(value)
    if not any(sides.values()):
        raise UsageError("outpaint: name at least one side to grow, e.g. left=256")
    return sides


def _lora_args(values: list[str]) -> tuple[list[dict], dict[str, Path]]:
    """--lora NAME_OR_PATH[:WEIGHT] (repeatable) -> request entries, and the files given by path."""
    loras, files = [], {}
    for value in values:
        name, sep, weight = value.rpartition(":")
        if not sep or not _is_number(weight):
            name, weight = value, "1"
        path = Path(name).expanduser()
        if path.suffix == ".safetensors" or path.is_file():
            if not path.is_file():
                raise UsageError(f"lora: {path} is not a file")
            files[path.stem] = path
            name = path.stem
        loras.append({"name": name, "weight": float(weight)})
    return loras, files


def _prompt_lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"preserve-prompts: cannot read {path} ({exc})") from None
    if not lines:
        raise UsageError(f"preserve-prompts: {path} holds no prompts (one a line)")
    return lines


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cmd_train_lora(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .train.lora import LoraTrainConfig, TrainingError, train_lora

    settings = _settings(args)
    cfg = LoraTrainConfig(
        images=Path(args.images),
        out=Path(args.out),
        trigger=args.trigger,
        rank=args.rank,
        alpha=args.alpha,
        steps=args.steps,
        lr=args.lr,
        batch=args.batch,
        resolution=args.resolution,
        seed=args.seed,
        resume=Path(args.resume) if args.resume else None,
        sample_every=args.sample_every,
        save_every=args.save_every,
        decoder=args.decoder,
        text_encoder=args.text_encoder,
        text_encoder_lr=args.text_encoder_lr,
        trigger_embedding=args.trigger_embedding,
        preserve=args.preserve,
        preserve_prompts=_prompt_lines(args.preserve_prompts),
        preserve_weight=args.preserve_weight,
        decoder_min_t=args.decoder_min_t,
        optimizer=args.optimizer,
    )
    engine = _load_engine(settings)
    bar = tqdm(total=1, desc="LoRA", unit="step", file=sys.stderr, disable=None)

    def on_progress(p) -> None:
        bar.total = p.total
        bar.n = p.step
        bar.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
        bar.refresh()

    try:
        summary = train_lora(engine, cfg, log=lambda line: tqdm.write(line, file=sys.stderr), progress=on_progress)
    except TrainingError as exc:
        raise UsageError(str(exc)) from None
    finally:
        bar.close()
    print(summary["file"])
    return 0


def cmd_loras(args: argparse.Namespace) -> int:
    """The LoRA folder's files: name, hash, what they adapt, their trigger words and base model."""
    from .models.lora import LoraLibrary, lora_info

    settings = _settings(args)
    library = LoraLibrary(settings.lora_folder)
    files = library.files()
    print(f"LoRA folder: {library.folder} ({len(files)} file{'' if len(files) == 1 else 's'})")
    for name, path in files.items():
        info = lora_info(path)
        trigger = f", trigger: {info['trigger_words']}" if info["trigger_words"] else ""
        base = f", made for {info['base_model']}" if info["base_model"] else ""
        weight = f", preferred weight {info['preferred_weight']:g}" if info["preferred_weight"] else ""
        print(f"  {name}  sha256:{info['sha256']}  {info['format']}, adapts {info['adapts']}{trigger}{base}{weight}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .metadata import text_chunks

    chunks = text_chunks(_existing(args.image))
    if not chunks:
        raise UsageError(f"image: {args.image} carries no text chunks (not made by cascade-studio or A1111?)")
    for key, value in chunks.items():
        print(f"[{key}]\n{value}\n")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Run the image's whole batch again and keep its image: bit-identical on the same machine."""
    import numpy as np
    from PIL import Image

    from .metadata import read_png

    path = _existing(args.image)
    meta = read_png(path)
    if args.model is None:
        if meta.model is None or not (meta.model.path or meta.model.preset):
            raise UsageError("model: the image does not say which model made it; pass --model")
        args.model = meta.model.preset or meta.model.path
        if meta.model.preset in PRESETS:  # the same commits of each repo, unless told otherwise
            revisions = meta.model.revisions
            args.prior_revision = args.prior_revision or revisions.get(PRIOR_REPO)
            args.decoder_revision = args.decoder_revision or revisions.get(DECODER_REPO)
    _check_single_files(meta, args)
    settings = _settings(args)
    _check_revisions_on_disk(meta, settings)
    request = meta.alone() if args.alone else meta.request
    engine = _load_engine(settings)
    _find_loras(request, engine, args.lora or [])
    pictures = _find_pictures(request, path, settings, args.inputs)
    _, paths = _run(engine, request, settings.output_dir, None if args.alone else meta.index, pictures)
    with Image.open(path) as a, Image.open(paths[0]) as b:
        diff = int(np.abs(np.asarray(a.convert("RGB"), int) - np.asarray(b.convert("RGB"), int)).max())
    print("identical pixels" if diff == 0 else f"max pixel difference {diff}/255", file=sys.stderr)
    return 0


def _find_pictures(request, png: Path, settings: Settings, given: str | None) -> dict:
    """The input pictures the image was made from, by hash: in --inputs, beside the PNG (the CLI's layout), in
    the folder above (the studio's) or in the output folder; which is missing, if one is."""
    from .store.sqlite import INPUTS, find_pictures

    folders = [Path(given)] if given else []
    folders += [png.parent / INPUTS, png.parent.parent / INPUTS, settings.output_dir / INPUTS]
    found = find_pictures(request.pictures, folders)
    missing = [f"{request.field_of(sha)} (sha256 {sha})" for sha in request.pictures if sha not in found]
    if missing:
        raise UsageError(
            f"reproduce: the image was made from the picture(s) {', '.join(missing)}, found in none of "
            f"{', '.join(map(str, folders))}; pass the folder holding <sha256>.png with --inputs DIR"
        )
    return found


def _find_loras(request, engine, given: list[str]) -> None:
    """The LoRAs the image was made with, from --lora files or the LoRA folder: which is missing, if one is."""
    for path in given:
        if not Path(path).is_file():
            raise UsageError(f"lora: {path} is not a file")
        engine.lora_library.add(Path(path))
    known = engine.lora_library.files()
    missing = [f"{lora.name} (sha256:{lora.sha256})" for lora in request.loras if lora.name not in known]
    if missing:
        raise UsageError(
            f"reproduce: the image was made with the LoRA(s) {', '.join(missing)}, not in the LoRA folder "
            f"{engine.lora_library.folder}; pass each with --lora PATH"
        )


def _check_single_files(meta, args) -> None:
    """An image made with a single-file prior or decoder needs that file again: say which, if it is not given."""
    from .models.hashing import short_hash

    for role, recorded in (meta.model.files if meta.model else {}).items():
        given = getattr(args, f"{role}_file", None)
        name, _, digest = recorded.partition(" sha256:")
        if given is None:
            raise ModelNotFoundError(
                f"reproduce: the image was made with the {role} file {name} (sha256:{digest}); "
                f"pass it with --{role}-file PATH"
            )
        if Path(given).is_file() and short_hash(Path(given)) != digest:
            print(
                f"warning: {given} is not the {role} file the image was made with ({name}, sha256:{digest}); the "
                "pixels will differ",
                file=sys.stderr,
            )


def _check_revisions_on_disk(meta, settings) -> None:
    """A preset image made at commits that are not in the cache: say which, and how to fetch them."""
    from huggingface_hub import constants as hf_constants

    from .models.source import snapshot_dir

    if meta.model is None or meta.model.preset not in PRESETS:
        return
    cache = Path(settings.cache_dir or hf_constants.HF_HUB_CACHE)
    wanted = {PRIOR_REPO: settings.prior_revision, DECODER_REPO: settings.decoder_revision}
    missing = [f"{repo}@{rev[:10]}" for repo, rev in wanted.items() if rev and snapshot_dir(cache, repo, rev) is None]
    if missing:
        flags = f" --prior-revision {wanted[PRIOR_REPO]} --decoder-revision {wanted[DECODER_REPO]}"
        raise ModelNotFoundError(
            f"reproduce: the image was made with {', '.join(missing)}, which is not on this "
            f"machine; get it with `cascade-studio download {meta.model.preset}{flags}`, or pass "
            "--model to use another model (the pixels will differ)"
        )


def _revisions(settings: Settings) -> dict:
    from .models.source import repo_revisions

    return repo_revisions(settings.revision, settings.prior_revision, settings.decoder_revision)


def cmd_download(args: argparse.Namespace) -> int:
    from .models.hub import download

    settings = _settings(args)
    download(
        PRESETS[args.preset],
        revisions=_revisions(settings),
        cache_dir=settings.cache_dir,
        image_prompts=args.with_image_prompts,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(f'stable-cascade-{args.preset} is ready: cascade-studio generate "..." --model {args.preset}')
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.hub import cached_models

    settings = _settings(args)
    for line in cached_models(settings.cache_dir, _revisions(settings)):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import build_server, run, setup_logging

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise UsageError("auth: must be user:password")
        auth = (user, password)
    settings = _settings(args)
    setup_logging()
    app, queue = build_server(settings, _load_engine(settings), auth)
    if queue.store.recovered:
        print(
            f"history: {queue.store.recovered} job(s) left unfinished by the last run were marked failed",
            file=sys.stderr,
        )
    if queue.store.removed:
        print(
            f"history: removed {len(queue.store.removed)} file(s) the last run left half-written or unrecorded",
            file=sys.stderr,
        )
    print(
        f"studio: http://{settings.host}:{settings.port}   API: http://{settings.host}:{settings.port}/docs   "
        f"(history and images in {settings.output_dir})",
        file=sys.stderr,
    )
    run(app, queue, settings, auth)
    return 0


def cmd_space_export(args: argparse.Namespace) -> int:
    from .space import export_space

    for path in export_space(Path(args.dir), args.cache_dir, log=lambda line: print(line, file=sys.stderr)):
        print(path)
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .models.device import resolve_device
    from .train.checkpoint import saved_config
    from .train.run import SHIPPED_RECIPE, TrainConfig, train_demo, train_on

    if args.scale <= 0 or args.threads < 1:
        raise UsageError("scale: must be above 0; threads: must be at least 1")
    if not 0 < args.text_lr <= 0.01:
        raise UsageError(f"text-lr: must be above 0 and at most 0.01 (got {args.text_lr})")
    device = str(resolve_device(args.device))  # a clear message when the device is not there
    _quiet_libraries()
    cfg = TrainConfig(seed=args.seed, scale=args.scale, threads=args.threads, device=device, lr_b_text=args.text_lr)
    stopped = saved_config(Path(args.out))
    if args.resume:
        if args.from_model is not None or args.quick:
            raise UsageError("resume: goes on with a stopped fresh run as it was started (no --from or --quick)")
        if stopped is None:
            raise UsageError(f"resume: {args.out} holds no stopped train-demo run (no checkpoint/progress.json)")
        train_demo(Path(args.out), replace(TrainConfig(**stopped), threads=args.threads, device=device), resume=True)
        return 0
    if args.from_model is None:
        if args.stage is not None:
            raise UsageError("stage: only with --from (a fresh run trains every stage)")
        if stopped is not None:
            raise UsageError(f"out: {args.out} holds a stopped run; --resume goes on with it, or give another folder")
        train_demo(Path(args.out), cfg if args.quick else replace(cfg, **SHIPPED_RECIPE))
        return 0
    if args.quick:
        raise UsageError("quick: only for a fresh run (--from trains one stage, for the steps its config gives)")
    if not (Path(args.from_model) / "cascade_studio.json").is_file():
        raise UsageError(f"from: {args.from_model} is not a model folder written by train-demo")
    if Path(args.out).exists():
        raise UsageError(f"out: {args.out} exists; --from writes a new folder")
    train_on(Path(args.from_model), Path(args.out), cfg, args.stage or "b-text")
    return 0


def cmd_eval_demo(args: argparse.Namespace) -> int:
    import json

    from .models.source import source_for
    from .train.evaluate import (
        change_table,
        evaluate,
        evaluate_decoder,
        evaluate_vqgan,
        grid,
        json_ready,
        paired_changes,
        table,
    )
    from .train.stages import ImageEncoder

    if not 1 <= args.n <= 1000:
        raise UsageError(bad_field("n", whole_number(1, 1000), args.n))
    if not 1 <= args.seeds <= 100:
        raise UsageError(bad_field("seeds", whole_number(1, 100), args.seeds))
    seeds = range(args.seed, args.seed + args.seeds)
    settings = {
        k: getattr(args, k)
        for k in ("prior_steps", "prior_guidance", "decoder_steps", "decoder_guidance")
        if getattr(args, k) is not None
    }
    baseline = _eval_report(args.against, args.stage, seeds) if args.against else None
    files = {}
    if args.lora:
        if args.stage != "all":
            raise UsageError("lora: LoRAs apply to text-to-image evaluation only (--stage all)")
        settings["loras"], files = _lora_args(args.lora)
    make_request(prompt="", **settings)
    if args.model is None:
        args.model = "demo"
    config = _settings(args)
    if args.stage == "decoder":
        if set(settings) - {"decoder_steps", "decoder_guidance"}:
            raise UsageError("stage: the decoder alone takes only --decoder-steps and --decoder-guidance")
        source = source_for(config)
        folder = source.dirs["decoder"].parent / "image_encoder"
        if not folder.is_dir():
            raise UsageError(
                "stage: decoder needs the image encoder the decoder was trained with (image_encoder/ "
                "in the model folder, which `cascade-studio train-demo` writes)"
            )
        engine = _load_engine(config)
        report = evaluate_decoder(engine, ImageEncoder.from_pretrained(folder), n=args.n, seeds=seeds, **settings)
    elif args.stage == "vqgan":
        if settings:
            raise UsageError("stage: Stage A alone (vqgan) takes no sampling settings")
        report = evaluate_vqgan(_load_engine(config), n=args.n, seeds=seeds)
    else:
        engine = _load_engine(config)
        for path in files.values():
            engine.lora_library.add(path)
        report = evaluate(engine, n=args.n, seeds=seeds, **settings)
    print(table(report))
    if baseline is not None:
        changes = paired_changes(json_ready(report), baseline)
        print(change_table(changes, args.against))
        report["against"] = {"report": args.against, "changes_points": changes}
    if args.json:
        Path(args.json).write_text(json.dumps(json_ready(report), indent=1))
    if args.grid:
        grid(report).save(args.grid)
    return 0


def _eval_report(path: str, stage: str, seeds: range) -> dict:
    """An `eval-demo --json` report of the same stage and some of the same prompt seeds, to compare against: checked
    before the evaluation, which can take many minutes."""
    import json

    try:
        report = json.loads(_existing(path, "against").read_text())
    except ValueError as exc:
        raise UsageError(f"against: {path} is not an eval-demo --json report ({exc})") from exc
    if not isinstance(report, dict) or "splits" not in report:
        raise UsageError(f"against: {path} is not an eval-demo --json report (it has no splits)")
    if report.get("stage", "all") != stage:
        raise UsageError(f"against: {path} scored --stage {report.get('stage')}, this run --stage {stage}")
    if not set(report.get("seeds", [])) & set(seeds):  # a seed's prompts are the same whatever --n
        raise UsageError(
            f"against: {path} scored prompt seeds {report.get('seeds')}, none of these ({seeds.start} to "
            f"{seeds.stop - 1}); give its --seed and --seeds"
        )
    return report


def _existing(path: str, field: str = "image") -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{field}: {path} is not a file")
    return p


def _add_model_options(p: argparse.ArgumentParser, output: bool = True) -> None:
    """The options that load a model; `output=False` where --out names something else (train-lora's file)."""
    p.add_argument(
        "--model",
        help="auto, demo, full, lite, or a folder in the official layout (default: "
        "$CASCADE_MODEL or auto: full when downloaded, else demo)",
    )
    _add_hub_options(p)
    p.add_argument(
        "--prior-file",
        dest="prior_file",
        help="Stability's original-format Stage C file (stage_c_bf16.safetensors, a fine-tune) as the prior",
    )
    p.add_argument(
        "--decoder-file",
        dest="decoder_file",
        help="Stability's original-format Stage B file (stage_b_bf16.safetensors) as the decoder",
    )
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], help="default auto: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--cpu-offload",
        dest="cpu_offload",
        action="store_true",
        default=None,
        help="keep models in RAM and move each to the GPU when used (small GPUs)",
    )
    p.add_argument(
        "--speedup",
        choices=["auto", "off", "graphs", "compile"],
        help="graphs: CUDA graphs, same pixels; compile: also compiled blocks, faster after a ~1 min "
        "warm-up (default auto: graphs on CUDA without offload)",
    )
    if output:
        p.add_argument("--out", dest="output_dir", help="output folder (default: ./outputs)")
    p.add_argument(
        "--lora-dir", dest="lora_dir", help="folder of LoRA files (default: <out>/loras, or $CASCADE_LORA_DIR)"
    )
    p.add_argument("--threads", dest="torch_threads", type=int, help="CPU threads for torch")


def _add_hub_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--revision",
        help="a branch or tag of both official repos (a commit belongs to one repo: use the two options below)",
    )
    p.add_argument("--prior-revision", dest="prior_revision", help="commit, tag or branch of the prior repo")
    p.add_argument("--decoder-revision", dest="decoder_revision", help="commit, tag or branch of the decoder repo")
    p.add_argument("--cache-dir", dest="cache_dir", help="Hugging Face cache folder (default: huggingface_hub's)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cascade-studio", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cascade-studio {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="command")

    s = sub.add_parser("serve", help="start the studio web UI (the default command)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, help="port (default 7860)")
    s.add_argument("--auth", help="user:password required to open the studio")
    s.add_argument(
        "--share",
        action="store_true",
        default=None,
        help="also open a public gradio.live link (off by default; anyone with the link can use it)",
    )
    s.add_argument(
        "--api-token", dest="api_token", help="require 'Authorization: Bearer TOKEN' on /v1 (or $CASCADE_API_TOKEN)"
    )
    s.add_argument("--max-queued", dest="max_queued", type=int, help="jobs that may wait (default 16)")
    s.add_argument(
        "--model-dir",
        dest="model_dir",
        help="folder of local models (model folders, Stage C/B single files) the studio can switch to "
        "(or $CASCADE_MODEL_DIR)",
    )
    s.add_argument(
        "--no-model-switch",
        dest="model_switch",
        action="store_false",
        default=None,
        help="keep the model given at start: studio and API users cannot switch it",
    )
    _add_model_options(s)
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="text (and pictures) to image")
    g.add_argument("prompt")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--seed", type=int, help=ALLOWED["seed"])
    g.add_argument("-n", "--num-images", dest="num_images", type=int, help=ALLOWED["num_images"])
    g.add_argument("--width", type=int, help=ALLOWED["width"] + " (default 1024)")
    g.add_argument("--height", type=int, help=ALLOWED["height"] + " (default 1024)")
    g.add_argument("--prior-steps", type=int, help=ALLOWED["prior_steps"] + " (default 20)")
    g.add_argument("--prior-guidance", type=float, help=ALLOWED["prior_guidance"] + " (default 4.0)")
    g.add_argument("--decoder-steps", type=int, help=ALLOWED["decoder_steps"] + " (default 10)")
    g.add_argument("--decoder-guidance", type=float, help=ALLOWED["decoder_guidance"] + " (default 0.0)")
    g.add_argument(
        "--lora",
        action="append",
        metavar="NAME_OR_PATH[:WEIGHT]",
        help="apply a LoRA (a name in the LoRA folder, or a file), weight default 1; repeat to stack them. "
        "<lora:name:weight> in the prompt works too",
    )
    g.add_argument("--init-image", metavar="FILE", help="start from this picture (image-to-image)")
    g.add_argument("--strength", type=float, help=ALLOWED["strength"] + " (default 0.8)")
    g.add_argument("--fit", choices=FITS, help="how the picture meets the size: crop (default), pad or resize")
    g.add_argument("--mask", metavar="FILE", help="repaint only the mask's white part of --init-image (inpainting)")
    g.add_argument(
        "--outpaint",
        metavar="SIDE=PX,...",
        help="grow --init-image's canvas, e.g. left=256,top=128, and paint the new border (size: the canvas's)",
    )
    g.add_argument(
        "--image-prompt",
        action="append",
        metavar="FILE[:WEIGHT]",
        help=f"a reference picture for the prior (weight {ALLOWED['image_prompts.weight']}, default 1); up to "
        f"{MAX_IMAGE_PROMPTS}, repeatable; models with a CLIP image tower only",
    )
    _add_model_options(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    i.add_argument("image")
    i.set_defaults(func=cmd_info)

    r = sub.add_parser("reproduce", help="regenerate a PNG from its metadata and compare the pixels")
    r.add_argument("image")
    r.add_argument("--alone", action="store_true", help="generate only this image, not its whole batch")
    r.add_argument(
        "--lora",
        action="append",
        metavar="PATH",
        help="a LoRA file the image was made with, where it is not in the LoRA folder (repeatable)",
    )
    r.add_argument("--inputs", metavar="DIR", help="a folder of the image's input pictures (<sha256>.png)")
    _add_model_options(r)
    r.set_defaults(func=cmd_reproduce)

    d = sub.add_parser("download", help="fetch only the files a preset needs, with progress")
    d.add_argument("preset", choices=list(PRESETS))
    d.add_argument(
        "--with-image-prompts",
        action="store_true",
        help="also the prior repo's CLIP image tower (image_encoder/, feature_extractor/), for image prompts",
    )
    _add_hub_options(d)
    d.set_defaults(func=cmd_download)

    sp = sub.add_parser("space", help="Hugging Face Space tools")
    space_sub = sp.add_subparsers(dest="space_command", parser_class=_Parser, metavar="command", required=True)
    se = space_sub.add_parser("export", help="write a folder a Gradio Space (ZeroGPU ready) runs as is")
    se.add_argument("dir")
    se.add_argument(
        "--cache-dir",
        dest="cache_dir",
        help="the Hugging Face cache whose full preset decides which files "
        "the Space preloads (default: huggingface_hub's)",
    )
    se.set_defaults(func=cmd_space_export)

    t = sub.add_parser(
        "train-demo",
        help="train the demo model from scratch: the shipped recipe (6-8 h on 2 CPU threads) or --quick",
    )
    t.add_argument("--out", required=True, help="folder to write the model into")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--quick",
        action="store_true",
        help="the short recipe: Stage B text for 2,500 steps instead of the shipped model's 103,500, Stage A's decoder "
        "for 3,000 instead of 11,000: 66-120 min on 2 CPU threads, as fast as the machine is that day, and far "
        "behind the shipped model on shape (see the model card)",
    )
    t.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.05: a smoke test)")
    t.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    t.add_argument("--device", default="cpu", help="torch device to train on: cpu (default), cuda, cuda:N, mps")
    t.add_argument(
        "--text-lr",
        type=float,
        default=3e-4,
        help="peak learning rate of the decoder's text stage, Stage B text (default %(default)s)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="go on with the run stopped in --out where it left off (it saves its state after each part in "
        "checkpoint/): the settings it was started with, --threads and --device as given now",
    )
    t.add_argument(
        "--from",
        dest="from_model",
        metavar="DIR",
        help="train one stage of the model in DIR on (--stage); DIR stays as it is",
    )
    t.add_argument(
        "--stage",
        choices=("b-text", "a-decoder", "c-image", "c-low-noise", "c-words"),
        help="with --from: b-text (default), the decoder with text (Stage B text; adds the stage, or "
        "trains on from where it stopped; another --seed gives fresh scenes), a-decoder, Stage "
        "A's decoder half (its encoder frozen, so the latents keep their meaning), or c-image, the CLIP image "
        "tower for image prompts (taught through the frozen prior; trains on if the model has one), or "
        "c-low-noise, the prior at little noise with a few wrong-colour captions (image-to-image at low strength "
        "then keeps the picture's colours), or c-words, the prior alone on every phrasing the captions use (the "
        "text encoder frozen; words its tokenizer lacks, such as ball, box and violet, are added with the "
        "embeddings of the words they stand for)",
    )
    t.set_defaults(func=cmd_train_demo)

    e = sub.add_parser("eval-demo", help="score prompt adherence on held-out and training scene prompts")
    e.add_argument("--n", type=int, default=60, help="prompts per split")
    e.add_argument("--seed", type=int, default=0, help="the first prompt seed (which prompts, and their image seeds)")
    e.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="score this many prompt seeds from --seed on, pooled, with each seed's rates and the standard "
        "errors (one seed's 60 prompts leave a rate uncertain by several points; the README's "
        "figures are --seeds 24)",
    )
    e.add_argument("--json", help="write the full report here")
    e.add_argument("--grid", help="write a contact sheet of held-out samples here")
    e.add_argument(
        "--against",
        metavar="OLD.json",
        help="an earlier --json report on the same prompts (same --n, --seed, --seeds): print how far this model "
        "scores above or below it, prompt by prompt, each change with its 95%% interval",
    )
    e.add_argument(
        "--stage",
        choices=("all", "decoder", "vqgan"),
        default="all",
        help="all: text to image (default); decoder: the decoder alone, from each scene's true latent "
        "(and how well a linear probe reads the shape off that latent); "
        "vqgan: Stage A alone, each scene encoded and decoded (the ceiling for the others)",
    )
    for name in ("prior-steps", "decoder-steps"):
        e.add_argument(f"--{name}", dest=name.replace("-", "_"), type=int)
    for name in ("prior-guidance", "decoder-guidance"):
        e.add_argument(f"--{name}", dest=name.replace("-", "_"), type=float)
    e.add_argument(
        "--lora",
        action="append",
        metavar="NAME_OR_PATH[:WEIGHT]",
        help="score with this LoRA loaded (repeatable): does it leave what the model knew alone?",
    )
    _add_model_options(e)
    e.set_defaults(func=cmd_eval_demo)

    lt = sub.add_parser("train-lora", help="train a LoRA on a folder of captioned pictures (name.png + name.txt)")
    lt.add_argument("images", help="folder of pictures (png, jpg, webp), each with an optional caption .txt beside it")
    lt.add_argument("--out", required=True, help="the LoRA file to write (NAME.safetensors)")
    lt.add_argument(
        "--trigger", help="a word for the concept: added to every caption, and the caption of pictures without one"
    )
    lt.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    lt.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    lt.add_argument("--steps", type=int, help="training steps (default: the model's, 600 for the demo)")
    lt.add_argument("--lr", type=float, help="learning rate (default: 2e-3 for the demo, 1e-4 for the official)")
    lt.add_argument("--batch", type=int, help="pictures a step (default: 16 for the demo, 1 for the official)")
    lt.add_argument("--resolution", type=int, help="the long side, a multiple of 128 (default: the model's size)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--resume", help="a checkpoint's .resume.safetensors, to go on from where it stopped")
    lt.add_argument("--sample-every", dest="sample_every", type=int, default=0, help="a sample picture every N steps")
    lt.add_argument("--save-every", dest="save_every", type=int, default=0, help="a checkpoint every N steps")
    lt.add_argument(
        "--decoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also adapt Stage B (default: yes for the demo model, no for the official ones)",
    )
    lt.add_argument(
        "--text-encoder",
        dest="text_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also adapt the text encoder (kohya's TE LoRA), so a new word is learnt where words are read (default: "
        "yes for the demo model, no for the official ones)",
    )
    lt.add_argument(
        "--trigger-embedding",
        dest="trigger_embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also learn the trigger word's own token embeddings (textual inversion beside the LoRA, as Stability's "
        "recipe trains its tokens; bundled in the file): prompts without the word read exactly as before "
        "(needs --trigger; default: no)",
    )
    lt.add_argument(
        "--text-encoder-lr",
        dest="text_encoder_lr",
        type=float,
        help="the text encoder's learning rate (above 0 and at most 0.1; default: 2e-3 for the demo model, a tenth "
        "of --lr for the official ones)",
    )
    lt.add_argument(
        "--decoder-min-t",
        dest="decoder_min_t",
        type=float,
        metavar="T",
        help="Stage B learns your pictures at noise levels t >= T only (from 0 up to, not including, 1; default: 0.3 "
        "for the demo model, where shape is decided, so its last steps keep the base model's edges; 0 for the "
        "official ones)",
    )
    lt.add_argument(
        "--preserve",
        type=int,
        metavar="N",
        help="N pictures the base model draws from the captions without the trigger word; while the LoRA learns "
        "yours it is held to the base model's own predictions on them, so it changes only what the word adds "
        "(default: 40 for the demo model, 0 for the official ones)",
    )
    lt.add_argument(
        "--preserve-weight",
        dest="preserve_weight",
        type=float,
        metavar="W",
        help="how much holding to the base model counts against learning your pictures (above 0 and at most 100; "
        "default 1; kohya's --prior_loss_weight): higher changes the rest of the model less, and may show your "
        "concept less",
    )
    lt.add_argument(
        "--optimizer",
        choices=("adamw", "adamw8bit"),
        default="adamw",
        help="adamw8bit: bitsandbytes' 8-bit AdamW, on CUDA, for less memory (pip install bitsandbytes)",
    )
    lt.add_argument(
        "--preserve-prompts",
        dest="preserve_prompts",
        metavar="FILE",
        help="the prompts they are drawn from, one a line (default: the demo model's own scenes, every other one "
        "in its caption phrasings, or your captions without the trigger word)",
    )
    _add_model_options(lt, output=False)
    lt.set_defaults(func=cmd_train_lora)

    lo = sub.add_parser("loras", help="list the LoRA files in the LoRA folder")
    lo.add_argument("--lora-dir", dest="lora_dir", help="the folder (default: <out>/loras, or $CASCADE_LORA_DIR)")
    lo.add_argument("--out", dest="output_dir", help="output folder (default: ./outputs)")
    lo.set_defaults(func=cmd_loras)

    m = sub.add_parser("models", help="list the Stable Cascade weights on this machine and their disk use")
    _add_hub_options(m)
    m.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["serve", *argv]  # `cascade-studio --port 7861` serves, as plain `cascade-studio` does
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except (UsageError, RequestError, ModelConfigError) as exc:
        print(f"cascade-studio: error: {exc}", file=sys.stderr)
        return 2
    except ModelNotFoundError as exc:
        print(f"cascade-studio: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cascade-studio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
