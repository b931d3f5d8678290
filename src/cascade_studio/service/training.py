"""LoRA training as a job on the generation queue (one device, one line): what the API and the studio submit.

The pictures arrive uploaded (base64, each with an optional caption) or, for holders of the server's credentials, as
a folder on the server. Each training works in its own folder under `<output>/trainings/<id>/` (the pictures, the
samples, the loss plot and checkpoints), and the finished LoRA is copied into the LoRA folder, where generation
finds it by name. Cancelling (or stopping the server) writes a checkpoint first.
"""

from __future__ import annotations

import logging
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import bad_field, field_error
from ..engine import CancelToken, RequestError
from ..engine.inputs import decode
from ..store.sqlite import new_id
from ..train.lora import ALLOWED as TRAINING_ALLOWED
from .queue import JobQueue

log = logging.getLogger(__name__)

MAX_PICTURES = 200
FILES = (".png",)  # what GET /v1/trainings/{id}/files/{name} serves: samples and the loss plot


class TrainingPicture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="the picture: base64 or a data: URL (PNG, JPEG, WebP)")
    caption: Annotated[str, Field(max_length=1000)] | None = None


class TrainingSpec(BaseModel):
    """What to train: the same settings as `cascade-studio train-lora`; unset ones take the model's defaults."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[\w.\-]{1,120}$", description="the LoRA's name (its file's stem)")]
    images: Annotated[list[TrainingPicture], Field(max_length=MAX_PICTURES)] = []
    folder: str | None = Field(None, description="a folder of pictures on the server (the server's credentials only)")
    trigger: Annotated[str, Field(pattern=r"^[^\s<>:]{1,60}$")] | None = None
    rank: Annotated[int, Field(ge=1, le=256)] = 8
    alpha: Annotated[float, Field(gt=0, le=1024)] | None = None
    steps: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    lr: Annotated[float, Field(gt=0, le=0.1)] | None = None
    batch: Annotated[int, Field(ge=1, le=256)] | None = None
    resolution: Annotated[int, Field(ge=128, le=2048, multiple_of=128)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    decoder: bool | None = None
    text_encoder: bool | None = None
    text_encoder_lr: Annotated[float, Field(gt=0, le=0.1)] | None = None
    trigger_embedding: bool | None = Field(None, description="also learn the trigger word's own tokens (needs trigger)")
    preserve: Annotated[int, Field(ge=0, le=1000)] | None = None
    preserve_weight: Annotated[float, Field(gt=0, le=100)] | None = None
    decoder_min_t: Annotated[float, Field(ge=0, lt=1)] | None = None
    sample_every: Annotated[int, Field(ge=0)] = 0
    save_every: Annotated[int, Field(ge=0)] = 0


ALLOWED = TRAINING_ALLOWED | {
    "name": "a name of 1 to 120 letters, digits, '.', '-' or '_' (the LoRA file's stem)",
    "trigger": "one word of at most 60 characters, without spaces, '<', '>' or ':'",
    "seed": f"a whole number from 0 to {2**32 - 1}",
    "sample_every": "a whole number of steps, 0 for no samples",
    "save_every": "a whole number of steps, 0 for no checkpoints",
    "images": f"a list of at most {MAX_PICTURES} pictures, each {{'image': base64, 'caption': text}}",
}


def spec_errors(exc: ValidationError) -> list[str]:
    """pydantic's errors in the words every other endpoint uses: `field: must be <allowed> (got <value>)`."""
    return [field_error(e, ALLOWED) for e in exc.errors()]


@dataclass
class TrainLora:
    """The job: write the pictures, train on the loaded model, put the LoRA in the LoRA folder."""

    spec: TrainingSpec
    workdir: Path
    kind: str = "lora-training"
    id: str = field(default_factory=new_id)
    log_lines: deque = field(default_factory=lambda: deque(maxlen=30))

    def describe(self) -> dict:
        spec = self.spec.model_dump(exclude={"images"}, exclude_none=True)
        return spec | {"pictures": len(self.spec.images) or None, "workdir": str(self.workdir)}

    def prepare(self) -> Path:
        """The pictures as files with their captions (refused here, at submission, if one is not a picture)."""
        if self.spec.trigger_embedding and not self.spec.trigger:
            raise RequestError([bad_field("trigger_embedding", ALLOWED["trigger_embedding"], True)])
        if self.spec.folder:
            folder = Path(self.spec.folder).expanduser()
            if not folder.is_dir():
                raise RequestError([f"folder: {folder} is not a folder on the server"])
            return folder
        if not self.spec.images:
            raise RequestError(["images: give at least one picture (or a folder on the server)"])
        pictures = self.workdir / "images"
        pictures.mkdir(parents=True, exist_ok=True)
        problems = []
        for i, entry in enumerate(self.spec.images):
            try:
                picture = decode(entry.image, f"images.{i}.image")
            except RequestError as exc:
                problems += exc.messages
                continue
            picture.image.save(pictures / f"{i:04d}.png")
            if entry.caption:
                (pictures / f"{i:04d}.txt").write_text(entry.caption)
            elif not self.spec.trigger:
                problems.append(f"images.{i}.caption: required when no trigger word is given")
        if problems:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise RequestError(problems)
        return pictures

    def run(self, queue: JobQueue, report, cancel: CancelToken) -> dict:
        from ..models.hashing import short_hash
        from ..train.lora import LoraTrainConfig, train_lora

        engine = queue.engine
        images = Path(self.spec.folder).expanduser() if self.spec.folder else self.workdir / "images"
        values = self.spec.model_dump(exclude={"name", "images", "folder"})
        cfg = LoraTrainConfig(images=images, out=self.workdir / f"{self.spec.name}.safetensors", **values)

        def say(line: str) -> None:
            self.log_lines.append(line)
            log.info("training %s: %s", self.spec.name, line)

        def progress(p) -> None:
            report(
                {
                    "stage": "training",
                    "step": p.step,
                    "total": p.total,
                    "loss": round(p.loss, 5),
                    "steps_per_second": round(p.steps_per_second, 3),
                    "eta": round(p.eta, 1),
                    "sample": Path(p.sample).name if p.sample else None,
                    "log": list(self.log_lines),
                }
            )

        report({"stage": "encoding the pictures", "step": 0, "total": cfg.steps or 0, "log": []})
        summary = train_lora(engine, cfg, log=say, progress=progress, cancel=cancel)
        folder = engine.lora_library.folder
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{self.spec.name}.safetensors"
        tmp = folder / f".tmp-{target.name}"
        shutil.copyfile(summary["file"], tmp)
        tmp.replace(target)
        return {
            "lora": self.spec.name,
            "file": str(target),
            "sha256": short_hash(target),
            "steps": summary["steps"],
            "seconds": summary["seconds"],
            "final_loss": summary["final_loss"],
            "pictures": summary["pictures"],
            "loss_plot": Path(summary["file"]).with_suffix(".loss.png").name,
            "sample": Path(summary["sample"]).name,
            "log": list(self.log_lines),
        }


def new_training(queue: JobQueue, spec: TrainingSpec) -> TrainLora:
    """A training ready to submit: its folder made and its pictures written (RequestError for bad ones)."""
    task = TrainLora(spec, Path())
    task.workdir = queue.store.output_dir / "trainings" / task.id
    task.prepare()
    return task
