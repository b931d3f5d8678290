"""Fetch a preset's files from the Hugging Face Hub, and report what is cached. The only code that downloads.

`download` asks the Hub what each repo holds at the pinned revision, chooses each component's files by the same
rule the loader and `models` use (files.py: the bf16 variant where the repo has it, in whatever form, else the
plain file), checks the disk has room for what is not cached yet, and fetches exactly those files with one
progress bar over their bytes. huggingface_hub resumes a file an earlier run left half-done. Hub answers that stop
it (a gated repo, a missing repo or revision, no network) become one line that says what to do.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from tqdm import tqdm

from .errors import ModelNotFoundError
from .files import ComponentState, files_to_fetch
from .presets import EXTRA_FILES, PRESETS, REPOS, ModelPreset
from .source import preset_states, resolve_model

DISK_MARGIN = 1.02  # ask for 2% more free space than the files take


@dataclass(frozen=True)
class PlannedFile:
    repo: str
    path: str  # in the repo
    size: int
    cached: bool


def hub_error(exc: Exception, repo: str, revision: str | None) -> ModelNotFoundError:
    """A Hub failure as one line that says what to do next."""
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, hf_errors.GatedRepoError) or getattr(getattr(exc, "response", None), "status_code", 0) in (
        401,
        403,
    ):
        return ModelNotFoundError(
            f"download: the Hub refused access to {repo} ({_status(exc)}). Accept the licence at "
            f"https://huggingface.co/{repo}, then log in with `hf auth login` or set HF_TOKEN, and run it again"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return ModelNotFoundError(
            f"download: {repo} has no revision {revision!r} on the Hub (a commit, tag or "
            "branch of that repo: the two official repos' commits differ)"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return ModelNotFoundError(f"download: no repo {repo}{at} on the Hub")
    if (
        isinstance(exc, hf_errors.OfflineModeIsEnabled | hf_errors.LocalEntryNotFoundError)
        or "connect" in str(type(exc)).lower()
    ):
        offline = " (HF_HUB_OFFLINE is set)" if hf_constants.HF_HUB_OFFLINE else ""
        return ModelNotFoundError(
            f"download of {repo} failed: the Hub cannot be reached{offline}; run it where the "
            f"Hub is reachable, or copy a Hugging Face cache here ({type(exc).__name__})"
        )
    return ModelNotFoundError(f"download of {repo} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def _status(exc: Exception) -> str:
    code = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {code}" if code else type(exc).__name__


def plan(
    preset: ModelPreset,
    revisions: dict[str, str | None],
    cache_dir: Path,
    *,
    api: HfApi,
    image_prompts: bool = False,
    log=print,
) -> tuple[list[PlannedFile], dict[str, str]]:
    """The files to fetch for each component, from the repos' listings at their revisions, and each repo's commit."""
    files: list[PlannedFile] = []
    commits: dict[str, str] = {}
    for repo, subfolders in preset.by_repo(image_prompts).items():
        revision = revisions.get(repo)
        try:
            commits[repo] = api.model_info(repo, revision=revision).sha
            listing = {
                f.path: f.size
                for f in api.list_repo_tree(repo, revision=commits[repo], recursive=True)
                if hasattr(f, "size")
            }
        except Exception as exc:  # noqa: BLE001 - every Hub failure ends the same way: one line for the user
            raise hub_error(exc, repo, revision) from exc
        for sub, role in subfolders.items():
            names = {
                p.removeprefix(f"{sub}/") for p in listing if p.startswith(f"{sub}/") and "/" not in p[len(sub) + 1 :]
            }

            def read_index(name: str, repo=repo, sub=sub, revision=revision) -> dict:
                return json.loads(Path(_fetch(repo, f"{sub}/{name}", revision, cache_dir, api)).read_text())

            chosen = files_to_fetch(role, names, preset.variant, read_index)
            if chosen is None:
                raise ModelNotFoundError(
                    f"download: {repo} has no usable {role} in {sub}/ at {commits[repo][:10]} "
                    "(a config and .safetensors weights are needed)"
                )
            if role not in ("tokenizer", "scheduler", "feature_extractor") and not any(
                f".{preset.variant}" in name for name in chosen
            ):
                log(
                    f"{sub}: the repo has no {preset.variant} weights; fetching the full-precision file (it is cast to "
                    f"{preset.variant} when loaded)"
                )
            for name in chosen:
                path = f"{sub}/{name}"
                cached = try_to_load_from_cache(repo, path, cache_dir=cache_dir, revision=commits[repo])
                files.append(PlannedFile(repo, path, listing[path], isinstance(cached, str)))
        for path in EXTRA_FILES.get(repo, ()):
            if path in listing:
                cached = try_to_load_from_cache(repo, path, cache_dir=cache_dir, revision=commits[repo])
                files.append(PlannedFile(repo, path, listing[path], isinstance(cached, str)))
    return files, commits


def download(
    preset: ModelPreset,
    *,
    revisions: dict[str, str | None] | None = None,
    cache_dir: Path | None = None,
    image_prompts: bool = False,
    endpoint: str | None = None,
    log=print,
    show_progress: bool | None = None,
    progress_file=None,
) -> list[PlannedFile]:
    """Fetch exactly the files `preset` needs (with `image_prompts`, also the prior repo's CLIP image tower)."""
    cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    api = HfApi(endpoint=endpoint)
    revisions = revisions or {}
    files, commits = plan(preset, revisions, cache, api=api, image_prompts=image_prompts, log=log)
    todo = [f for f in files if not f.cached]
    total = sum(f.size for f in files)
    if not todo:
        log(f"{preset.display_name}: already complete ({total / 1e9:.2f} GB in {cache})")
        return files
    needed = sum(f.size for f in todo)
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if free < needed * DISK_MARGIN:
        raise ModelNotFoundError(
            f"download: {preset.display_name} needs {_size(needed)} more in {cache}, and only "
            f"{_size(free)} is free there; free some space or pass --cache-dir"
        )
    log(
        f"downloading {preset.display_name}: {len(todo)} files, {_size(needed)} (of {_size(total)}); the weights are "
        "under Stability AI's non-commercial community licence"
    )
    # show_progress None: a bar on a terminal, none in logs and pipes.
    with tqdm(
        total=needed,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=preset.display_name,
        file=progress_file or sys.stderr,
        disable=None if show_progress is None else not show_progress,
    ) as bar:
        for f in todo:
            _fetch(f.repo, f.path, revisions.get(f.repo), cache, api, _into(bar))
    resolve_model(preset.name, revisions=commits, cache_dir=cache)  # every needed file arrived
    return files


def _fetch(repo: str, path: str, revision: str | None, cache: Path, api: HfApi, tqdm_class=None) -> str:
    """One file, by the revision asked for (so huggingface_hub records which commit a branch or tag named)."""
    try:
        return hf_hub_download(
            repo, path, revision=revision or "main", cache_dir=cache, endpoint=api.endpoint, tqdm_class=tqdm_class
        )
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, repo, revision) from exc


