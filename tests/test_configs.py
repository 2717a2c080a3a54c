"""The example training configs load into TrainConfig / AULlavaConfig, and bad ones fail clearly."""
import json
from pathlib import Path

import pytest
import torch

from aullava.encoders import AUEncoder, build_encoder
from aullava.model import AULlavaConfig
from aullava.train import train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_load(path, tmp_path):
    config = train_config(path, manifest="m.csv", out=str(tmp_path), batch_size=4)
    assert config.batch_size == 4 and config.manifest == "m.csv"  # flags override the file
    model = AULlavaConfig(base_llm=config.base_llm, **config.model)
    if path.name.startswith("gpu-"):
        assert model.encoder["type"] == "hf" and "/" in model.encoder["model_id"]
        assert model.chip_size == 224
    else:  # CPU configs: the offline encoder with another CNN, built here from what the repo ships
        assert model.encoder["type"] == "landmark_patch" and model.chip_size == 64
        tokens, logits = build_encoder(model.encoder, len(model.aus))(torch.zeros(2, 1, 64, 64), torch.zeros(2, 68, 2))
        assert logits.shape == (2, len(model.aus))


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"encoder_stepz": 3}))
    with pytest.raises(ValueError, match="unknown field.*encoder_stepz"):
        train_config(bad, manifest="m.csv", out="o")
    bad.write_text(json.dumps({"model": {"base_llm": "x/y"}}))
    with pytest.raises(ValueError, match="top level"):
        train_config(bad, manifest="m.csv", out="o")
    with pytest.raises(ValueError, match="--manifest"):
        train_config(None, out="o")


def test_hf_encoder_takes_its_input_size_from_the_config():
    vision = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "patch_size": 14, "image_size": 518}
    encoder = AUEncoder({"type": "hf", "vision_config": vision, "dim": 16, "image_size": 56, "head_layers": 1}, 3)
    tokens, logits = encoder(torch.zeros(2, 1, 64, 64), torch.zeros(2, 68, 2))
    assert encoder.backbone.image_size == 56 and tokens.shape == (2, 3, 16) and logits.shape == (2, 3)


def test_training_flags_override_the_config_file_and_unset_flags_keep_it(tmp_path):
    from aullava.cli import _train_config, build_parser

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"manifest": "m.csv", "out": "o", "boundary_mix": 0.1, "boundary_gap": 0.5,
                                "chimera": 0.2}))
    args = build_parser().parse_args(["train", "--config", str(path), "--chimera", "0.5", "--lora-steps", "7",
                                      "--boundary-gap", "0.25"])
    config = _train_config(args)
    assert (config.chimera, config.lora_steps, config.boundary_mix, config.boundary_gap, config.manifest) == \
        (0.5, 7, 0.1, 0.25, "m.csv")


def test_the_training_flags_state_trainconfigs_defaults():
    import argparse
    import functools
    import re
    from dataclasses import fields

    from aullava.cli import _add_training_options
    from aullava.train import TrainConfig

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    # the options `train` and `crossval` share, each flag's help on its own line, unwrapped
    one_line = functools.partial(argparse.HelpFormatter, width=100_000, max_help_position=1_000)
    parser = argparse.ArgumentParser(formatter_class=one_line)
    _add_training_options(parser, "run folder")
    stated = 0
    for flag, help_text in re.findall(r"^  (--[a-z-]+)[^\n]*?  (.*)$", parser.format_help(), re.M):
        found = re.search(r"\(default ([^;)]+)", help_text)
        name = flag[2:].replace("-", "_")
        if found and name in defaults:
            value = found.group(1).strip()
            expected = ",".join(defaults[name]) if isinstance(defaults[name], tuple) else str(defaults[name])
            assert value == expected, f"{flag} says default {value}, TrainConfig has {expected}"
            stated += 1
    assert stated >= 7  # steps, batch, grad accum, boundary mix and gap, chimera, kinds
