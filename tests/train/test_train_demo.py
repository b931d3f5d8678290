"""The training command end to end, at a few steps per stage: its folder loads and generates like any model."""

from __future__ import annotations

import json

from cascade_studio.config import Settings
from cascade_studio.engine import CascadeEngine
from cascade_studio.train.run import TrainConfig, train_demo


def test_train_demo_writes_a_loadable_model(tmp_path):
    out = tmp_path / "demo"
    logs: list[str] = []
    cfg = TrainConfig(steps_a=2, steps_b=2, steps_c=2, steps_previewer=2, decoder_scenes=16, prior_scenes=16)
    report = train_demo(out, cfg, log=logs.append)
    assert {"stage A", "stage B", "stage C", "previewer"} <= set(report["final_losses"])
    assert any(line.startswith("stage C step 2/2 loss") for line in logs)
    assert (out / "loss.png").is_file()
    assert (out / "image_encoder" / "config.json").is_file()  # for `eval-demo --stage decoder`
    card = json.loads((out / "cascade_studio.json").read_text())
    assert card["name"] == "cascade-studio-demo" and card["defaults"]["width"] == 128
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "VPredictionWuerstchenScheduler"
    # The same loading and generation code as the official weights; the folder's defaults apply.
    engine = CascadeEngine.from_settings(Settings(model=str(out), device="cpu"))
    assert engine.pipelines.previewer is not None
    result = engine(engine.request(prompt="a red circle on a white background", seed=0, prior_steps=2, decoder_steps=2))
    assert result.images[0].size == (128, 128) and result.model.name == "cascade-studio-demo"
