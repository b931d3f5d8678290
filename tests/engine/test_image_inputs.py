"""Starting from a picture on the demo model: image-to-image's identities (strength 1 is text-to-image to the pixel,
strength 0 gives the input back through Stage B and A, the distance to the input grows with strength), inpainting
that keeps every unmasked pixel, and the clear refusals: a picture the request names but nobody gave, a model
without the tower an input needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cascade_studio.engine import RequestError
from cascade_studio.engine.inputs import fit, from_image, outpaint, paste_back

SCENE = "a red circle on a blue background"
NEW = "a green square on a yellow background"


def picture(image: Image.Image, name: str = "init_image", mask: bool = False):
    return from_image(image, name, mask=mask)


def distance(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


@pytest.fixture(scope="module")
def scene(demo_engine):
    return picture(demo_engine(demo_engine.request(prompt=SCENE, seed=1)).images[0])


def test_strength_one_is_text_to_image_and_zero_is_the_input(demo_engine, scene):
    e, pictures = demo_engine, {scene.sha256: scene.image}
    text_only = e(e.request(prompt=NEW, seed=5)).images[0]
    same = e(e.request(prompt=NEW, seed=5, init_image=scene.sha256, strength=1.0), pictures=pictures).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(text_only))
    kept = e(e.request(prompt=NEW, seed=5, init_image=scene.sha256, strength=0.0), pictures=pictures).images[0]
    assert distance(kept, scene.image) < 4  # Stage B and A reconstruct the input (the prompt names other colours)
    assert distance(text_only, scene.image) > 60


def test_distance_to_the_input_grows_with_strength(demo_engine, scene):
    e, pictures = demo_engine, {scene.sha256: scene.image}
    far = [
        distance(
            e(
                e.request(prompt=NEW, seed=7, init_image=scene.sha256, strength=s, prior_guidance=1.0),
                pictures=pictures,
            ).images[0],
            scene.image,
        )
        for s in (0.0, 0.5, 0.7)  # below about 0.3 the prior keeps the input (its low-noise stage): 0.2 is like 0
    ]
    assert far[0] < far[1] < far[2] and far[2] > 60, far


def test_img2img_runs_only_the_rest_of_the_steps_and_caches_by_input(demo_engine, scene):
    e, steps = demo_engine, []
    request = e.request(prompt=NEW, seed=9, init_image=scene.sha256, strength=0.5, prior_steps=10)
    result = e(request, pictures={scene.sha256: scene.image}, progress=lambda ev: steps.append(ev))
    assert [ev.total for ev in steps if ev.stage == "prior"] == [5] * 5
    again = e(request, pictures={scene.sha256: scene.image})
    assert again.prior_cached and np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    other = picture(Image.new("RGB", (128, 128), (250, 250, 0)))
    moved = e(request.model_copy(update={"init_image": other.sha256}), pictures={other.sha256: other.image})
    assert not moved.prior_cached  # the prior cache is keyed by the input too


def test_inpainting_keeps_every_unmasked_pixel(demo_engine, scene):
    e = demo_engine
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 128))  # repaint the left half
    m = picture(mask, "mask", mask=True)
    request = e.request(prompt=NEW, seed=5, init_image=scene.sha256, mask=m.sha256, strength=1.0)
    made = np.asarray(e(request, pictures={scene.sha256: scene.image, m.sha256: m.image}).images[0], int)
    source = np.asarray(scene.image, int)
    assert np.abs(made[:, 64:] - source[:, 64:]).max() == 0  # kept: the input's own pixels
    assert np.abs(made[:, :64] - source[:, :64]).mean() > 40  # repainted, as the prompt says


def test_inpainting_a_larger_picture_keeps_its_own_pixels(demo_engine, scene):
    """At 512x512 the demo draws at 128x128 and enlarges (test_demo_model): the kept pixels are still the 512x512
    input's own, not an enlarged copy of it."""
    e = demo_engine
    large = picture(scene.image.resize((512, 512), Image.Resampling.NEAREST))
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (0, 0, 256, 512))  # repaint the left half
    m = picture(mask, "mask", mask=True)
    request = e.request(prompt=NEW, seed=5, init_image=large.sha256, mask=m.sha256, width=512, height=512)
    made = e(request, pictures={large.sha256: large.image, m.sha256: m.image}).images[0]
    assert made.size == (512, 512)
    made, source = np.asarray(made, int), np.asarray(large.image, int)
    assert np.abs(made[:, 256:] - source[:, 256:]).max() == 0
    assert np.abs(made[:, :256] - source[:, :256]).mean() > 40


def test_a_wide_input_is_drawn_from_its_middle_square(demo_engine, scene):
    """The demo draws squares: from a 256x128 picture it starts from the middle square, and its picture comes back
    in the middle of a 256x128 one."""
    e = demo_engine
    wide = Image.new("RGB", (256, 128), scene.image.getpixel((0, 0)))
    wide.paste(scene.image, (64, 0))
    given = picture(wide)
    request = e.request(prompt=NEW, seed=5, init_image=given.sha256, strength=0.0, width=256, height=128)
    result = e(request, pictures={given.sha256: given.image})
    assert result.images[0].size == (256, 128)
    assert distance(result.images[0].crop((64, 0, 192, 128)), scene.image) < 4
    assert result.warnings[-1].endswith(
        "carried its edges out to 256x128; it started from the init_image's middle square"
    )


