"""A tiny-config training run lowers the loss, resumes, and its checkpoint evaluates and analyses."""
import json

import numpy as np
import pytest

from aullava.train import Trainer, TrainConfig

TINY_MODEL = {"aus": (1, 2, 4, 6, 7, 12, 25),
              "encoder": {"type": "landmark_patch", "dim": 32, "chip_size": 64, "channels": 8, "head_layers": 1},
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


def _config(manifest, out, **overrides):
    values = dict(manifest=str(manifest), out=str(out), tiny_llm=True, encoder_steps=30, projector_steps=12,
                  lora_steps=12, encoder_batch=8, batch_size=4, save_every=5, model=TINY_MODEL,
                  encoder_lr=1e-2, projector_lr=3e-2, lora_lr=3e-2)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(tiny_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(_config(tiny_manifest, out))
    path = trainer.run()
    return trainer, path


def _mean(history, stage, part, key="loss"):
    values = [h[key] for h in history if h["stage"] == stage]
    n = max(1, len(values) // 3)
    return float(np.mean(values[:n] if part == "first" else values[-n:]))


def test_training_lowers_the_loss(trained):
    trainer, path = trained
    history = trainer.history
    assert _mean(history, "encoder", "last") < _mean(history, "encoder", "first")
    assert _mean(history, "projector", "last", "lm") < _mean(history, "projector", "first", "lm")
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    card = json.loads((path / "aullava_config.json").read_text())
    assert card["training"]["faces"] == 6 and card["aus"] == list(TINY_MODEL["aus"])


def test_training_resumes_where_it_stopped(tiny_manifest, tmp_path):
    first = Trainer(_config(tiny_manifest, tmp_path, lora_steps=0))
    first.run()
    state = json.loads((tmp_path / "state" / "trainer.json").read_text())
    assert state["stage"] == "lora"
    resumed = Trainer(_config(tiny_manifest, tmp_path, lora_steps=6))
    resumed.run()
    stages = [h["stage"] for h in resumed.history]
    assert stages.count("encoder") == 30 and stages.count("projector") == 12 and stages.count("lora") == 6


def test_evaluate_on_a_tiny_manifest(trained, tiny_manifest, tmp_path):
    from aullava.cli import main

    _, path = trained
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--manifest", str(tiny_manifest), "--checkpoint", str(path),
                 "--formats", "list", "binary", "json", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 6 and report["detection_rate"] == 1.0
    for name in ("list", "binary", "json"):
        metrics = report["formats"][name]
        assert set(metrics["per_au"]) == {f"AU{a}" for a in TINY_MODEL["aus"]}
        assert metrics["seconds_per_image"] > 0
        for values in metrics["per_au"].values():
            assert 0.0 <= values["f1"] <= 1.0
    assert 0.0 <= report["agreement"]["all"] <= 1.0
