"""Start from a picture: upload, paste or drop one in, paint over what to repaint, set the strength and the fit.

No paint: image-to-image over the whole picture, as much as Strength says. Paint: inpainting, where only the
painted part changes and every other pixel stays the picture's own."""

from dataclasses import dataclass

import gradio as gr
from PIL import Image

from ...engine.inputs import SIDES
from ...engine.request import FITS, MAX_IMAGE_PROMPTS
from .. import handlers as h
from ..handlers import Studio, StudioError

PAINT = (255, 0, 255, 255)  # the brush's colour: what marks the part to repaint


@dataclass
class PicturePanel:
    accordion: gr.Accordion
    editor: gr.ImageEditor
    strength: gr.Slider
    fit: gr.Radio
    grow: gr.CheckboxGroup
    grow_by: gr.Number
    references: list[gr.Image]  # image prompts
    weights: list[gr.Slider]


def build_picture_panel() -> PicturePanel:
    with gr.Accordion("Start from a picture", open=False, elem_id="picture-panel") as accordion:
        gr.Markdown(
            "Upload, paste or drop a picture, or *Start from this image* under a result. Paint over what should "
            "change (the brush, left); without paint the whole picture changes, as much as Strength says.",
            elem_id="picture-help",
        )
        editor = gr.ImageEditor(
            label="Picture to start from",
            show_label=False,
            type="pil",
            sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=24),  # PAINT
            eraser=gr.Eraser(),
            transforms=(),
            layers=False,
            height=360,
            elem_id="init-image",
        )
        strength = gr.Slider(
            0.0,
            1.0,
            value=0.8,
            step=0.05,
            label="Strength",
            info="0 keeps the picture, 1 ignores it; with paint, only the painted part changes",
            elem_id="strength",
        )
        fit = gr.Radio(list(FITS), value="crop", label="Fit to the size", elem_id="fit")
        with gr.Row(elem_id="outpaint"):
            grow = gr.CheckboxGroup(
                list(SIDES), label="Outpaint: grow the canvas", info="the new border is painted", elem_id="grow"
            )
            grow_by = gr.Number(value=128, label="by (pixels)", precision=0, minimum=0, elem_id="grow-by")
        with gr.Accordion("Image prompts: pictures the prior sees (models with a CLIP image tower)", open=False):
            references, weights = [], []
            with gr.Row(elem_id="image-prompts"):
                for i in range(1, MAX_IMAGE_PROMPTS + 1):
                    with gr.Column(min_width=120):
                        references.append(
                            gr.Image(
                                type="pil",
                                sources=["upload", "clipboard"],
                                label=f"Reference {i}",
                                height=120,
                                elem_id=f"image-prompt-{i}",
                            )
                        )
                        weights.append(
                            gr.Slider(0.0, 2.0, value=1.0, step=0.1, label="weight", elem_id=f"image-prompt-weight-{i}")
                        )
    return PicturePanel(accordion, editor, strength, fit, grow, grow_by, references, weights)


def editor_value(store, settings: dict) -> dict | None:
    """The editor's value for a request's picture fields: the stored picture, its mask as paint over it (what
    *Use these settings* and a PNG's settings put back); None, an empty editor, for text-to-image."""
    sha = settings.get("init_image")
    if not sha or not store.picture_file(sha).is_file():
        return None
    with Image.open(store.picture_file(sha)) as opened:
        image = opened.convert("RGB")
    mask_sha = settings.get("mask")
    if not mask_sha or not store.picture_file(mask_sha).is_file():
        return editing(image)
    with Image.open(store.picture_file(mask_sha)) as mask:
        paint = Image.new("RGBA", image.size, PAINT)
        paint.putalpha(mask.convert("L").resize(image.size))
    return editing(image, paint)


def editing(image: Image.Image, paint: Image.Image | None = None) -> dict:
    """An ImageEditor value: the picture as its background, with `paint` (RGBA) as its one layer if given."""
    if paint is None:
        return {"background": image, "layers": [], "composite": image}
    composite = Image.alpha_composite(image.convert("RGBA"), paint).convert("RGB")
    return {"background": image, "layers": [paint], "composite": composite}


def wire_start_from(studio: Studio, panel: PicturePanel, button: gr.Button, selected: gr.State, said, tabs=None):
    """`button` puts the selected gallery image into the picture panel, opened (and, from another tab, shown)."""

    def on_start(key):
        if not key:
            return {said: "**Error:** select an image first"}
        try:
            record, index = h.lookup(studio.store, key)
            with Image.open(studio.store.image_file(record.images[index])) as opened:
                image = opened.convert("RGB")
        except (StudioError, OSError) as exc:
            return {said: f"**Error:** {exc}"}
        out = {panel.editor: editing(image), panel.accordion: gr.update(open=True)}
        return out | ({tabs: gr.Tabs(selected="generate")} if tabs is not None else {})

    outputs = [panel.editor, panel.accordion, said, *([tabs] if tabs is not None else [])]
    button.click(on_start, inputs=selected, outputs=outputs, show_progress="hidden", api_visibility="private")