def test_a_mask_of_another_size_is_resized_and_said(demo_engine, scene):
    e = demo_engine
    small = picture(Image.new("L", (32, 32), 255), "mask", mask=True)
    request = e.request(prompt=NEW, seed=5, init_image=scene.sha256, mask=small.sha256, strength=0.5)
    result = e(request, pictures={scene.sha256: scene.image, small.sha256: small.image})
    assert any("mask: 32x32 resized to the init_image's size, 128x128" in w for w in result.warnings)


def test_pictures_named_but_not_given_and_towers_missing_are_refused(demo_engine, engine, scene):
    with pytest.raises(RequestError) as caught:
        demo_engine(demo_engine.request(prompt=NEW, init_image=scene.sha256), pictures={})
    assert caught.value.messages == [f"init_image: no picture with sha256 {scene.sha256} was given"]
    with pytest.raises(RequestError) as caught:  # the tiny test model has no CLIP image tower either
        engine.request(prompt="", image_prompts=[{"image": scene.sha256, "weight": 0.5}])
    assert caught.value.messages[0].startswith("image_prompts: tiny has no CLIP image tower")
    with pytest.raises(RequestError) as caught:  # the tiny test model has no Stage C image encoder
        engine.request(prompt=NEW, init_image=scene.sha256)
    assert caught.value.messages[0].startswith("init_image: ") and "no image encoder" in caught.value.messages[0]


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"strength": 1.5}, "strength: must be a finite number from 0 (keep the input) to 1 (ignore it)"),
        ({"fit": "stretch"}, "fit: must be one of crop, pad, resize"),
        ({"init_image": "abc"}, "init_image: must be a picture's SHA-256"),
        ({"mask": "0" * 64}, "mask: needs an init_image"),
        ({"image_prompts": [{"image": "0" * 64, "weight": 3}]}, "image_prompts.0.weight: must be a finite number"),
        ({"image_prompts": [{"image": "0" * 64}] * 5}, "image_prompts: must be a list of at most 4 image prompts"),
    ],
)
def test_bad_picture_fields_name_the_field(fields, words):
    from cascade_studio.engine import make_request

    with pytest.raises(RequestError) as caught:
        make_request(prompt="a cat", **fields)
    assert any(m.startswith(words) for m in caught.value.messages), caught.value.messages


def test_geometry_fit_outpaint_and_paste_back():
    wide = Image.new("RGB", (300, 100), "red")
    assert fit(wide, 128, 128, "crop").size == (128, 128)
    padded = fit(wide, 128, 128, "pad")
    assert padded.getpixel((64, 5)) == (255, 255, 255) and padded.getpixel((64, 64)) == (255, 0, 0)
    canvas, mask = outpaint(Image.new("RGB", (64, 64), "blue"), left=32, top=16)
    assert canvas.size == (96, 80) and mask.getpixel((0, 0)) == 255 and mask.getpixel((40, 20)) == 0
    assert canvas.getpixel((0, 0)) == (0, 0, 255)  # the edge repeated: a start the prior can continue
    made = Image.new("RGB", (96, 80), "white")
    blended = np.asarray(paste_back(made, canvas, mask), int)
    assert (blended[16:, 32:] == [0, 0, 255]).all()  # every kept pixel is the original's
    assert (blended[:8, :24] == 255).all()  # deep inside the mask: the made picture


@pytest.fixture(scope="module")
def towered_engine(tmp_path_factory):
    """The tiny model with a tiny CLIP image tower, laid out as the official prior repo has it."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from cascade_studio.config import Settings
    from cascade_studio.engine import CascadeEngine
    from cascade_studio.models.architectures import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("towered") / "tiny", previewer=False)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,  # the tiny prior's clip_image_in_channels
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    return CascadeEngine.from_settings(Settings(model=str(folder), device="cpu"))


def test_image_prompts_through_the_clip_tower(towered_engine):
    from tests.conftest import SMALL

    e = towered_engine
    ref = picture(Image.new("RGB", (64, 48), (200, 30, 30)), "image_prompts.0.image")
    pictures = {ref.sha256: ref.image}
    base = dict(prompt="a red circle", seed=2, **SMALL)
    plain = np.asarray(e(e.request(**base)).images[0])
    zero = e(e.request(**base, image_prompts=[{"image": ref.sha256, "weight": 0.0}]), pictures=pictures)
    assert np.array_equal(np.asarray(zero.images[0]), plain)  # weight 0: the prior sees no image prompt
    weighted = e(e.request(**base, image_prompts=[{"image": ref.sha256, "weight": 1.5}]), pictures=pictures)
    assert not np.array_equal(np.asarray(weighted.images[0]), plain)
    alone = e(e.request(**(base | {"prompt": ""}), image_prompts=[{"image": ref.sha256}]), pictures=pictures)
    assert len(alone.images) == 1  # an image prompt alone, with no text
    tower, _ = e.image_tower()
    assert next(tower.parameters()).device == e.pipelines.device
