"""A stand-in for the Hugging Face Hub: the official repos' layouts built in code from tiny models, served over a
real socket with the Hub's own API shapes, so `download` runs through huggingface_hub unchanged (only the HTTP
layer is ours: HF_ENDPOINT, or `endpoint=`, points at it).

The repos hold each layout the real ones may have (`../shared/notes/official-weights.md`): a bf16 prior sharded
with new-style names beside an fp32 decoy, a lite prior with legacy shard names, a single-file bf16 decoder, Stage A
in fp32 only, a text encoder sharded as transformers writes it, tokenizer and scheduler files, and root files no
preset needs (Stability's original-format stage_c file, READMEs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cascade_studio.models.architectures import BASE_WORDS, random_components, write_word_tokenizer
from cascade_studio.models.presets import DECODER_REPO, PRIOR_REPO
from tests.ui.conftest import free_port

COMMITS = {PRIOR_REPO: "1" * 40, DECODER_REPO: "2" * 40}


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' StableCascadeUNet keys back to Stability's original format (one attention in_proj, out_proj),
    the reverse of diffusers' single-file converter; for writing stage_c / stage_b files in tests."""
    out, groups = {}, {}
    for key, value in state.items():
        for part in ("to_q", "to_k", "to_v"):
            for kind in ("weight", "bias"):
                if key.endswith(f".attention.{part}.{kind}"):
                    groups.setdefault((key.removesuffix(f".{part}.{kind}"), kind), {})[part] = value
                    break
            else:
                continue
            break
        else:
            if ".attention.to_out.0." in key:
                out[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = value
            elif key.startswith("clip_txt_pooled_mapper.") and "clip_txt_mapper.weight" not in state:
                out[key.replace("clip_txt_pooled_mapper.", "clip_mapper.")] = value  # Stage B's name
            else:
                out[key] = value
    for (prefix, kind), parts in groups.items():
        out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]])
    return out


def _legacy(folder: Path) -> None:
    """Rename new-style variant shards to the names diffusers wrote before 0.29."""
    index_file = folder / "diffusion_pytorch_model.safetensors.index.bf16.json"
    index = json.loads(index_file.read_text())
    renamed = {}
    for name in sorted(set(index["weight_map"].values())):
        stem, numbers = name.split(".bf16-")
        renamed[name] = f"{stem}-{numbers.removesuffix('.safetensors')}.bf16.safetensors"
        (folder / name).rename(folder / renamed[name])
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    index_file.unlink()
    (folder / "diffusion_pytorch_model.safetensors.bf16.index.json").write_text(json.dumps(index))


