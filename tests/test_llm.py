"""aullava.llm: base LLM loading (GGUF -> cache -> reload), chat prompts, the tiny test LLM.

The first fixture dequantizes the packaged GGUF into a fresh temporary cache (~30-40 s on 2 cores); every
other test is quick."""
import shutil
import time
from pathlib import Path

import pytest
import torch

from aullava import llm

PROMPT = [{"role": "user", "content": "Which muscles raise the inner brows?"}]
SYSTEM = "You are a test system prompt."


@pytest.fixture(scope="module")
def gguf_load(tmp_path_factory):
    """The default model loaded into an empty cache dir: it must come from the packaged GGUF."""
    cache_dir = tmp_path_factory.mktemp("aullava_cache")
    start = time.perf_counter()
    model, tokenizer, source = llm.load_base_llm(cache_dir=cache_dir, fresh=True)
    return {"model": model, "tokenizer": tokenizer, "source": source, "cache_dir": cache_dir,
            "seconds": time.perf_counter() - start}


def _logits(model, tokenizer):
    text = llm.chat_prompt(tokenizer, PROMPT, system=SYSTEM)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        return model(ids).logits


def test_gguf_load_fills_cache_and_reload_matches(gguf_load):
    model, tokenizer, cache_dir = gguf_load["model"], gguf_load["tokenizer"], gguf_load["cache_dir"]
    assert gguf_load["source"] == "gguf"
    entry = llm.cache_path(llm.DEFAULT_MODEL_ID, cache_dir)
    assert entry == Path(cache_dir) / "base" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert llm.is_cached(cache_dir=cache_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", llm.CACHE_MARKER):
        assert (entry / name).is_file(), name
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left behind
    assert "quantization_config" not in (entry / "config.json").read_text()

    assert not model.training and model.dtype == llm.preferred_dtype()
    assert not any(p.requires_grad for p in model.parameters())

    start = time.perf_counter()
    model2, tokenizer2, source2 = llm.load_base_llm(cache_dir=cache_dir, fresh=True)
    seconds = time.perf_counter() - start
    assert source2 == "cache"
    assert seconds < 15, f"cache reload took {seconds:.1f} s"
    assert model2 is not model and model2.dtype == llm.preferred_dtype() and not model2.training
    assert model2.config.tie_word_embeddings
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(model, tokenizer), _logits(model2, tokenizer2))


def test_tokenizer_facts(gguf_load):
    tokenizer = gguf_load["tokenizer"]
    reloaded, source = llm.load_tokenizer(cache_dir=gguf_load["cache_dir"], fresh=True)
    assert source == "cache"
    for tok in (tokenizer, reloaded):
        assert tok.bos_token == "<|im_start|>"
        assert tok.eos_token == tok.pad_token == "<|im_end|>"
        assert tok.pad_token_id == tok.eos_token_id
        ids = tok("hello", add_special_tokens=True).input_ids
        assert tok.bos_token_id not in ids  # no BOS added to plain text
        assert tok("<|im_end|>", add_special_tokens=False).input_ids == [tok.eos_token_id]
    text = "a <|im_start|>user\nhi<|im_end|>"
    assert tokenizer(text).input_ids == reloaded(text).input_ids


def test_chat_prompt_uses_our_system_message(gguf_load):
    tokenizer = gguf_load["tokenizer"]
    # what the bare template does, and chat_prompt must prevent
    assert llm.SMOLLM_DEFAULT_SYSTEM in tokenizer.apply_chat_template(PROMPT, tokenize=False)

    text = llm.chat_prompt(tokenizer, PROMPT, system=SYSTEM)
    assert text == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{PROMPT[0]['content']}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "SmolLM" not in text

    default = llm.chat_prompt(tokenizer, PROMPT)
    assert llm.DEFAULT_SYSTEM_PROMPT in default and "SmolLM" not in default
    assert "SmolLM" not in llm.chat_prompt(tokenizer, PROMPT, system="")
    assert llm.chat_prompt(tokenizer, [{"role": "system", "content": SYSTEM}] + PROMPT) == text
    assert not llm.chat_prompt(tokenizer, PROMPT, SYSTEM, add_generation_prompt=False).endswith("assistant\n")
    with pytest.raises(ValueError):
        llm.chat_prompt(tokenizer, [{"role": "system", "content": "other"}] + PROMPT, system=SYSTEM)

    class NoTemplate:
        chat_template = None

    assert llm.chat_prompt(NoTemplate(), PROMPT, system=SYSTEM) == text


def test_local_folder_loads_as_path(gguf_load):
    entry = llm.cache_path(cache_dir=gguf_load["cache_dir"])
    model, tokenizer, source = llm.load_base_llm(str(entry), fresh=True)
    assert source == "path" and model.dtype == llm.preferred_dtype()
    assert torch.equal(_logits(model, tokenizer), _logits(gguf_load["model"], gguf_load["tokenizer"]))


