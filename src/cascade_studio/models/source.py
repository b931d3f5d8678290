"""Find the folders that hold each component: in the Hugging Face cache (presets) or in a local folder.

Nothing here downloads: a missing component becomes one `ModelNotFoundError` that names what is missing, its
size and the command that fetches it. `demo` is the small model shipped inside this package; `auto` is the
official full model when it is on disk, and the demo model otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants as hf_constants
from pydantic import BaseModel

from .errors import ModelNotFoundError
from .presets import APPROX_GB, DECODER_REPO, PRESETS, PRIOR_REPO, ModelPreset

ROLES = ("prior", "decoder", "vqgan", "text_encoder", "tokenizer", "scheduler")
DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_model"
MODEL_CARD = "cascade_studio.json"  # optional: a folder's display name and its own default settings
CONFIG_FILES = {"tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}


class ModelIdentity(BaseModel):
    """What produced an image, precise enough to get the same weights again; stored in every PNG."""

    name: str
    preset: str | None = None
    prior_repo: str | None = None
    decoder_repo: str | None = None
    prior_subfolder: str = "prior"
    decoder_subfolder: str = "decoder"
    variant: str | None = None
    revisions: dict[str, str] = {}
    path: str | None = None


@dataclass(frozen=True)
class ModelSource:
    """role -> folder holding that component as `save_pretrained` wrote it."""

    dirs: dict[str, Path]
    identity: ModelIdentity
    previewer_dir: Path | None = None
    defaults: dict = field(default_factory=dict)  # request fields this model works best with (size, steps, ...)
    # What the studio tells a person writing a prompt: {"hint": "what it draws", "closed_vocabulary": true} for a
    # model that knows only the words it was trained on (the demo model).
    prompt_help: dict = field(default_factory=dict)


def resolve_model(spec: str, *, revision: str | None = None, cache_dir: Path | None = None) -> ModelSource:
    """Turn `auto`, `demo`, `full`, `lite` or a folder path into component folders, or explain what is missing."""
    if spec == "auto":
        try:
            return resolve_model("full", revision=revision, cache_dir=cache_dir)
        except ModelNotFoundError:
            return resolve_model("demo")
    if spec == "demo":
        return _from_folder(DEMO_DIR)
    if spec in PRESETS:
        return _from_hub_cache(PRESETS[spec], revision, Path(cache_dir or hf_constants.HF_HUB_CACHE))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path)
    raise ModelNotFoundError(
        f"model: {spec!r} is neither auto, demo, a preset ({', '.join(PRESETS)}) nor an existing folder"
    )


def has_weights(folder: Path, role: str, variant: str | None = None) -> bool:
    """A component is present when its config and (for models) safetensors weights are there."""
    config = folder / CONFIG_FILES.get(role, "config.json")
    if not config.is_file():
        return False
    if role in ("tokenizer", "scheduler"):
        return True
    pattern = f"*.{variant}.safetensors" if variant else "*.safetensors"
    return any(folder.glob(pattern))


def _from_folder(root: Path) -> ModelSource:
    prior_sub = next((s for s in ("prior", "prior_lite") if (root / s).is_dir()), "prior")
    decoder_sub = next((s for s in ("decoder", "decoder_lite") if (root / s).is_dir()), "decoder")
    subfolders = {"prior": prior_sub, "decoder": decoder_sub} | {r: r for r in ROLES[2:]}
    dirs = {role: root / sub for role, sub in subfolders.items()}
    missing = [subfolders[r] for r, d in dirs.items() if not has_weights(d, r)]
    if missing:
        raise ModelNotFoundError(
            f"model folder {root} is missing {', '.join(missing)}: each needs its config and .safetensors weights "
            "as save_pretrained writes them (pickled .bin weights are never loaded)"
        )
    previewer = root / "previewer"
    variant = "bf16" if any(dirs["prior"].glob("*.bf16.safetensors")) else None
    card = json.loads((root / MODEL_CARD).read_text()) if (root / MODEL_CARD).is_file() else {}
    identity = ModelIdentity(
        name=card.get("name", root.resolve().name),
        preset="demo" if root.resolve() == DEMO_DIR else None,
        prior_subfolder=prior_sub,
        decoder_subfolder=decoder_sub,
        variant=variant,
        path=str(root.resolve()),
    )
    return ModelSource(
        dirs,
        identity,
        previewer if has_weights(previewer, "previewer") else None,
        card.get("defaults", {}),
        card.get("prompt", {}),
    )


def snapshot_dir(cache_dir: Path, repo: str, revision: str | None) -> Path | None:
    """The cached snapshot of `repo` at `revision` (branch, tag or commit), read from the cache's refs."""
    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
    ref = revision or "main"
    ref_file = repo_dir / "refs" / ref
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _from_hub_cache(preset: ModelPreset, revision: str | None, cache_dir: Path) -> ModelSource:
    dirs: dict[str, Path] = {}
    revisions: dict[str, str] = {}
    missing: list[tuple[str, str]] = []
    for repo, subfolders in preset.files_by_repo().items():
        # A pinned revision applies to both repos only when it names a tag/branch; commits differ per repo.
        snapshot = snapshot_dir(cache_dir, repo, revision)
        for sub in subfolders:
            role = {preset.prior_subfolder: "prior", preset.decoder_subfolder: "decoder"}.get(sub, sub)
            variant = None if role in ("tokenizer", "scheduler") else preset.variant
            if snapshot is None or not has_weights(snapshot / sub, role, variant):
                missing.append((repo, sub))
            else:
                dirs[role] = snapshot / sub
                revisions[repo] = snapshot.name
    if missing:
        raise ModelNotFoundError(_missing_message(preset, missing, revision, cache_dir))
    identity = ModelIdentity(
        name=preset.display_name,
        preset=preset.name,
        prior_repo=PRIOR_REPO,
        decoder_repo=DECODER_REPO,
        prior_subfolder=preset.prior_subfolder,
        decoder_subfolder=preset.decoder_subfolder,
        variant=preset.variant,
        revisions=revisions,
    )
    return ModelSource(dirs, identity)


def _missing_message(preset: ModelPreset, missing: list[tuple[str, str]], revision: str | None, cache_dir: Path) -> str:
    by_repo: dict[str, list[str]] = {}
    for repo, sub in missing:
        size = f" ({APPROX_GB[sub]:.1f} GB)" if APPROX_GB[sub] >= 0.1 else ""
        by_repo.setdefault(repo, []).append(sub + size)
    parts = "; ".join(f"{repo}: {', '.join(subs)}" for repo, subs in by_repo.items())
    total = sum(APPROX_GB[sub] for _, sub in missing)
    rev = f" --revision {revision}" if revision else ""
    return (
        f"Stable Cascade '{preset.name}' weights are not on this machine (looked in {cache_dir}). Missing {parts}; "
        f"about {total:.1f} GB in all. Get them with `cascade-studio download {preset.name}{rev}`, or pass "
        "--model PATH to a folder holding prior/, decoder/, vqgan/, text_encoder/, tokenizer/ and scheduler/ as "
        "save_pretrained writes them."
    )
