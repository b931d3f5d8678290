"""Find the folders that hold each component: in the Hugging Face cache (presets) or in a local folder, and the
single-file checkpoints that may stand in for the prior or the decoder.

Nothing here downloads: a missing or incomplete component becomes one `ModelNotFoundError` that names what is
missing, its size and the command that fetches it. `demo` is the small model shipped inside this package; `auto`
is the official full model when it is on disk, and the demo model otherwise. Which files of a folder count is
`files.py`'s rule, the same one `download` uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from huggingface_hub import constants as hf_constants
from pydantic import BaseModel

from .errors import ModelConfigError, ModelNotFoundError
from .files import ComponentState, WeightFiles, component_state
from .presets import APPROX_GB, DECODER_REPO, PRESETS, PRIOR_REPO, ROLES, ModelPreset

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_model"
MODEL_CARD = "cascade_studio.json"  # optional: a folder's display name and its own default settings
EFFNET_FILE = "effnet_encoder.safetensors"  # Stability's image encoder, at the root of stabilityai/stable-cascade
COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelIdentity(BaseModel):
    """What produced an image, precise enough to get the same weights again; stored in every PNG."""

    name: str
    preset: str | None = None
    prior_repo: str | None = None
    decoder_repo: str | None = None
    prior_subfolder: str = "prior"
    decoder_subfolder: str = "decoder"
    variant: str | None = None
    revisions: dict[str, str] = {}  # repo -> the commit its files came from
    path: str | None = None
    files: dict[str, str] = {}  # role -> single-file checkpoint used for it: "name sha256:<first 12>"


@dataclass(frozen=True)
class ModelSource:
    """role -> folder holding that component as `save_pretrained` wrote it (or a single file standing in)."""

    dirs: dict[str, Path]
    identity: ModelIdentity
    previewer_dir: Path | None = None
    defaults: dict = field(default_factory=dict)  # request fields this model works best with (size, steps, ...)
    # What the studio tells a person writing a prompt: {"hint": "what it draws", "closed_vocabulary": true} for a
    # model that knows only the words it was trained on (the demo model).
    prompt_help: dict = field(default_factory=dict)
    weights: dict[str, WeightFiles] = field(default_factory=dict)  # role -> the files chosen in its folder
    single_files: dict[str, Path] = field(default_factory=dict)  # "prior" / "decoder" -> an original-format file
    # image -> Stage C latent, for image-to-image and LoRA training: the demo's image_encoder/ folder, or
    # Stability's effnet_encoder.safetensors beside the official decoder repo's folders; None if not on disk.
    image_encoder: Path | None = None
    # The prior's CLIP image tower, for image prompts: a folder holding image_encoder/ (CLIPVisionModelWithProjection)
    # and feature_extractor/, as the official prior repo lays them out (the demo's: its image_tower/); None if not
    # on disk.
    image_tower: Path | None = None


# The demo model keeps its Stage C encoder in image_encoder/, so its CLIP tower sits one folder down, laid out as
# the prior repo's: image_tower/image_encoder/ and image_tower/feature_extractor/.
DEMO_TOWER = "image_tower"


def image_tower_in(root: Path) -> Path | None:
    """`root` if its image_encoder/ is a CLIP vision tower (with weights) beside a feature_extractor/."""
    config = root / "image_encoder" / "config.json"
    if not (config.is_file() and (root / "feature_extractor" / "preprocessor_config.json").is_file()):
        return None
    if "CLIPVisionModelWithProjection" not in json.loads(config.read_text()).get("architectures", []):
        return None
    return root if has_weights(root / "image_encoder", "image_encoder") else None


def repo_revisions(
    revision: str | None = None, prior_revision: str | None = None, decoder_revision: str | None = None
) -> dict[str, str | None]:
    """repo -> revision. `revision` names a branch or tag for both repos; a commit belongs to one repo only (the
    two repos' commits differ), so it must be given per repo."""
    if revision and COMMIT.fullmatch(revision):
        raise ModelConfigError(
            f"revision: {revision[:12]}... is a commit of one repo, and the prior and decoder repos "
            "have different commits; pass it as --prior-revision or --decoder-revision"
        )
    return {PRIOR_REPO: prior_revision or revision, DECODER_REPO: decoder_revision or revision}


def resolve_model(
    spec: str,
    *,
    revisions: dict[str, str | None] | None = None,
    cache_dir: Path | None = None,
    prior_file: Path | None = None,
    decoder_file: Path | None = None,
) -> ModelSource:
    """Turn `auto`, `demo`, `full`, `lite` or a folder path into component folders, or explain what is missing.
    `prior_file` / `decoder_file`: Stability's original-format Stage C / Stage B checkpoints that replace the
    model's own prior / decoder (the rest comes from the model)."""
    if spec == "auto":
        try:
            return resolve_model(
                "full", revisions=revisions, cache_dir=cache_dir, prior_file=prior_file, decoder_file=decoder_file
            )
        except ModelNotFoundError:
            return resolve_model("demo", prior_file=prior_file, decoder_file=decoder_file)
    replaced = {role: Path(p) for role, p in (("prior", prior_file), ("decoder", decoder_file)) if p}
    if spec == "demo":
        source = _from_folder(DEMO_DIR, replaced)
    elif spec in PRESETS:
        source = _from_hub_cache(PRESETS[spec], revisions or {}, Path(cache_dir or hf_constants.HF_HUB_CACHE), replaced)
    elif Path(spec).expanduser().is_dir():
        source = _from_folder(Path(spec).expanduser(), replaced)
    else:
        raise ModelNotFoundError(
            f"model: {spec!r} is neither auto, demo, a preset ({', '.join(PRESETS)}) nor an existing folder"
        )
    return _with_single_files(source, replaced)


def source_for(settings) -> ModelSource:
    """The model a Settings object names (its model, per-repo revisions, single files and cache)."""
    revisions = repo_revisions(settings.revision, settings.prior_revision, settings.decoder_revision)
    return resolve_model(
        settings.model,
        revisions=revisions,
        cache_dir=settings.cache_dir,
        prior_file=settings.prior_file,
        decoder_file=settings.decoder_file,
    )


def has_weights(folder: Path, role: str, variant: str | None = None) -> bool:
    """A component is present when its config and (for models) safetensors weights, every shard included, are."""
    return component_state(folder, role, variant or "bf16").ready


def _from_folder(root: Path, replaced: dict[str, Path]) -> ModelSource:
    prior_sub = next((s for s in ("prior", "prior_lite") if (root / s).is_dir()), "prior")
    decoder_sub = next((s for s in ("decoder", "decoder_lite") if (root / s).is_dir()), "decoder")
    subfolders = {"prior": prior_sub, "decoder": decoder_sub} | {r: r for r in ROLES[2:]}
    states = {role: component_state(root / sub, role) for role, sub in subfolders.items() if role not in replaced}
    missing = [
        f"{subfolders[r]} ({s.describe()})" if s.weights else subfolders[r] for r, s in states.items() if not s.ready
    ]
    if missing:
        raise ModelNotFoundError(
            f"model folder {root} is missing {', '.join(missing)}: each needs its config and .safetensors weights "
            "as save_pretrained writes them (pickled .bin weights are never loaded)"
        )
    previewer = root / "previewer"
    weights = {role: s.weights for role, s in states.items() if s.weights}
    card = json.loads((root / MODEL_CARD).read_text()) if (root / MODEL_CARD).is_file() else {}
    identity = ModelIdentity(
        name=card.get("name", root.resolve().name),
        preset="demo" if root.resolve() == DEMO_DIR else None,
        prior_subfolder=prior_sub,
        decoder_subfolder=decoder_sub,
        variant=weights["prior"].variant if "prior" in weights else None,
        path=str(root.resolve()),
    )
    tower = image_tower_in(root) or image_tower_in(root / DEMO_TOWER)
    encoder = root / "image_encoder"  # the demo's Stage C encoder; in the official layout, CLIP's tower
    if tower == root or not has_weights(encoder, "image_encoder"):
        encoder = root / EFFNET_FILE if (root / EFFNET_FILE).is_file() else None
    return ModelSource(
        {role: root / sub for role, sub in subfolders.items()},
        identity,
        previewer if has_weights(previewer, "previewer") else None,
        card.get("defaults", {}),
        card.get("prompt", {}),
        weights,
        image_encoder=encoder,
        image_tower=tower,
    )


def snapshot_dir(cache_dir: Path, repo: str, revision: str | None) -> Path | None:
    """The cached snapshot of `repo` at `revision` (branch, tag or commit), read from the cache's refs."""
    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
    ref = revision or "main"
    ref_file = repo_dir / "refs" / ref
    commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def preset_states(
    preset: ModelPreset, revisions: dict[str, str | None], cache_dir: Path, image_prompts: bool = False
) -> dict[str, tuple[Path | None, ComponentState]]:
    """role -> (its folder in the cached snapshot, or None; its state by the files rule)."""
    out = {}
    for role, (repo, sub) in preset.components(image_prompts).items():
        snapshot = snapshot_dir(cache_dir, repo, revisions.get(repo))
        folder = snapshot / sub if snapshot else None
        out[role] = (folder, component_state(folder, role, preset.variant) if folder else ComponentState(False, None))
    return out


def _from_hub_cache(
    preset: ModelPreset, revisions: dict[str, str | None], cache_dir: Path, replaced: dict[str, Path]
) -> ModelSource:
    states = {r: v for r, v in preset_states(preset, revisions, cache_dir).items() if r not in replaced}
    missing = [(role, state) for role, (_, state) in states.items() if not state.ready]
    if missing:
        raise ModelNotFoundError(missing_message(preset, missing, revisions, cache_dir))
    dirs = {role: folder for role, (folder, _) in states.items()}
    weights = {role: state.weights for role, (_, state) in states.items() if state.weights}
    identity = ModelIdentity(
        name=preset.display_name,
        preset=preset.name,
        prior_repo=PRIOR_REPO,
        decoder_repo=DECODER_REPO,
        prior_subfolder=preset.prior_subfolder,
        decoder_subfolder=preset.decoder_subfolder,
        variant=weights["prior"].variant if "prior" in weights else preset.variant,
        revisions={
            repo: folder.parent.name for role, folder in dirs.items() for repo in [preset.components()[role][0]]
        },
    )
    effnet = dirs["decoder"].parent / EFFNET_FILE if "decoder" in dirs else None  # the decoder repo's root
    return ModelSource(
        dirs,
        identity,
        weights=weights,
        image_encoder=effnet if effnet and effnet.is_file() else None,
        image_tower=image_tower_in(dirs["prior"].parent) if "prior" in dirs else None,
    )


def missing_message(
    preset: ModelPreset, missing: list[tuple[str, ComponentState]], revisions: dict[str, str | None], cache_dir: Path
) -> str:
    by_repo: dict[str, list[str]] = {}
    components = preset.components()
    for role, state in missing:
        repo, sub = components[role]
        detail = state.describe() if state.weights else (f"{APPROX_GB[sub]:.1f} GB" if APPROX_GB[sub] >= 0.1 else "")
        by_repo.setdefault(repo, []).append(sub + (f" ({detail})" if detail else ""))
    parts = "; ".join(f"{repo}{_at(revisions.get(repo))}: {', '.join(subs)}" for repo, subs in by_repo.items())
    total = sum(APPROX_GB[components[role][1]] for role, _ in missing)
    flags = "".join(
        f" --{'prior' if repo == PRIOR_REPO else 'decoder'}-revision {rev}" for repo, rev in revisions.items() if rev
    )
    return (
        f"Stable Cascade '{preset.name}' weights are not on this machine (looked in {cache_dir}). Missing {parts}; "
        f"about {total:.1f} GB in all. Get them with `cascade-studio download {preset.name}{flags}`, or pass "
        "--model PATH to a folder holding prior/, decoder/, vqgan/, text_encoder/, tokenizer/ and scheduler/ as "
        "save_pretrained writes them."
    )


def _at(revision: str | None) -> str:
    return f" at {revision}" if revision else ""


def _with_single_files(source: ModelSource, replaced: dict[str, Path]) -> ModelSource:
    """The source with Stability's original-format files in place of its prior and/or decoder."""
    if not replaced:
        return source
    from .hashing import short_hash

    files = {}
    for role, path in replaced.items():
        if not path.is_file():
            raise ModelNotFoundError(f"{role}_file: {path} is not a file")
        if path.suffix != ".safetensors":
            raise ModelConfigError(
                f"{role}_file: {path.name} is not a .safetensors file (pickled checkpoints are never loaded)"
            )
        files[role] = f"{path.name} sha256:{short_hash(path)}"
    identity = source.identity.model_copy(
        update={"files": files, "name": source.identity.name + " + " + " + ".join(p.stem for p in replaced.values())}
    )
    return replace(source, identity=identity, single_files=dict(replaced))