def test_default_cache_location_and_memo(gguf_load, monkeypatch):
    monkeypatch.delenv(llm.CACHE_ENV, raising=False)
    assert llm.cache_root() == Path.home() / ".cache" / "aullava"
    monkeypatch.setenv(llm.CACHE_ENV, "/somewhere/else")
    assert llm.cache_root() == Path("/somewhere/else")
    assert llm.cache_root("/explicit") == Path("/explicit")
    monkeypatch.undo()

    # The normal cache location ($AULLAVA_CACHE or ~/.cache/aullava). Unless an earlier run (or the app) filled
    # it, seed it with the entry the GGUF test just wrote, rather than dequantizing the GGUF a second time.
    if not llm.is_cached():
        entry = llm.cache_path()
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.parent / f".{entry.name}.test-seed"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(llm.cache_path(cache_dir=gguf_load["cache_dir"]), tmp)
        shutil.rmtree(entry, ignore_errors=True)
        tmp.rename(entry)
    model, tokenizer, source = llm.load_base_llm()
    assert source == "cache"
    again = llm.load_base_llm()
    assert again[0] is model and again[1] is tokenizer  # memoized per (model id, dtype)
    assert llm.load_base_llm(fresh=True)[0] is not model
    assert llm.load_tokenizer()[0] is tokenizer


def test_bogus_model_id_names_every_source(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        llm.load_base_llm("nobody-here/no-such-model-42", cache_dir=tmp_path)
    message = str(info.value)
    assert "nobody-here/no-such-model-42" in message
    for source in ("cache", "gguf", "hub"):
        assert f"{source}:" in message, message
    with pytest.raises(RuntimeError, match="path"):
        llm.load_base_llm(str(tmp_path / "no" / "folder"), cache_dir=tmp_path)


def test_hub_source_offline_from_hub_cache(monkeypatch, tmp_path):
    """Source "hub": offline, a repo found in the huggingface_hub cache loads, and is then saved to our cache."""
    import huggingface_hub.constants

    model, tokenizer = llm.tiny_llm(seed=3)
    snapshot = tmp_path / "hub" / "models--test--tiny-hub" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    loaded, loaded_tokenizer, source = llm.load_base_llm("test/tiny-hub", dtype=torch.float32,
                                                         cache_dir=tmp_path / "ours", fresh=True)
    assert source == "hub" and loaded_tokenizer.pad_token == "<|im_end|>"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert llm.is_cached("test/tiny-hub", tmp_path / "ours")
    assert llm.load_base_llm("test/tiny-hub", dtype=torch.float32, cache_dir=tmp_path / "ours",
                             fresh=True)[2] == "cache"


def test_tiny_llm_forward():
    rng_state = torch.get_rng_state()
    model, tokenizer = llm.tiny_llm(seed=0)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left alone
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (64, 2, 4, 2, 128)
    assert config.vocab_size == len(tokenizer) and tokenizer.pad_token == "<|im_end|>"
    ids = tokenizer(llm.chat_prompt(tokenizer, PROMPT, system=SYSTEM), return_tensors="pt",
                    add_special_tokens=False).input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    same, _ = llm.tiny_llm(tokenizer, seed=0)
    other, _ = llm.tiny_llm(tokenizer, seed=1)
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(weight, same.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(weight, other.model.layers[0].self_attn.q_proj.weight)


def test_tiny_llm_without_tokenizer_fails_clearly(monkeypatch):
    def unavailable(source, model_id, cache_dir=None):
        raise FileNotFoundError(f"no {source} here")

    monkeypatch.setattr(llm, "_memo", {})
    monkeypatch.setattr(llm, "_tokenizer_memo", {})
    monkeypatch.setattr(llm, "_load_tokenizer_from", unavailable)
    with pytest.raises(RuntimeError, match="tokenizer"):
        llm.tiny_llm()


def test_interrupted_save_leaves_no_entry(monkeypatch, tmp_path):
    model, tokenizer = llm.tiny_llm()
    entry = llm.cache_path("test/tiny", tmp_path)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        llm.save_to_cache(model, tokenizer, "test/tiny", tmp_path)
    assert list(entry.parent.iterdir()) == []
    monkeypatch.undo()

    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # a broken entry is not taken for a cache, and gets replaced
    assert not llm.is_cached("test/tiny", tmp_path)
    assert llm.save_to_cache(model, tokenizer, "test/tiny", tmp_path) == entry
    assert llm.is_cached("test/tiny", tmp_path)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]
    loaded, _, source = llm.load_base_llm("test/tiny", dtype=torch.float32, cache_dir=tmp_path, fresh=True)
    assert source == "cache"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert llm.set_threads(1) == 1 and torch.get_num_threads() == 1
        count = llm.set_threads()
        assert count >= 1 and torch.get_num_threads() == count
    finally:
        torch.set_num_threads(before)


def test_dtype_names_are_read_one_way_and_a_wrong_one_is_named(monkeypatch):
    assert [llm.dtype_named(n) for n in ("bf16", "bfloat16", "torch.float32", "FP16")] == [
        torch.bfloat16, torch.bfloat16, torch.float32, torch.float16]
    monkeypatch.setenv("AULLAVA_DTYPE", "bf16")
    assert llm.preferred_dtype() == torch.bfloat16
    monkeypatch.setenv("AULLAVA_DTYPE", "float64x")  # was silently float32
    with pytest.raises(ValueError, match="unknown dtype 'float64x': use one of float32, fp32, bfloat16"):
        llm.preferred_dtype()
