"""LoRA files on the tiny model: every format maps onto the right layers with the right scale, weight 0 and
unloading leave the base model bit-identical, LoRAs stack, bad files are refused with what did not match, and the
caches and PNG metadata know which LoRAs made a picture."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine, RequestError
from cascade_studio.metadata import ImageMetadata, parameters_text, parse_parameters
from cascade_studio.models.errors import ModelConfigError
from cascade_studio.models.lora import adaptable, kohya_name, lora_info, read_lora
from cascade_studio.train.lora import TARGETS
from tests.conftest import small_request


@pytest.fixture(scope="module")
def lora_engine(tiny_model_dir, tmp_path_factory) -> CascadeEngine:
    folder = tmp_path_factory.mktemp("loras")
    return CascadeEngine.from_settings(Settings(model=str(tiny_model_dir), device="cpu", lora_dir=folder))


def targets(engine: CascadeEngine, role: str) -> dict[str, torch.nn.Module]:
    """The attention and feed-forward layers a LoRA of ours adapts."""
    return {n: m for n, m in adaptable(engine.loras.models[role]).items() if re.fullmatch(TARGETS, n)}


def random_pairs(engine, role="prior", rank=4, seed=0, scale=0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in targets(engine, role).items():
        w = layer.weight
        out[name] = (
            scale * torch.randn(rank, w.shape[1], generator=g),
            scale * torch.randn(w.shape[0], rank, generator=g),
        )
    return out


def write(engine, name: str, fmt="kohya", role="prior", alpha=2.0, seed=0, rank=4, metadata=None) -> str:
    """A LoRA file in the library's folder, in one of the formats met in the wild; returns its name."""
    pairs = random_pairs(engine, role, rank, seed)
    state: dict[str, torch.Tensor] = {}
    for module, (down, up) in pairs.items():
        if fmt == "kohya":
            key = kohya_name(module, role)
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
        else:  # peft / diffusers
            prefix = {"prior": "prior", "decoder": "decoder"}[role]
            state |= {f"{prefix}.{module}.lora_A.weight": down, f"{prefix}.{module}.lora_B.weight": up}
            state[f"{prefix}.{module}.alpha"] = torch.tensor(alpha)
    save_file(state, str(engine.lora_library.folder / f"{name}.safetensors"), metadata=metadata)
    return name


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def run(engine, loras=(), **fields):
    engine._prior_cache.clear()
    engine._text_cache.clear()
    request = engine.request(**(small_request(seed=5).model_dump() | fields | {"loras": list(loras)}))
    return engine(request)


# --- key names and formats -------------------------------------------------------------------------------------------


def test_kohya_names_are_comfyuis_stage_c_tree():
    assert kohya_name("down_blocks.0.2.attention.to_out.0", "prior") == (
        "lora_prior_unet_down_blocks_0_2_attention_attn_out_proj"
    )
    assert kohya_name("up_blocks.1.0.attention.to_k", "prior") == "lora_prior_unet_up_blocks_1_0_attention_attn_to_k"
    assert kohya_name("down_blocks.0.1.channelwise.0", "prior") == "lora_prior_unet_down_blocks_0_1_channelwise_0"
    assert kohya_name("clip_txt_pooled_mapper", "decoder") == "lora_unet_clip_mapper"  # Stage B's name for it


def test_a_kohya_file_adds_alpha_over_rank_times_up_down_to_its_layers(lora_engine):
    name = write(lora_engine, "kohya-a", alpha=2.0, rank=4)
    weights = read_lora(lora_engine.lora_library.find(name), lora_engine.loras.models)
    assert weights.format == "kohya" and set(weights.parts["prior"]) == set(targets(lora_engine, "prior"))
    module, (down, up) = next(iter(random_pairs(lora_engine, rank=4).items()))
    layer = lora_engine.loras.models["prior"].get_submodule(module)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = layer(x)
        lora_engine.loras.activate([(weights, 0.5)])
        adapted = lora_engine.loras.models["prior"].get_submodule(module)(x)
        lora_engine.loras.unload()
    expected = base + 0.5 * (2.0 / 4) * x @ (up @ down).T
    assert torch.allclose(adapted, expected, atol=1e-5)


