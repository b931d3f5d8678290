"""The LoRA picker in the settings: three rows of a LoRA and its weight, the chosen ones' trigger words with a
button that puts them in the prompt, and a refresh for files added to the LoRA folder since the page loaded.
A LoRA picked in a row sets the row's weight to its preferred weight where its user gave one (A1111's .json
beside the file), as A1111's Lora cards do. (A1111's `<lora:name:weight>` in the prompt works too; it adds to
what is picked here.)"""

from dataclasses import dataclass

import gradio as gr

from ...engine.request import ALLOWED
from ..handlers import LORA_ROWS, NO_LORA, Studio


@dataclass
class LoraPicker:
    names: list[gr.Dropdown]
    weights: list[gr.Number]
    words: gr.Markdown
    insert: gr.Button
    refresh: gr.Button


def build_lora_picker(studio: Studio) -> LoraPicker:
    choices = [NO_LORA, *studio.lora_names()]
    with gr.Accordion("LoRAs", open=False, elem_id="loras"):
        names, weights = [], []
        for i in range(1, LORA_ROWS + 1):
            with gr.Row(equal_height=True):
                names.append(
                    gr.Dropdown(
                        choices, value=NO_LORA, label=f"LoRA {i}", allow_custom_value=True, elem_id=f"lora-{i}", scale=3
                    )
                )
                weights.append(
                    gr.Number(
                        label="Weight",
                        value=1.0,
                        step=0.05,
                        elem_id=f"lora-{i}-weight",
                        scale=1,
                        min_width=90,
                        info=ALLOWED["loras.weight"].removeprefix("a finite number "),
                    )
                )
        words = gr.Markdown("", elem_id="lora-words")
        with gr.Row():
            insert = gr.Button("Add trigger words to the prompt", size="sm", elem_id="lora-insert")
            refresh = gr.Button("↻ Refresh list", size="sm", elem_id="lora-refresh")
    return LoraPicker(names, weights, words, insert, refresh)


def wire_lora_picker(studio: Studio, picker: LoraPicker, prompt: gr.Textbox) -> None:
    def on_change(*names):
        return studio.lora_words_text(names)

    for name in picker.names:
        name.change(on_change, inputs=picker.names, outputs=picker.words, queue=False, api_visibility="private")
    for name, weight in zip(picker.names, picker.weights):  # the user's pick only, not a refresh of the list
        name.input(studio.lora_weight, inputs=[name, weight], outputs=weight, queue=False, api_visibility="private")

    def on_insert(text, *names):
        return studio.with_trigger_words(text or "", names)

    picker.insert.click(
        on_insert, inputs=[prompt, *picker.names], outputs=prompt, queue=False, api_visibility="private"
    )

    def on_refresh(*names):
        choices = [NO_LORA, *studio.lora_names()]
        return [gr.update(choices=choices, value=n if n in choices else NO_LORA) for n in names]

    picker.refresh.click(on_refresh, inputs=picker.names, outputs=picker.names, queue=False, api_visibility="private")