def save(model, folder: Path, **kwargs) -> None:
    """save_pretrained into `folder` beside what is there (save_pretrained itself removes other weight files)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, **kwargs)
        folder.mkdir(parents=True, exist_ok=True)
        for file in Path(tmp).iterdir():
            shutil.copy(file, folder / file.name)


def build_repos(root: Path) -> dict[str, Path]:
    """The two official repos, laid out as the Hub holds them, from tiny random models."""
    repos = {repo: root / repo.replace("/", "--") for repo in COMMITS}
    for folder in repos.values():
        shutil.rmtree(folder, ignore_errors=True)
    prior_repo, decoder_repo = repos[PRIOR_REPO], repos[DECODER_REPO]
    bf16 = random_components("tiny", torch.device("cpu"), torch.bfloat16, seed=3)
    fp32 = random_components("tiny", torch.device("cpu"), torch.float32, seed=3)
    lite = random_components("tiny", torch.device("cpu"), torch.bfloat16, seed=4)

    save(bf16["prior"], prior_repo / "prior", variant="bf16", max_shard_size="40KB")
    save(fp32["prior"], prior_repo / "prior")  # the fp32 file beside it: never fetched
    save(lite["prior"], prior_repo / "prior_lite", variant="bf16", max_shard_size="40KB")
    _legacy(prior_repo / "prior_lite")
    (prior_repo / "README.md").write_text("---\nlicense: other\n---\n")

    save(bf16["decoder"], decoder_repo / "decoder", variant="bf16")
    save(fp32["decoder"], decoder_repo / "decoder")
    save(lite["decoder"], decoder_repo / "decoder_lite", variant="bf16")
    save(fp32["vqgan"], decoder_repo / "vqgan")  # Stage A: fp32 only
    save(bf16["text_encoder"], decoder_repo / "text_encoder", variant="bf16", max_shard_size="60KB")
    write_word_tokenizer(decoder_repo / "tokenizer", list(BASE_WORDS))
    from diffusers import DDPMWuerstchenScheduler

    DDPMWuerstchenScheduler().save_pretrained(decoder_repo / "scheduler")
    from safetensors.torch import save_file

    save_file(to_original(bf16["prior"].state_dict()), str(decoder_repo / "stage_c_bf16.safetensors"))
    (decoder_repo / "README.md").write_text("---\nlicense: other\n---\n")
    return repos


@dataclass
class FakeHub:
    """The server's knobs and what it saw."""

    repos: dict[str, Path]
    gated: bool = False
    cut_after: int | None = None  # drop the first download of a file bigger than this, after this many bytes
    throttle: float = 0.0  # seconds between 16 kB chunks
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    _cut: set[str] = field(default_factory=set)
    url: str = ""

    def files(self, repo: str) -> dict[str, Path]:
        base = self.repos[repo]
        return {p.relative_to(base).as_posix(): p for p in sorted(base.rglob("*")) if p.is_file()}

    def _repo(self, request: Request) -> tuple[str, str] | Response:
        repo = f"{request.path_params['owner']}/{request.path_params['name']}"
        if repo not in self.repos:
            return Response(status_code=404, headers={"X-Error-Code": "RepoNotFound"})
        if self.gated:
            return Response(status_code=401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        revision = request.path_params.get("revision", "main")
        if revision not in ("main", COMMITS[repo]):
            return Response(status_code=404, headers={"X-Error-Code": "RevisionNotFound"})
        return repo, COMMITS[repo]

    async def model_info(self, request: Request):
        self.requests.append(("GET", request.url.path, None))
        found = self._repo(request)
        if isinstance(found, Response):
            return found
        repo, commit = found
        return JSONResponse({"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in self.files(repo)]})

    async def tree(self, request: Request):
        self.requests.append(("GET", request.url.path, None))
        found = self._repo(request)
        if isinstance(found, Response):
            return found
        repo, _ = found
        entries = [
            {"type": "file", "path": p, "size": f.stat().st_size, "oid": hashlib.sha1(p.encode()).hexdigest()}
            for p, f in self.files(repo).items()
        ]
        return JSONResponse(entries)

    async def resolve(self, request: Request):
        found = self._repo(request)
        self.requests.append((request.method, request.url.path, request.headers.get("range")))
        if isinstance(found, Response):
            return found
        repo, commit = found
        path = request.path_params["path"]
        file = self.files(repo).get(path)
        if file is None:
            return Response(status_code=404, headers={"X-Error-Code": "EntryNotFound"})
        data = file.read_bytes()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        start = 0
        if request.headers.get("range", "").startswith("bytes="):
            start = int(request.headers["range"].removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if request.method == "HEAD":
            return Response(headers=headers | {"Content-Length": str(len(data))})
        body = data[start:]
        cut = self.cut_after is not None and not self._cut and len(body) > self.cut_after
        if cut:
            self._cut.add(path)

        async def chunks():
            import asyncio

            for i in range(0, len(body), 16384):
                if cut and i >= self.cut_after:
                    raise ConnectionError("the fake Hub drops this download halfway")
                if self.throttle:
                    await asyncio.sleep(self.throttle)
                yield body[i : i + 16384]

        return StreamingResponse(
            chunks(), status_code=206 if start else 200, headers=headers | {"Content-Length": str(len(body))}
        )

    def app(self) -> Starlette:
        repo = "/{owner}/{name}"
        return Starlette(
            routes=[
                Route(f"/api/models{repo}", self.model_info),
                Route(f"/api/models{repo}/revision/{{revision}}", self.model_info),
                Route(f"/api/models{repo}/tree/{{revision}}", self.tree),
                Route(f"/api/models{repo}/tree/{{revision}}/{{tree_path:path}}", self.tree),
                Route(f"{repo}/resolve/{{revision}}/{{path:path}}", self.resolve, methods=["GET", "HEAD"]),
            ]
        )


class Served:
    """The fake Hub on a loopback port, in a thread, for the length of a `with` block."""

    def __init__(self, hub: FakeHub):
        self.hub, self.port = hub, free_port()
        self.server = uvicorn.Server(uvicorn.Config(hub.app(), host="127.0.0.1", port=self.port, log_level="error"))
        hub.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeHub:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the fake Hub did not start"
            time.sleep(0.02)
        return self.hub

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
