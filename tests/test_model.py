"""The model with a tiny random LLM: plan decoding, batching, save/load, answer tokens."""
import pytest
import torch

from aullava import formats as fmt_lib
from aullava.model import AULlava, AULlavaConfig, from_pretrained, save_pretrained

AUS = (1, 2, 4, 6, 12, 25)


@pytest.fixture(scope="module")
def tiny_model():
    from aullava.llm import tiny_llm

    torch.manual_seed(0)
    llm, tokenizer = tiny_llm(seed=0)
    config = AULlavaConfig(aus=AUS, encoder={"type": "landmark_patch", "dim": 32, "chip_size": 64, "channels": 16,
                                             "head_layers": 1},
                           lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    model = AULlava(config, llm, tokenizer)
    model.add_lora()
    # make LoRA non-trivial so a lost adapter would change the outputs
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.eval()
    return model


def _faces(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 64, 64, generator=g) * 0.25, torch.rand(n, 68, 2, generator=g) * 1.6 - 0.8


@pytest.mark.parametrize("name", fmt_lib.format_names())
def test_every_format_decodes_to_a_parseable_answer(tiny_model, name):
    chip, landmarks = _faces(3)
    for generation in tiny_model.generate(chip, landmarks, name):
        result = fmt_lib.get_format(name).parse(generation.text, AUS)
        assert set(result.present) == set(AUS)
        assert all(0.0 <= d.probability <= 1.0 for d in generation.decisions)


@pytest.mark.parametrize("name", ["list", "json", "sentence"])
def test_batched_generation_equals_one_by_one(tiny_model, name):
    chip, landmarks = _faces(4, seed=1)
    together = [g.text for g in tiny_model.generate(chip, landmarks, name)]
    alone = [tiny_model.generate(chip[i:i + 1], landmarks[i:i + 1], name)[0].text for i in range(4)]
    assert together == alone


def test_answer_ids_decode_to_the_rendered_answer(tiny_model):
    result = fmt_lib.AUResult.from_active(AUS, [2, 12], {2: 1, 12: 4})
    for name in fmt_lib.format_names():
        ids = tiny_model.answer_ids(name, result)
        assert ids[-1] == tiny_model.eos_id
        text = tiny_model.tokenizer.decode(ids[:-1])
        assert text == fmt_lib.get_format(name).render(result)


def test_answer_loss_is_finite_and_backpropagates(tiny_model):
    chip, landmarks = _faces(2)
    result = fmt_lib.AUResult.from_active(AUS, [1, 25], {1: 2, 25: 3})
    answers = [tiny_model.answer_ids("binary", result)] * 2
    loss, logits = tiny_model.answer_loss(chip, landmarks, "binary", answers)
    assert torch.isfinite(loss) and logits.shape == (2, len(AUS))
    loss.backward()
    assert tiny_model.projector.weight.grad is not None


def test_save_and_load_give_identical_outputs(tiny_model, tmp_path):
    chip, landmarks = _faces(2, seed=3)
    path = save_pretrained(tiny_model, tmp_path / "ckpt")
    assert (path / "aullava_config.json").is_file() and (path / "aullava.safetensors").is_file()
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))
    from aullava.llm import tiny_llm

    llm, tokenizer = tiny_llm(seed=0)
    loaded = from_pretrained(path, llm=llm, tokenizer=tokenizer)
    for name in ("list", "binary", "continuous"):
        before = [g.text for g in tiny_model.generate(chip, landmarks, name)]
        after = [g.text for g in loaded.generate(chip, landmarks, name)]
        assert before == after
    with torch.no_grad():
        a, _ = tiny_model.answer_loss(chip, landmarks, "list", [[5, 6, 7]] * 2)
        b, _ = loaded.answer_loss(chip, landmarks, "list", [[5, 6, 7]] * 2)
    assert torch.allclose(a, b, atol=1e-5)


def test_missing_or_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nothing-here")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "aullava_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        from_pretrained(tmp_path / "bad")
