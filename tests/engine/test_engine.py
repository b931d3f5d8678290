"""End-to-end generation with the tiny model through the real loading code and diffusers pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler, StableCascadeDecoderPipeline, StableCascadePriorPipeline

from cascade_studio.config import Settings
from cascade_studio.engine import CancelToken, CascadeEngine, GenerationCancelled
from tests.conftest import small_request


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_generates_the_requested_images_with_seeds(engine):
    result = engine(small_request(num_images=2, seed=10, width=384, height=256))
    assert result.seeds == [10, 11]
    assert [im.size for im in result.images] == [(384, 256)] * 2
    assert result.request.seed == 10 and not result.prior_cached
    assert set(result.timings) == {"text", "prior", "decoder", "total"}
    assert result.timings["total"] >= result.timings["prior"] + result.timings["decoder"]
    # Different seeds give different images.
    assert np.abs(pixels(result.images[0]) - pixels(result.images[1])).max() > 0


def test_random_seed_is_reported_and_reproduces(engine):
    first = engine(small_request())
    again = engine(small_request(seed=first.seeds[0]))
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_same_request_gives_identical_pixels(engine):
    a = engine(small_request(seed=3, prior_guidance=6.0))
    engine._prior_cache.clear()
    engine._text_cache.clear()
    b = engine(small_request(seed=3, prior_guidance=6.0))
    assert not b.prior_cached
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))


def test_image_of_a_batch_regenerates_alone(engine):
    batch = engine(small_request(num_images=3, seed=100))
    for i in (0, 2):
        alone = engine(small_request(seed=100 + i))
        assert np.abs(pixels(batch.images[i]) - pixels(alone.images[0])).max() <= 1


def test_changing_only_decoder_settings_reuses_the_prior(engine):
    first = engine(small_request(seed=21, num_images=2))
    tuned = engine(small_request(seed=21, num_images=2, decoder_steps=5, decoder_guidance=2.0))
    assert tuned.prior_cached and tuned.timings["prior"] == 0.0 and tuned.timings["text"] == 0.0
    # The cached run gives exactly what an uncached run with the same settings gives.
    engine._prior_cache.clear()
    fresh = engine(small_request(seed=21, num_images=2, decoder_steps=5, decoder_guidance=2.0))
    assert not fresh.prior_cached
    for a, b in zip(tuned.images, fresh.images):
        assert np.array_equal(pixels(a), pixels(b))
    # Changing a prior setting runs the prior again.
    assert not engine(small_request(seed=21, num_images=2, prior_guidance=5.0)).prior_cached
    assert not first.prior_cached


def test_decoder_guidance_above_one_works_with_negative_prompt(engine):
    # diffusers' combined pipeline crashes here when embeddings are precomputed.
    with_cfg = engine(small_request(seed=5, decoder_guidance=3.0, negative_prompt="green"))
    without = engine(small_request(seed=5, decoder_guidance=0.0, negative_prompt="green"))
    assert with_cfg.images[0].size == (256, 256)
    assert np.abs(pixels(with_cfg.images[0]) - pixels(without.images[0])).max() > 0


def test_prior_guidance_off_and_on(engine):
    off = engine(small_request(seed=5, prior_guidance=1.0))
    on = engine(small_request(seed=5, prior_guidance=4.0))
    assert np.abs(pixels(off.images[0]) - pixels(on.images[0])).max() > 0


def test_matches_diffusers_pipelines_called_directly(engine):
    """Our images equal stock StableCascadePriorPipeline + StableCascadeDecoderPipeline, with diffusers' own
    scheduler, for the same generators."""
    p = engine.pipelines
    config = p.prior.scheduler.config
    prior = StableCascadePriorPipeline(
        tokenizer=p.prior.tokenizer,
        text_encoder=p.prior.text_encoder,
        prior=p.prior.prior,
        scheduler=DDPMWuerstchenScheduler.from_config(config),
    )
    decoder = StableCascadeDecoderPipeline(
        decoder=p.decoder.decoder,
        tokenizer=p.decoder.tokenizer,
        text_encoder=p.decoder.text_encoder,
        vqgan=p.decoder.vqgan,
        scheduler=DDPMWuerstchenScheduler.from_config(config),
    )
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    req = small_request(seed=42, num_images=2, negative_prompt="blurry", prior_guidance=5.0, decoder_guidance=2.0)
    ours = engine(req)

    def gens():
        return [torch.Generator("cpu").manual_seed(s) for s in (42, 43)]

    with torch.inference_mode():
        emb = prior(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            height=256,
            width=256,
            num_inference_steps=4,
            guidance_scale=5.0,
            num_images_per_prompt=2,
            generator=gens(),
        ).image_embeddings
        images = decoder(
            image_embeddings=emb,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            num_inference_steps=3,
            guidance_scale=2.0,
            generator=gens(),
            output_type="pil",
        ).images
    for a, b in zip(ours.images, images):
        assert np.array_equal(pixels(a), pixels(b))


def test_progress_reports_each_step_with_previews(engine):
    events = []
    engine(small_request(seed=1, prior_steps=4, decoder_steps=3), progress=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [("prior", i, 4) for i in range(1, 5)] + [
        ("decoder", i, 3) for i in range(1, 4)
    ]
    assert all(a.elapsed <= b.elapsed for a, b in zip(events, events[1:]))
    # The tiny model ships a previewer: prior steps carry an RGB preview of the latent, decoder steps none.
    assert all(e.preview is not None and e.preview.mode == "RGB" for e in events if e.stage == "prior")
    assert all(e.preview is None for e in events if e.stage == "decoder")


@pytest.mark.parametrize("stage, at_step", [("prior", 2), ("decoder", 1)])
def test_cancel_stops_between_steps(engine, stage, at_step):
    token = CancelToken()
    seen = []

    def on_progress(event):
        seen.append((event.stage, event.step))
        if (event.stage, event.step) == (stage, at_step):
            token.cancel()

    with pytest.raises(GenerationCancelled):
        engine(small_request(seed=77, prior_guidance=4.5), progress=on_progress, cancel=token)
    assert seen[-1] == (stage, at_step)
    # The engine keeps working after a cancelled run.
    assert len(engine(small_request(seed=77)).images) == 1


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_cancel_takes_effect_inside_a_step(engine, stage):
    """A slow step (a big image on a CPU) does not delay Cancel: the next block of the network stops the run."""
    token, seen = CancelToken(), []
    unet = engine.pipelines.prior.prior if stage == "prior" else engine.pipelines.decoder.decoder
    # Cancel from "another thread" at the moment the first block of the stage's first step runs.
    handle = unet.down_blocks[0][0].register_forward_hook(lambda *_: token.cancel())
    try:
        with pytest.raises(GenerationCancelled):
            engine(small_request(seed=78), progress=lambda e: seen.append(e.stage), cancel=token)
    finally:
        handle.remove()
    assert stage not in seen  # stopped before the stage's first step ended
    assert len(engine(small_request(seed=78)).images) == 1


def test_cancelled_before_start_does_nothing(engine):
    token = CancelToken()
    token.cancel()
    with pytest.raises(GenerationCancelled):
        engine(small_request(seed=2), cancel=token)


def test_long_prompt_reports_the_cut_words(engine):
    prompt = " ".join(["red"] * 75 + ["blue", "square"])
    report = engine.prompt_report(prompt)
    assert (report.tokens, report.limit) == (77, 75)
    assert report.cut_text == "blue square"
    result = engine(small_request(prompt=prompt, seed=1))
    assert result.warnings == report.warnings and "'blue square'" in report.warnings[0]
    assert engine.prompt_report("a red circle").warnings == []
    # A word split across the window's end is cut whole: its first tokens alone are not the word.
    spelled = engine.prompt_report(" ".join(["red"] * 73 + ["lighthouse"]))  # not in the tiny vocabulary: letters
    assert spelled.tokens > 75 and spelled.cut_text == "lighthouse"


def test_closed_vocabulary_models_name_the_words_they_do_not_know():
    demo = CascadeEngine.from_settings(Settings(model="demo", device="cpu"))
    report = demo.prompt_report("a lighthouse at dusk, oil painting")
    assert report.unknown == ("lighthouse", "dusk", "oil", "painting") and "circles, squares" in report.hint
    assert "this model does not know the words 'lighthouse', 'dusk'" in report.warnings[-1]
    assert demo.prompt_report("A red circle on a white background.").unknown == ()
