"""LoRA files for Stable Cascade: read the formats met in the wild, map their keys to diffusers' module names, and
apply, stack and unload them with peft.

Formats read (`../shared/notes/peers-and-clients.md`):
- kohya / ComfyUI: `lora_prior_unet_<module>` (Stage C), `lora_unet_<module>` (Stage B), `lora_prior_te_<module>`
  (the text encoder), each with `.lora_down.weight`, `.lora_up.weight` and `.alpha` (scale = alpha / rank). The
  module path is ComfyUI's tree with dots as underscores; its attention is `attention.attn.to_q/to_k/to_v/out_proj`
  where diffusers has `attention.to_q/to_k/to_v/to_out.0`, and Stage B's pooled-text mapper is `clip_mapper`.
  This is also the format `train-lora` writes, so ComfyUI loads our files as it loads others.
- peft / diffusers: `<module>.lora_A.weight` / `.lora_B.weight` (or `.lora.down.weight` / `.lora.up.weight`),
  under a `prior.` / `unet.` / `decoder.` / `text_encoder.` prefix (a bare module path is the prior).
- Stability's own (`train_c_lora.py`): `weights.N.lora_down` / `.lora_up`, the N-th LoRA of the model in module order
  over its attention (`in_proj_weight` split into q, k, v; `out_proj`), scale 1/rank, and `embeddings.*` deltas for
  trained tokens (applied for tokens the vocabulary has; new tokens are skipped with a note).
- Embeddings bundled in any of these (A1111's and OneTrainer's `bundle_emb.<word>.clip_g`, which `train-lora
  --trigger-embedding` writes): the vectors the word's own tokens are read as while the LoRA is loaded, so a prompt
  without the word reads exactly as before. One with another number of vectors than the word has tokens here is
  skipped with a note.

A file whose keys match no module, or whose shapes fit another model, is refused with what did not match.
Applying never touches the base weights: peft adds the low-rank paths beside them, and unloading puts the very
same layers back, so a generation after unloading is bit-identical to one before loading.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .errors import ModelConfigError
from .hashing import short_hash

log = logging.getLogger(__name__)

ROLES = ("prior", "decoder", "text_encoder")
KOHYA_PREFIX = {"prior": "lora_prior_unet_", "decoder": "lora_unet_", "text_encoder": "lora_prior_te_"}
PEFT_PREFIX = {
    "prior.": "prior",
    "unet.": "prior",
    "transformer.": "prior",
    "decoder.": "decoder",
    "text_encoder.": "text_encoder",
    "te.": "text_encoder",
}
LORA_NAME = re.compile(r"[\w.\-]{1,120}")  # what a LoRA is called by: its file's stem, no paths


def comfy_path(name: str, role: str) -> str:
    """diffusers' module path as ComfyUI's Stage B/C tree names it."""
    name = re.sub(r"\.attention\.to_(q|k|v)$", r".attention.attn.to_\1", name)
    name = re.sub(r"\.attention\.to_out\.0$", ".attention.attn.out_proj", name)
    if role == "decoder":
        name = re.sub(r"^clip_txt_pooled_mapper\b", "clip_mapper", name)
    return name


def kohya_name(name: str, role: str) -> str:
    return KOHYA_PREFIX[role] + comfy_path(name, role).replace(".", "_")


def adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA may adapt, by diffusers' name: every Linear and Conv2d (the base layer, where LoRAs are
    active on it already)."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            out[name] = module.get_base_layer()
        elif isinstance(module, nn.Linear | nn.Conv2d) and not any(name.startswith(f"{t}.") for t in out):
            out[name] = module
    return out


@dataclass
class LoraPart:
    down: torch.Tensor  # (rank, in) or (rank, in, k, k)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraWeights:
    """A LoRA file read and mapped: role -> diffusers module name -> its low-rank pair."""

    path: Path
    parts: dict[str, dict[str, LoraPart]]
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    token_deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # Stability's trained tokens
    token_values: dict[int, torch.Tensor] = field(default_factory=dict)  # bundled embeddings: what a token reads as
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def sha256(self) -> str:
        return short_hash(self.path)


def read_lora(path: Path, models: dict[str, nn.Module], tokenizer=None) -> LoraWeights:
    """Read a LoRA file in any format above and map it onto `models` (role -> the loaded module), checking every
    module it names exists there with the shapes it needs. `tokenizer` (the text encoder's) reads the words of
    bundled embeddings; without it they are skipped with a note."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelConfigError(f"lora: {path.name} is not a .safetensors file (pickled files are never loaded)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a broken file, whatever the reason
        raise ModelConfigError(f"lora: {path.name} is not a readable safetensors file ({exc})") from exc
    keys = list(tensors)
    if any(k.startswith(tuple(KOHYA_PREFIX.values())) for k in keys):
        weights = _read_kohya(path, tensors, models)
    elif any(re.match(r"weights\.\d+\.lora_(down|up)$", k) for k in keys):
        weights = _read_stability(path, tensors, models)
    elif any(".lora_A." in k or ".lora.down." in k for k in keys):
        weights = _read_peft(path, tensors, models)
    else:
        raise ModelConfigError(
            f"lora: {path.name} holds no LoRA weights this tool can read (its keys look like "
            f"{', '.join(keys[:3])}); expected kohya/ComfyUI, peft/diffusers or Stability's format"
        )
    weights.metadata = metadata
    _read_bundled(weights, tensors, tokenizer)
    _check_shapes(weights, models)
    return weights


def word_tokens(tokenizer, word: str) -> list[int]:
    """The token ids a word is read as, with no start or end token: the rows an embedding bundled for it sets."""
    return tokenizer(word, add_special_tokens=False).input_ids


def _read_bundled(weights: LoraWeights, tensors: dict[str, torch.Tensor], tokenizer) -> None:
    """`bundle_emb.<word>.clip_g` (one vector per token the word is read as) into token_values."""
    for key, vectors in tensors.items():
        match = re.fullmatch(r"bundle_emb\.(.+)\.(\w+)", key)
        if not match:
            continue
        word, encoder = match.groups()
        ids = word_tokens(tokenizer, word) if tokenizer is not None else []
        if encoder != "clip_g" or vectors.dim() != 2 or len(ids) != vectors.shape[0]:
            weights.notes.append(
                f"the embedding bundled for {word!r} ({key}, {list(vectors.shape)}) is skipped: Stable Cascade's "
                f"text encoder reads {word!r} as {len(ids) or 'an unknown number of'} token(s), each needing one "
                "clip_g vector"
            )
            continue
        weights.token_values.update(zip(ids, vectors))


def _read_kohya(path: Path, tensors: dict[str, torch.Tensor], models: dict[str, nn.Module]) -> LoraWeights:
    by_name = {kohya_name(name, role): (role, name) for role, model in models.items() for name in adaptable(model)}
    parts: dict[str, dict[str, LoraPart]] = {}
    unmatched = []
    stems = sorted({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in tensors if ".lora_down." in k})
    for stem in stems:
        if stem not in by_name:
            unmatched.append(stem)
            continue
        role, name = by_name[stem]
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else float(down.shape[0])
        parts.setdefault(role, {})[name] = LoraPart(down, up, alpha)
    _refuse_unmatched(path, unmatched, len(stems), models)
    return LoraWeights(path, parts, "kohya")


def _read_peft(path: Path, tensors: dict[str, torch.Tensor], models: dict[str, nn.Module]) -> LoraWeights:
    parts: dict[str, dict[str, LoraPart]] = {}
    unmatched, pairs = [], {}
    for key, value in tensors.items():
        match = re.match(r"(.+?)\.(lora_A|lora_B|lora\.down|lora\.up)(\.\w+)?\.weight$", key)
        if match:
            pairs.setdefault(match.group(1), {})["down" if match.group(2) in ("lora_A", "lora.down") else "up"] = value
    for module, pair in pairs.items():
        role, name = "prior", module.removeprefix("base_model.model.")
        for prefix, prefix_role in PEFT_PREFIX.items():
            if name.startswith(prefix):
                role, name = prefix_role, name.removeprefix(prefix)
                break
        if role not in models or name not in adaptable(models[role]) or set(pair) != {"down", "up"}:
            unmatched.append(module)
            continue
        rank = pair["down"].shape[0]
        alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else float(rank)
        parts.setdefault(role, {})[name] = LoraPart(pair["down"], pair["up"], alpha)
    _refuse_unmatched(path, unmatched, len(pairs), models)
    return LoraWeights(path, parts, "peft")


def _stability_targets(prior: nn.Module) -> list[tuple[str, str]]:
    """Stability's LoRA order over its Stage C: each attention's in_proj (as q, k, v here) then its out_proj."""
    out = []
    for name, module in prior.named_modules():
        if name.endswith(".attention") and hasattr(module, "to_q"):
            out += [(name, "in_proj"), (name, "out_proj")]
    return out


def _read_stability(path: Path, tensors: dict[str, torch.Tensor], models: dict[str, nn.Module]) -> LoraWeights:
    targets = _stability_targets(models["prior"])
    count = len({k.split(".")[1] for k in tensors if k.startswith("weights.")})
    if count != len(targets):
        raise ModelConfigError(
            f"lora: {path.name} is in Stability's format with {count} LoRA layers, and this "
            f"model's prior has {len(targets)} attention projections: it was made for another model"
        )
    parts: dict[str, LoraPart] = {}
    for i, (attention, what) in enumerate(targets):
        down, up = tensors[f"weights.{i}.lora_down"], tensors[f"weights.{i}.lora_up"]
        rank = down.shape[0]
        if what == "out_proj":
            parts[f"{attention}.to_out.0"] = LoraPart(down, up, 1.0)
        else:  # one in_proj for q, k and v: the rows of up are q's, then k's, then v's
            for sub, rows in zip(("to_q", "to_k", "to_v"), up.chunk(3, dim=0)):
                parts[f"{attention}.{sub}"] = LoraPart(down, rows.contiguous(), 1.0)
        del rank
    weights = LoraWeights(path, {"prior": parts}, "stability")
    indices, deltas = tensors.get("embeddings.indices"), tensors.get("embeddings.embeddings")
    if indices is not None and deltas is not None:
        vocab = models["text_encoder"].get_input_embeddings().weight.shape[0]
        for index, delta in zip(indices.tolist(), deltas):
            if index < vocab:
                weights.token_deltas[int(index)] = delta
        skipped = sum(1 for index in indices.tolist() if index >= vocab)
        if skipped:
            weights.notes.append(
                f"{skipped} token(s) the LoRA added to its tokenizer are skipped: the file does not "
                "say which words they were"
            )
    return weights


def _refuse_unmatched(path: Path, unmatched: list[str], total: int, models: dict[str, nn.Module]) -> None:
    if not unmatched:
        return
    sample = ", ".join(unmatched[:4]) + (f" and {len(unmatched) - 4} more" if len(unmatched) > 4 else "")
    raise ModelConfigError(
        f"lora: {len(unmatched)} of the {total} layers in {path.name} match nothing in this "
        f"model's {', '.join(models)} ({sample}): it was made for another model, or another "
        "part of Stable Cascade"
    )


def _check_shapes(weights: LoraWeights, models: dict[str, nn.Module]) -> None:
    wrong = []
    for role, parts in weights.parts.items():
        layers = adaptable(models[role])
        for name, part in parts.items():
            layer = layers[name]
            w = layer.weight
            if part.up.shape[0] != w.shape[0] or part.down.shape[1] != w.shape[1] or part.up.shape[1] != part.rank:
                wrong.append(
                    f"{name} (LoRA {list(part.up.shape[:1])}x{list(part.down.shape[1:2])}, layer {list(w.shape[:2])})"
                )
    if weights.token_values:
        width = models["text_encoder"].get_input_embeddings().weight.shape[1]
        wrong += [
            f"token {i} ({v.shape[0]} wide, the text encoder's {width})"
            for i, v in weights.token_values.items()
            if v.shape[0] != width
        ][:1]
    if wrong:
        raise ModelConfigError(
            f"lora: {weights.path.name} does not fit this model: {len(wrong)} layer(s) of another "
            f"size, e.g. {wrong[0]} (it was made for another model or size of Stable Cascade)"
        )


def lora_info(path: Path) -> dict:
    """What a LoRA file says about itself, from its header (no tensor is read): format, what it adapts, trigger
    words, the model it was made for (ours and kohya's metadata keys); and what its user said of it beside the file
    (`user_metadata`): their activation text stands in for the trigger words, and their preferred weight."""
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = list(f.keys()), dict(f.metadata() or {})
    roles = sorted({role for role, prefix in KOHYA_PREFIX.items() if any(k.startswith(prefix) for k in keys)})
    kind = "kohya" if roles else "stability" if any(k.startswith("weights.") for k in keys) else "peft"
    words = sorted({k.split(".")[1] for k in keys if k.startswith("bundle_emb.")})
    roles += [f"the word {w!r}" for w in words]
    user = user_metadata(path)
    return {
        "name": path.stem,
        "file": str(path),
        "sha256": short_hash(path),
        "format": kind,
        "adapts": ", ".join(roles) or ("prior" if kind != "kohya" else "?"),
        "trigger_words": user.get("activation text") or _header_trigger_words(metadata),
        "preferred_weight": user.get("preferred weight"),
        "base_model": metadata.get("cascade_studio.base_model") or metadata.get("ss_base_model_version", ""),
        "rank": metadata.get("cascade_studio.rank") or metadata.get("ss_network_dim", ""),
    }


def _header_trigger_words(metadata: dict[str, str]) -> str:
    """Ours, else kohya's three most frequent caption tags."""
    ours = metadata.get("cascade_studio.trigger_words", "")
    if ours or "ss_tag_frequency" not in metadata:
        return ours
    try:
        counts: dict[str, int] = {}
        for tags in json.loads(metadata["ss_tag_frequency"]).values():
            for tag, n in tags.items():
                counts[tag] = counts.get(tag, 0) + n
        return ", ".join(sorted(counts, key=counts.get, reverse=True)[:3])
    except (ValueError, AttributeError):
        return ""


def user_metadata(path: Path) -> dict:
    """A1111's user metadata for a network, `<name>.json` beside the file (its Lora card's editor and Civitai
    Helper write it): 'activation text', the words its user puts in the prompt with it, and 'preferred weight'
    (0 for none). A file that is missing, unreadable or holds other types counts as saying nothing."""
    try:
        data = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    text, weight = data.get("activation text"), data.get("preferred weight")
    out = {}
    if isinstance(text, str) and text.strip():
        out["activation text"] = text.strip()
    if isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight != 0:
        out["preferred weight"] = float(weight)
    return out


class LoraStack:
    """The LoRAs active on a loaded model. `activate` makes exactly the given (weights, strength) pairs active;
    an empty list (or strengths of 0) puts the base model back as it was."""

    def __init__(self, models: dict[str, nn.Module]):
        self.models = models
        self.active: tuple[tuple[str, float], ...] = ()
        self.roles: set[str] = set()  # the parts of the model the active LoRAs change
        self._token_base: dict[int, torch.Tensor] = {}

    def key(self) -> tuple:
        return self.active

    def activate(self, loras: list[tuple[LoraWeights, float]]) -> bool:
        """Returns whether anything changed (caches keyed by the LoRA set know from the key)."""
        loras = [(w, s) for w, s in loras if s != 0]  # weight 0: not applied at all, bit-identical to none
        wanted = tuple((f"{w.name}@{w.sha256}", float(s)) for w, s in loras)
        if wanted == self.active:
            return False
        self.unload()
        for i, (weights, strength) in enumerate(loras):
            self._apply(weights, strength, f"lora{i}")
            tokens = weights.token_deltas or weights.token_values
            self.roles |= set(weights.parts) | ({"text_encoder"} if tokens else set())
        self.active = wanted
        return True

    @torch.no_grad()
    def _apply(self, weights: LoraWeights, strength: float, adapter: str) -> None:
        for role, parts in weights.parts.items():
            model = self.models[role]
            layers = adaptable(model)
            config = LoraConfig(
                r=max(p.rank for p in parts.values()),
                lora_alpha=1.0,
                target_modules=list(parts),
                rank_pattern={re.escape(n): p.rank for n, p in parts.items()},
                alpha_pattern={re.escape(n): p.alpha for n, p in parts.items()},
            )
            inject_adapter_in_model(config, model, adapter_name=adapter)
            vars(model).pop("peft_config", None)  # the layers know their adapters; the model needs no record
            for name, part in parts.items():
                layer = model.get_submodule(name)
                base = layers[name]
                a, b = layer.lora_A[adapter], layer.lora_B[adapter]
                a.weight.data = part.down.reshape(a.weight.shape).to(base.weight.device, base.weight.dtype)
                b.weight.data = part.up.reshape(b.weight.shape).to(base.weight.device, base.weight.dtype)
                layer.set_scale(adapter, strength)
            for module in model.modules():  # every adapter so far stays active: the LoRAs stack
                if isinstance(module, BaseTunerLayer):
                    module.set_adapter(sorted(module.lora_A.keys()))
            model.requires_grad_(False)
        if weights.token_deltas or weights.token_values:
            embedding = self.models["text_encoder"].get_input_embeddings().weight
            for index, delta in weights.token_deltas.items():
                self._token_base.setdefault(index, embedding.data[index].clone())
                embedding.data[index] += strength * delta.to(embedding.dtype)
            for index, value in weights.token_values.items():  # the base value's way to the file's, by the weight
                base = self._token_base.setdefault(index, embedding.data[index].clone())
                embedding.data[index] += strength * (value.to(embedding.device, embedding.dtype) - base)
        for note in weights.notes:
            log.info("lora %s: %s", weights.name, note)

    def unload(self) -> None:
        """The very same base layers back in place of peft's wrappers; trained tokens back to their values."""
        for model in self.models.values():
            vars(model).pop("peft_config", None)  # what inject_adapter_in_model leaves on the model
            for name, module in list(model.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    parent_name, _, child = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    setattr(parent, child, module.get_base_layer())
        if self._token_base:
            embedding = self.models["text_encoder"].get_input_embeddings().weight
            for index, value in self._token_base.items():
                embedding.data[index] = value
            self._token_base.clear()
        self.active, self.roles = (), set()


class LoraLibrary:
    """LoRA files by name: the `.safetensors` files of a folder (CASCADE_LORA_DIR), and files given by path."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder).expanduser() if folder else None
        self._extra: dict[str, Path] = {}

    def add(self, path: Path) -> str:
        """A file given by path (the CLI's --lora PATH); returns the name it goes by."""
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ModelConfigError(f"lora: {path} is not a file")
        self._extra[path.stem] = path
        return path.stem

    def files(self) -> dict[str, Path]:
        found = {}
        if self.folder is not None and self.folder.is_dir():
            found = {p.stem: p for p in sorted(self.folder.glob("*.safetensors"))}
        return found | self._extra

    def find(self, name: str) -> Path:
        files = self.files()
        if name not in files:
            where = f" in {self.folder}" if self.folder else " (no LoRA folder set: --lora-dir or CASCADE_LORA_DIR)"
            known = f"; known: {', '.join(sorted(files)[:10])}" if files else ""
            raise ModelConfigError(f"lora: no LoRA named {name!r}{where}{known}")
        return files[name]
