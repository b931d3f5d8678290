"""Every validation rule: a bad value is refused with a message naming the field and the allowed values."""

import math

import pytest

from cascade_studio.engine import GenerationRequest, RequestError, make_request
from cascade_studio.engine.request import MAX_SEED


def test_defaults_are_the_official_recommendation():
    r = make_request(prompt="a cat")
    assert (r.width, r.height) == (1024, 1024)
    assert (r.prior_steps, r.prior_guidance, r.decoder_steps, r.decoder_guidance) == (20, 4.0, 10, 0.0)
    assert (r.num_images, r.seed, r.negative_prompt) == (1, None, "")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("width", 720, "width: must be a multiple of 128 from 128 to 2048 (got 720)"),
        ("width", 1000, "width: must be a multiple of 128"),  # diffusers silently makes 1000 into 1024
        ("height", 64, "height: must be a multiple of 128 from 128 to 2048 (got 64)"),
        ("height", 2176, "height: must be a multiple of 128 from 128 to 2048"),
        ("width", 1024.0, "width: must be a multiple of 128"),
        ("width", "1024", "width: must be a multiple of 128"),
        ("prior_steps", 0, "prior_steps: must be a whole number from 1 to 100 (got 0)"),  # diffusers returns noise
        ("prior_steps", 101, "prior_steps: must be a whole number from 1 to 100"),
        ("decoder_steps", 2.5, "decoder_steps: must be a whole number from 1 to 100 (got 2.5)"),
        ("decoder_steps", True, "decoder_steps: must be a whole number"),
        ("prior_guidance", math.nan, "prior_guidance: must be a finite number from 0 to 20 (got nan)"),
        ("prior_guidance", -1.0, "prior_guidance: must be a finite number from 0 to 20 (got -1.0)"),
        ("decoder_guidance", math.inf, "decoder_guidance: must be a finite number from 0 to 20 (got inf)"),
        ("decoder_guidance", 20.5, "decoder_guidance: must be a finite number from 0 to 20"),
        ("num_images", 0, "num_images: must be a whole number from 1 to 8 (got 0)"),
        ("num_images", 9, "num_images: must be a whole number from 1 to 8"),
        ("seed", -1, f"seed: must be a whole number from 0 to {MAX_SEED}, or none for a random seed (got -1)"),
        ("seed", MAX_SEED + 1, "seed: must be a whole number from 0 to"),
        ("prompt", 42, "prompt: must be text of at most 2000 characters (got 42)"),
        ("prompt", "x" * 2001, "prompt: must be text of at most 2000 characters"),
        ("negative_prompt", None, "negative_prompt: must be text"),
        ("colour", "red", "colour: unknown field (known fields: prompt, negative_prompt"),
    ],
)
def test_bad_values_are_refused_with_field_and_range(field, value, expected):
    with pytest.raises(RequestError) as err:
        make_request(**{"prompt": "a cat", field: value})
    assert len(err.value.messages) == 1
    assert err.value.messages[0].startswith(expected)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(RequestError) as err:
        make_request(prompt="a cat", width=300, prior_steps=0, decoder_guidance=math.nan)
    assert [m.split(":")[0] for m in err.value.messages] == ["width", "prior_steps", "decoder_guidance"]


def test_missing_prompt_is_named():
    with pytest.raises(RequestError, match="prompt: required"):
        make_request()


def test_last_image_seed_must_fit():
    # Image i uses seed + i and must be reproducible alone, so seed + num_images - 1 must be a valid seed.
    make_request(prompt="x", seed=MAX_SEED - 3, num_images=4)
    with pytest.raises(RequestError, match=r"seed: with num_images=4 the seed must be at most 4294967292"):
        make_request(prompt="x", seed=MAX_SEED - 2, num_images=4)


def test_random_seed_is_fixed_and_reported():
    r = make_request(prompt="x", num_images=8).with_seed()
    assert r.seed is not None and 0 <= r.seed and r.image_seeds[-1] <= MAX_SEED
    assert r.image_seeds == list(range(r.seed, r.seed + 8))
    fixed = make_request(prompt="x", seed=11)
    assert fixed.with_seed() is fixed


def test_valid_edge_values_pass():
    r = GenerationRequest(
        prompt="",
        width=256,
        height=2048,
        prior_steps=100,
        decoder_steps=1,
        prior_guidance=0,
        decoder_guidance=20.0,
        num_images=8,
        seed=0,
    )
    assert r.prior_guidance == 0.0 and isinstance(r.prior_guidance, float)