def _into(bar: tqdm) -> type:
    """A tqdm class for huggingface_hub's per-file bars that draws nothing and adds each file's bytes to `bar`,
    so the user sees one bar over the whole download."""

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            bar.update(n)
            return super().update(n)

    return Forward


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _disk_use(path: Path) -> int:
    # Snapshot files are symlinks into blobs/, so count the blobs once.
    return sum(f.stat().st_size for f in (path / "blobs").glob("*") if f.is_file())


def cached_models(cache_dir: Path | None = None, revisions: dict[str, str | None] | None = None) -> list[str]:
    """One line per preset (ready, or what is missing or incomplete), then the disk use of each official repo."""
    cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    lines = [f"Hugging Face cache: {cache}"]
    for name, preset in PRESETS.items():
        states = preset_states(preset, revisions or {}, cache)
        not_ready = {role: state for role, (_, state) in states.items() if not state.ready}
        if not not_ready:
            commits = {preset.components()[role][0]: folder.parent.name for role, (folder, _) in states.items()}
            lines.append(f"  {name}: ready ({', '.join(f'{r}@{c[:10]}' for r, c in commits.items())})")
        else:
            lines.append(f"  {name}: not ready: " + "; ".join(_state_line(preset, r, s) for r, s in not_ready.items()))
    for repo in REPOS:
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        size = _disk_use(repo_dir) / 1e9 if repo_dir.is_dir() else 0.0
        lines.append(f"  {repo}: {size:.2f} GB on disk")
    return lines


def _state_line(preset: ModelPreset, role: str, state: ComponentState) -> str:
    repo, sub = preset.components()[role]
    return f"{sub} {state.describe()}"