def test_trained_adapter_keys_map_back_to_the_same_layers(lora_engine, tmp_path):
    """diffusers -> kohya (what train-lora writes) -> diffusers (what the loader reads) is the identity."""
    from cascade_studio.train.lora import adapter_state, add_adapter

    prior = lora_engine.loras.models["prior"]
    add_adapter(prior, rank=2, alpha=2.0)
    try:
        for param in (p for n, p in prior.named_parameters() if ".trained." in n):
            torch.nn.init.normal_(param.data)
        state = adapter_state({"prior": prior}, alpha=2.0)
        trained = {
            n: m.lora_A["trained"].weight.detach().clone() for n, m in prior.named_modules() if hasattr(m, "lora_A")
        }
    finally:
        lora_engine.loras.unload()
    path = tmp_path / "round.safetensors"
    save_file(state, str(path))
    weights = read_lora(path, lora_engine.loras.models)
    assert set(weights.parts["prior"]) == set(trained) and len(trained) == len(targets(lora_engine, "prior"))
    for module, down in trained.items():
        assert torch.equal(weights.parts["prior"][module].down, down)
    assert all(k.startswith("lora_prior_unet_") for k in state)


def test_peft_and_kohya_files_of_the_same_weights_make_the_same_pixels(lora_engine):
    kohya, peft = write(lora_engine, "same-k", "kohya", seed=3), write(lora_engine, "same-p", "peft", seed=3)
    a = run(lora_engine, [{"name": kohya, "weight": 0.7}])
    b = run(lora_engine, [{"name": peft, "weight": 0.7}])
    assert read_lora(lora_engine.lora_library.find(peft), lora_engine.loras.models).format == "peft"
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(run(lora_engine)))


def test_stabilitys_format_splits_in_proj_into_q_k_v(lora_engine):
    """Stability's train_c_lora.py: the N-th LoRA of the model over each attention's in_proj then out_proj, scale
    1/rank; the same change written as a kohya file (q, k, v sharing the down matrix) gives the same pixels."""
    prior = lora_engine.loras.models["prior"]
    attentions = [n for n, m in prior.named_modules() if n.endswith(".attention") and hasattr(m, "to_q")]
    g, rank = torch.Generator().manual_seed(4), 2
    stability, kohya = {}, {}
    for i, attention in enumerate(attentions):
        c = prior.get_submodule(f"{attention}.to_q").in_features
        down_in, up_in = torch.randn(rank, c, generator=g), 0.2 * torch.randn(3 * c, rank, generator=g)
        down_out, up_out = torch.randn(rank, c, generator=g), 0.2 * torch.randn(c, rank, generator=g)
        stability |= {f"weights.{2 * i}.lora_down": down_in, f"weights.{2 * i}.lora_up": up_in}
        stability |= {f"weights.{2 * i + 1}.lora_down": down_out, f"weights.{2 * i + 1}.lora_up": up_out}
        for sub, up in zip(("to_q", "to_k", "to_v"), up_in.chunk(3)):
            key = kohya_name(f"{attention}.{sub}", "prior")
            kohya |= {f"{key}.lora_down.weight": down_in.clone(), f"{key}.lora_up.weight": up.contiguous()}
            kohya[f"{key}.alpha"] = torch.tensor(1.0)
        key = kohya_name(f"{attention}.to_out.0", "prior")
        kohya |= {
            f"{key}.lora_down.weight": down_out,
            f"{key}.lora_up.weight": up_out,
            f"{key}.alpha": torch.tensor(1.0),
        }
    folder = lora_engine.lora_library.folder
    save_file(stability, str(folder / "stab.safetensors"))
    save_file(kohya, str(folder / "stab-as-kohya.safetensors"))
    assert read_lora(folder / "stab.safetensors", lora_engine.loras.models).format == "stability"
    a, b = run(lora_engine, [{"name": "stab"}]), run(lora_engine, [{"name": "stab-as-kohya"}])
    assert np.abs(pixels(a) - pixels(b)).max() <= 1
    assert not np.array_equal(pixels(a), pixels(run(lora_engine)))


