"""The generation form: the prompt bar (prompt, token help, Generate, Cancel) and the settings (basic in view,
advanced in an accordion). Numbers are plain number boxes without clamping, so a bad value reaches the handler
and is refused with its allowed range instead of being changed behind the user's back."""

import re
from dataclasses import dataclass

import gradio as gr

from ...engine.request import ALLOWED, GenerationRequest
from ...store import HistoryStore
from .. import handlers as h
from ..handlers import LORA_ROWS, NO_LORA, FormValues, Studio
from .loras import LoraPicker, build_lora_picker, wire_lora_picker
from .picture import PicturePanel, build_picture_panel, editor_value


@dataclass
class Form:
    prompt: gr.Textbox
    tokens: gr.HTML
    run: gr.Button
    stop: gr.Button
    negative_prompt: gr.Textbox
    size: gr.Dropdown
    custom_row: gr.Row
    width: gr.Number
    height: gr.Number
    size_note: gr.Markdown
    num_images: gr.Number
    seed: gr.Textbox
    random_seed: gr.Checkbox
    reuse: gr.Button
    prior_steps: gr.Number
    prior_guidance: gr.Number
    decoder_steps: gr.Number
    decoder_guidance: gr.Number
    loras: LoraPicker
    picture: PicturePanel
    defaults: GenerationRequest  # the model's defaults, for filling the form
    store: HistoryStore  # where the pictures a request names are kept, for filling the picture panel

    @property
    def strength(self) -> gr.Slider:
        return self.picture.strength

    @property
    def fit(self) -> gr.Radio:
        return self.picture.fit

    @property
    def grow(self) -> gr.CheckboxGroup:
        return self.picture.grow

    @property
    def grow_by(self) -> gr.Number:
        return self.picture.grow_by

    def __getattr__(self, name: str):
        """lora_2, lora_2_weight, ...: the LoRA picker's rows, and image_prompt_2_weight, ...: the image prompts'
        weights, by FormValues' names."""
        prompt = re.fullmatch(r"image_prompt_(\d)_weight", name)
        if prompt is not None:
            return self.picture.weights[int(prompt[1]) - 1]
        match = re.fullmatch(r"lora_(\d)(_weight)?", name)
        if match is None:
            raise AttributeError(name)
        row = int(match[1]) - 1
        return self.loras.weights[row] if match[2] else self.loras.names[row]

    def inputs(self) -> set:
        """The components an event reads to build a request (Gradio passes their values as one dict)."""
        return {getattr(self, name) for name in FormValues.names()} | {self.picture.editor, *self.picture.references}

    def pictures(self, data: dict) -> tuple[dict | None, list]:
        """The picture to start from (the editor's value) and the image prompts' pictures, as an event got them."""
        return data[self.picture.editor], [data[r] for r in self.picture.references]

    def read(self, data: dict) -> FormValues:
        return FormValues(**{name: data[getattr(self, name)] for name in FormValues.names()})

    def outputs(self) -> list:
        return [getattr(self, name) for name in FormValues.names()] + [self.picture.editor, self.picture.accordion]

    def fill(self, settings: dict, preset_for) -> dict:
        """Form updates that put these request fields back (from an image, a PNG, a sweep cell)."""
        d = self.defaults
        width, height = settings.get("width", d.width), settings.get("height", d.height)
        values = FormValues(
            prompt=settings.get("prompt", ""),
            negative_prompt=settings.get("negative_prompt", ""),
            size=preset_for(width, height),
            width=width,
            height=height,
            seed="" if settings.get("seed") is None else str(settings["seed"]),
            random_seed=settings.get("seed") is None,
            num_images=settings.get("num_images", 1),
            prior_steps=settings.get("prior_steps", d.prior_steps),
            prior_guidance=settings.get("prior_guidance", d.prior_guidance),
            decoder_steps=settings.get("decoder_steps", d.decoder_steps),
            decoder_guidance=settings.get("decoder_guidance", d.decoder_guidance),
            strength=settings.get("strength", 0.8),
            fit=settings.get("fit", "crop"),
        )
        picked = list(settings.get("loras") or [])[:LORA_ROWS]
        picked += [{"name": NO_LORA, "weight": 1.0}] * (LORA_ROWS - len(picked))
        for i, lora in enumerate(picked, start=1):
            setattr(values, f"lora_{i}", lora["name"])
            setattr(values, f"lora_{i}_weight", lora.get("weight", 1.0))
        out = {getattr(self, name): value for name, value in values.as_dict().items()}
        picture = editor_value(self.store, settings)  # the picture it started from, with its mask as paint
        return out | {self.picture.editor: picture, self.picture.accordion: gr.update(open=picture is not None)}


def range_of(field: str) -> str:
    return ALLOWED[field].removeprefix("a ").removeprefix("whole number ").removeprefix("finite number ")


