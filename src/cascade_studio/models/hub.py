"""Fetch a preset's files from the Hugging Face Hub, and report what is cached. The only code that downloads."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download

from .errors import ModelNotFoundError
from .presets import PRESETS, ModelPreset
from .source import resolve_model


def download(preset: ModelPreset, *, revision: str | None = None, cache_dir: Path | None = None) -> None:
    """Download exactly the files `preset` needs (huggingface_hub shows a progress bar per file)."""
    print(
        f"downloading stable-cascade-{preset.name} (about {preset.approx_gb():.1f} GB); the weights are under "
        "Stability AI's non-commercial community licence"
    )
    for repo, subfolders in preset.files_by_repo().items():
        patterns = [p for pats in subfolders.values() for p in pats]
        try:
            snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=cache_dir)
        except Exception as exc:  # network, auth, offline mode: all end the same way for the user
            raise ModelNotFoundError(f"download of {repo} failed: {type(exc).__name__}: {exc}") from exc
    resolve_model(preset.name, revision=revision, cache_dir=cache_dir)  # every needed file arrived


def _disk_use(path: Path) -> int:
    # Snapshot files are symlinks into blobs/, so count the blobs once.
    return sum(f.stat().st_size for f in (path / "blobs").glob("*") if f.is_file())


def cached_models(cache_dir: Path | None = None) -> list[str]:
    """One line per preset (ready or what is missing), then the disk use of each official repo."""
    cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    lines = [f"Hugging Face cache: {cache}"]
    for name in PRESETS:
        try:
            source = resolve_model(name, cache_dir=cache)
            lines.append(
                f"  {name}: ready ({', '.join(f'{r}@{c[:10]}' for r, c in source.identity.revisions.items())})"
            )
        except ModelNotFoundError as exc:
            missing = str(exc).split("Missing ", 1)[-1].split("; about")[0]
            lines.append(f"  {name}: not ready, missing {missing}")
    for repo in sorted({r for p in PRESETS.values() for r in p.files_by_repo()}):
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        size = _disk_use(repo_dir) / 1e9 if repo_dir.is_dir() else 0.0
        lines.append(f"  {repo}: {size:.2f} GB on disk")
    return lines