def test_a_bundled_embedding_changes_only_prompts_with_its_word(lora_engine):
    """`bundle_emb.<word>.clip_g` (what train-lora --trigger-embedding writes): while the LoRA is loaded, the word's
    own tokens read as the file's vectors, at the LoRA's weight; a prompt without the word makes the same pixels as
    the LoRA without the bundle; unloading puts the tokens back."""
    tokenizer = lora_engine.pipelines.prior.tokenizer
    embedding = lora_engine.loras.models["text_encoder"].get_input_embeddings().weight
    ids = tokenizer("xyz", add_special_tokens=False).input_ids
    before = embedding.detach().clone()
    vectors = torch.randn(len(ids), embedding.shape[1], generator=torch.Generator().manual_seed(3))
    folder = lora_engine.lora_library.folder
    name = write(lora_engine, "plain", seed=1)
    pairs = load_file(str(folder / f"{name}.safetensors"))
    save_file(pairs | {"bundle_emb.xyz.clip_g": vectors}, str(folder / "xyz.safetensors"))
    weights = read_lora(folder / "xyz.safetensors", lora_engine.loras.models, tokenizer)
    assert (
        sorted(weights.token_values) == sorted(ids)
        and "the word 'xyz'" in lora_info(folder / "xyz.safetensors")["adapts"]
    )

    without = {"prompt": "a red circle on a blue background"}
    assert np.array_equal(
        pixels(run(lora_engine, [{"name": "xyz"}], **without)),
        pixels(run(lora_engine, [{"name": "plain"}], **without)),
    )
    with_word = {"prompt": "a red xyz on a blue background"}
    assert not np.array_equal(
        pixels(run(lora_engine, [{"name": "xyz"}], **with_word)),
        pixels(run(lora_engine, [{"name": "plain"}], **with_word)),
    )
    with lora_engine.layers_lock:
        lora_engine.loras.activate([(weights, 0.5)])
        assert torch.allclose(embedding[ids], before[ids] + 0.5 * (vectors - before[ids]), atol=1e-6)
        lora_engine.loras.activate([])
    assert torch.equal(embedding, before)

    save_file(pairs | {"bundle_emb.xyz.clip_g": vectors[:1].repeat(len(ids) + 1, 1)}, str(folder / "count.safetensors"))
    skipped = read_lora(folder / "count.safetensors", lora_engine.loras.models, tokenizer)
    assert not skipped.token_values and "'xyz'" in skipped.notes[0] and "skipped" in skipped.notes[0]
    save_file(
        pairs | {"bundle_emb.xyz.clip_g": torch.zeros(len(ids), 2 * embedding.shape[1])},
        str(folder / "wide.safetensors"),
    )
    with pytest.raises(ModelConfigError, match="does not fit this model.*wide"):
        read_lora(folder / "wide.safetensors", lora_engine.loras.models, tokenizer)


# --- weight 0, unloading, stacking -----------------------------------------------------------------------------------


def test_weight_zero_and_unloading_are_bit_identical_to_no_lora(lora_engine):
    name = write(lora_engine, "zero", seed=5)
    before = {k: v.clone() for k, v in lora_engine.loras.models["prior"].state_dict().items()}
    base = run(lora_engine)
    assert np.array_equal(pixels(run(lora_engine, [{"name": name, "weight": 0.0}])), pixels(base))
    assert not np.array_equal(pixels(run(lora_engine, [{"name": name, "weight": 1.0}])), pixels(base))
    assert np.array_equal(pixels(run(lora_engine)), pixels(base))  # unloaded by asking for none
    after = lora_engine.loras.models["prior"].state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not hasattr(lora_engine.loras.models["prior"], "peft_config")


def test_three_loras_stack_and_weights_add(lora_engine):
    a, b, c = (write(lora_engine, f"stack-{i}", seed=10 + i) for i in range(3))
    one = pixels(run(lora_engine, [{"name": a}]))
    three = pixels(run(lora_engine, [{"name": a}, {"name": b}, {"name": c}]))
    assert not np.array_equal(one, three)
    layer = next(m for m in lora_engine.loras.models["prior"].modules() if hasattr(m, "lora_A"))
    assert len(layer.active_adapters) == 3
    # The same LoRA twice at 0.5 is that LoRA at 1: stacked LoRAs add.
    twice = pixels(run(lora_engine, [{"name": a, "weight": 0.5}, {"name": a, "weight": 0.5}]))
    assert np.abs(twice - one).max() <= 2


def test_a_decoder_lora_changes_only_the_decoder(lora_engine):
    name = write(lora_engine, "stage-b", role="decoder", seed=6)
    first = run(lora_engine)
    lora_engine.loras.activate([])
    adapted = run(lora_engine, [{"name": name}])
    assert lora_info(lora_engine.lora_library.find(name))["adapts"] == "decoder"
    assert not np.array_equal(pixels(first), pixels(adapted))


# --- refusals --------------------------------------------------------------------------------------------------------


def test_files_that_fit_nothing_are_refused_with_what_did_not_match(lora_engine, tmp_path):
    models = lora_engine.loras.models
    sd15 = tmp_path / "sd15.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 8), f"{key}.lora_up.weight": torch.zeros(8, 4)}, str(sd15))
    with pytest.raises(ModelConfigError, match=r"1 of the 1 layers in sd15.safetensors match nothing.*proj_in"):
        read_lora(sd15, models)

    big = tmp_path / "bigger-model.safetensors"
    key = kohya_name(next(iter(targets(lora_engine, "prior"))), "prior")
    save_file(
        {f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(2048, 4)}, str(big)
    )
    with pytest.raises(ModelConfigError, match=r"does not fit this model: 1 layer\(s\) of another size"):
        read_lora(big, models)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelConfigError, match="not a readable safetensors file"):
        read_lora(junk, models)
    with pytest.raises(ModelConfigError, match="not a .safetensors file"):
        read_lora(tmp_path / "old.ckpt", models)
    other = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelConfigError, match="holds no LoRA weights"):
        read_lora(other, models)


def test_requests_name_the_lora_field_that_is_wrong(lora_engine):
    write(lora_engine, "known", seed=7)
    with pytest.raises(RequestError) as info:
        lora_engine.request(prompt="x", loras=[{"name": "known"}, {"name": "nowhere"}])
    assert "loras.1.name: no LoRA named 'nowhere'" in str(info.value) and "known" in str(info.value)
    with pytest.raises(RequestError, match=r"loras.0.sha256: the file named 'known' here is sha256:\w{12}"):
        lora_engine.request(prompt="x", loras=[{"name": "known", "sha256": "0" * 12}])
    with pytest.raises(RequestError, match=r"loras.0.weight: must be a finite number from -4 to 4"):
        lora_engine.request(prompt="x", loras=[{"name": "known", "weight": 9}])
    with pytest.raises(RequestError, match=r"loras.0.name"):
        lora_engine.request(prompt="x", loras=[{"name": "../etc/passwd"}])


# --- caches and metadata ---------------------------------------------------------------------------------------------


def test_a_new_lora_set_recomputes_the_prior_and_a_decoder_rerun_reuses_it(lora_engine):
    def generate(loras=(), **fields):
        return lora_engine(lora_engine.request(**small_request(seed=9, **fields).model_dump() | {"loras": list(loras)}))

    name = write(lora_engine, "cached", seed=8)
    lora_engine._prior_cache.clear()
    lora_engine._text_cache.clear()
    base = generate()
    with_lora = generate([{"name": name}])
    assert not with_lora.prior_cached
    assert generate([{"name": name}], decoder_steps=4).prior_cached  # the same LoRAs, the decoder tuned
    back = generate()
    assert back.prior_cached and np.array_equal(pixels(back), pixels(base))
    # The file changed on disk: it is read again, and its new hash names it.
    write(lora_engine, name, seed=99)
    changed = generate([{"name": name}])
    assert not changed.prior_cached and changed.request.loras[0].sha256 != with_lora.request.loras[0].sha256


def test_png_parameters_carry_each_lora_and_its_hash(lora_engine):
    name = write(lora_engine, "meta", seed=11)
    result = lora_engine(
        lora_engine.request(**small_request(seed=12).model_dump() | {"prompt": f"a red circle <lora:{name}:0.8>"})
    )
    request = result.request
    assert request.prompt == "a red circle" and request.loras[0].weight == 0.8 and request.loras[0].sha256
    text = parameters_text(ImageMetadata(request=request, index=0, model=lora_engine.identity))
    assert text.startswith(f"a red circle <lora:{name}:0.8>")
    assert f'Lora hashes: "{name}: {request.loras[0].sha256}"' in text or f"Lora hashes: {name}: " in text
    fields = parse_parameters(text)
    assert fields["prompt"] == "a red circle"
    assert fields["loras"] == [{"name": name, "weight": 0.8, "sha256": request.loras[0].sha256}]
    again = lora_engine(lora_engine.request(**fields))
    assert np.array_equal(pixels(again), pixels(result))