def build_prompt_bar(studio: Studio) -> dict:
    """Prompt, its token and vocabulary help, Generate and Cancel. Enter (or Ctrl+Enter) generates."""
    prompt = gr.Textbox(
        studio.first_prompt,
        label="Prompt",
        lines=1,
        max_lines=6,
        elem_id="prompt",
        autofocus=True,
        placeholder="describe the picture   (Enter to generate)",
    )
    tokens = gr.HTML(h.token_info(studio, studio.first_prompt), elem_id="tokens")
    with gr.Row(elem_id="actions"):
        run = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
        stop = gr.Button("Cancel", variant="secondary", elem_id="cancel", interactive=False, scale=1)
    return dict(prompt=prompt, tokens=tokens, run=run, stop=stop)


def build_settings(studio: Studio, bar: dict) -> Form:
    """Basic settings in view (negative prompt, size, images, seed); steps and guidance in an accordion."""
    d = studio.engine.request(prompt="")
    sizes = studio.size_choices()
    default_size = next((c for c in sizes if c.startswith(f"{d.width}×{d.height} ")), h.CUSTOM)
    negative = gr.Textbox(
        "",
        label="Negative prompt",
        lines=1,
        max_lines=4,
        elem_id="negative",
        placeholder="what to keep out of the image",
    )
    size = gr.Dropdown(sizes, value=default_size, label="Size (width × height)", elem_id="size")
    with gr.Row(visible=default_size == h.CUSTOM) as custom_row:
        width = gr.Number(label="Width", value=d.width, step=128, elem_id="width")
        height = gr.Number(label="Height", value=d.height, step=128, elem_id="height")
    size_note = gr.Markdown("", elem_id="size-note")
    with gr.Row():
        num_images = gr.Number(
            label="Images", value=1, step=1, precision=0, elem_id="num-images", info="1 to 8; image i uses seed + i"
        )
        # Text, not a number box: empty means random (a number box shows 0 for "none").
        seed = gr.Textbox(
            label="Seed",
            value="",
            elem_id="seed",
            placeholder="random",
            max_lines=1,
            info="shows the seed each run used",
        )
    with gr.Row():
        random_seed = gr.Checkbox(label="Random seed", value=True, elem_id="randomize")
        reuse = gr.Button("Reuse the selected image's seed", size="sm", elem_id="reuse-seed")
    with gr.Accordion("Advanced: steps and guidance", open=False, elem_id="advanced"):
        with gr.Row():
            prior_steps = gr.Number(
                label="Prior steps",
                value=d.prior_steps,
                step=1,
                precision=0,
                elem_id="prior-steps",
                info=range_of("prior_steps"),
            )
            prior_guidance = gr.Number(
                label="Prior guidance",
                value=d.prior_guidance,
                step=0.5,
                elem_id="prior-guidance",
                info=range_of("prior_guidance"),
            )
        with gr.Row():
            decoder_steps = gr.Number(
                label="Decoder steps",
                value=d.decoder_steps,
                step=1,
                precision=0,
                elem_id="decoder-steps",
                info=range_of("decoder_steps"),
            )
            decoder_guidance = gr.Number(
                label="Decoder guidance",
                value=d.decoder_guidance,
                step=0.5,
                elem_id="decoder-guidance",
                info=range_of("decoder_guidance"),
            )
    loras = build_lora_picker(studio)
    picture = build_picture_panel()
    return Form(
        **bar,
        negative_prompt=negative,
        size=size,
        custom_row=custom_row,
        width=width,
        height=height,
        size_note=size_note,
        num_images=num_images,
        seed=seed,
        random_seed=random_seed,
        reuse=reuse,
        prior_steps=prior_steps,
        prior_guidance=prior_guidance,
        decoder_steps=decoder_steps,
        decoder_guidance=decoder_guidance,
        loras=loras,
        picture=picture,
        defaults=d,
        store=studio.store,
    )


def wire_form(studio: Studio, form: Form) -> None:
    """What the form does by itself: token help as you type, the custom size row and its snapping note."""
    for trigger in (form.prompt.change, *(name.change for name in form.loras.names)):
        trigger(
            lambda p, *loras: h.token_info(studio, p, loras),
            inputs=[form.prompt, *form.loras.names],
            outputs=form.tokens,
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )
    wire_lora_picker(studio, form.loras, form.prompt)

    def on_size(choice, w, hgt):
        _, _, note = h.resolve_size(choice, w, hgt)
        return gr.update(visible=choice == h.CUSTOM), note

    for trigger in (form.size.change, form.width.blur, form.height.blur):
        trigger(
            on_size,
            inputs=[form.size, form.width, form.height],
            outputs=[form.custom_row, form.size_note],
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )
