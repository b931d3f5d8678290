"""A fresh `train-demo` run between its parts, saved after each so that a stopped run goes on where it left off.

The shipped recipe runs for hours (nine Stage B text rounds), and a run stopped in its sixth hour should not start
again from nothing. After each part (Stage A, Stage B, Stage C, each Stage B text round, Stage A's decoder) the run
writes `checkpoint/` inside its output folder: the models the later parts need (save_pretrained, as the model
folder has them), the decoder's first dataset while a part still needs it, and the state of every random number
stream. `train-demo --out DIR --resume` loads it and skips the parts it lists, so the resumed run draws the very
numbers the unstopped one would have, and on the CPU ends with the same weights, bit for bit.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from diffusers import StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModelWithProjection

from ..models.previewer import Previewer
from . import stages
from .scenes import Scene

FOLDER = "checkpoint"
# Each model a part may hand on, by the name of its folder in the model (and in the checkpoint).
CLASSES = {
    "vqgan": PaellaVQModel,
    "image_encoder": stages.ImageEncoder,
    "decoder": StableCascadeUNet,
    "prior": StableCascadeUNet,
    "text_encoder": CLIPTextModelWithProjection,
    "previewer": Previewer,
}


def load_model(cls, folder: Path):
    """A diffusers component from its config and weights: from_pretrained would record this machine's path in the
    config, and the model folder it is saved into later would carry it."""
    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"))
    return model


@dataclass
class Progress:
    """What the parts of a fresh run done so far hand on to the rest."""

    rng: random.Random
    gen: torch.Generator
    models: dict[str, nn.Module] = field(default_factory=dict)
    data_b: stages.DecoderData | None = None  # Stage B's scenes, until the first Stage B text round has used them
    done: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    resumed: list[dict] = field(default_factory=list)  # each resume: the part it went on after, when, where

    def save(self, out: Path) -> None:
        """Write the checkpoint next to the last one, then put it in its place: a run killed while saving keeps the
        previous checkpoint whole."""
        tmp, folder, old = out / f"{FOLDER}.tmp", out / FOLDER, out / f"{FOLDER}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        for name, model in self.models.items():
            model.save_pretrained(tmp / name)
        tensors = {"generator": self.gen.get_state(), "torch": torch.get_rng_state()}
        scenes = []
        if self.data_b is not None:
            tensors |= {"latents": self.data_b.latents, "small": self.data_b.small, "masks": self.data_b.masks}
            scenes = [asdict(s) for s in self.data_b.scenes]
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
        version, internal, gauss = self.rng.getstate()
        state = {
            "done": self.done,
            "seconds": self.seconds,
            "losses": self.losses,
            "config": self.config,
            "resumed": self.resumed,
            "rng": [version, list(internal), gauss],
            "scenes_b": scenes,
            "scale_b": self.data_b.scale if self.data_b is not None else None,
        }
        (tmp / "progress.json").write_text(json.dumps(state))
        if folder.is_dir():  # moved aside, not deleted, until the new one is in place (see _saved)
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, out: Path, device: str) -> Progress:
        folder = _saved(out)
        state = json.loads((folder / "progress.json").read_text())
        tensors = load_file(folder / "state.safetensors")
        rng = random.Random()
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        gen = torch.Generator()
        gen.set_state(tensors["generator"])
        models = {
            name: (cls.from_pretrained if name == "text_encoder" else partial(load_model, cls))(folder / name)
            for name, cls in CLASSES.items()
            if (folder / name).is_dir()
        }
        for name, model in models.items():  # as the parts left them: the decoder training, the rest frozen
            model.to(device)
            if name == "decoder":
                model.train()
            else:
                model.eval().requires_grad_(False)
        torch.set_rng_state(tensors["torch"])  # after building the models, whose first weights drew from it
        data_b = None
        if "latents" in tensors:
            scenes = [Scene(**s) for s in state["scenes_b"]]
            data_b = stages.DecoderData(
                tensors["latents"], tensors["small"], tensors["masks"], scenes, state["scale_b"]
            )
        done, seconds, losses, config = (state[k] for k in ("done", "seconds", "losses", "config"))
        return cls(rng, gen, models, data_b, done, seconds, losses, config, state.get("resumed", []))


def saved_config(out: Path) -> dict | None:
    """The config of the stopped run in `out` (a TrainConfig's fields), or None where there is none."""
    folder = _saved(Path(out))
    return None if folder is None else json.loads((folder / "progress.json").read_text())["config"]


def _saved(out: Path) -> Path | None:
    """The last checkpoint saved whole: `checkpoint/`, or, for a run killed between the two renames of a save,
    the previous one, still moved aside as `checkpoint.old/`."""
    for folder in (out / FOLDER, out / f"{FOLDER}.old"):
        if (folder / "progress.json").is_file():
            return folder
    return None


def remove(out: Path) -> None:
    """A finished run needs no checkpoint: it would only take up the disk (the decoder's dataset is hundreds of MB)."""
    for name in (FOLDER, f"{FOLDER}.old", f"{FOLDER}.tmp"):
        shutil.rmtree(Path(out) / name, ignore_errors=True)
