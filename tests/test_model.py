"""The model with a tiny random LLM: plan decoding, batching, save/load, answer tokens."""
import math

import pytest
import torch

from aullava import formats as fmt_lib
from aullava.model import AULlava, AULlavaConfig, from_pretrained, save_pretrained

AUS = (1, 2, 4, 6, 12, 25)


# the prompt layouts: AU tokens alone at the image placeholder, or each after its code with the head's evidence
@pytest.fixture(scope="module", params=[False, True], ids=["plain", "labelled"])
def tiny_model(request):
    from aullava.llm import tiny_llm

    torch.manual_seed(0)
    llm, tokenizer = tiny_llm(seed=0)
    config = AULlavaConfig(aus=AUS, encoder={"type": "landmark_patch", "dim": 32, "chip_size": 64, "channels": 16,
                                             "head_layers": 1},
                           lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                           evidence=request.param, labelled_tokens=request.param)
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


def _passes(model, monkeypatch):
    """Counts the model's forward passes through the LLM."""
    calls = []
    decode = model._decode
    monkeypatch.setattr(model, "_decode", lambda *args: calls.append(1) or decode(*args))
    return calls


@pytest.mark.parametrize("name", fmt_lib.format_names())
def test_speculative_generation_writes_the_plain_answer(tiny_model, name):
    chip, landmarks = _faces(4, seed=2)
    plain = tiny_model.generate(chip, landmarks, name, speculate=False)
    drafted = tiny_model.generate(chip, landmarks, name)  # the random head's drafts: mostly wrong
    assert [g.text for g in drafted] == [g.text for g in plain]
    for a, b in zip(drafted, plain):
        assert [d.chosen for d in a.decisions] == [d.chosen for d in b.decisions]
        assert [d.probability for d in a.decisions] == pytest.approx([d.probability for d in b.decisions], abs=1e-4)


def _side_passes(model, monkeypatch):
    """Counts the side passes that read an option's branch points off the drafted path."""
    calls = []
    look = model._look_ahead
    monkeypatch.setattr(model, "_look_ahead", lambda *args: calls.append(1) or look(*args))
    return calls


@pytest.mark.parametrize("name", ["list", "binary", "intensity", "json"])
def test_a_draft_the_llm_agrees_with_costs_one_pass(tiny_model, name, monkeypatch):
    chip, landmarks = _faces(3, seed=3)
    fmt = fmt_lib.get_format(name)
    plain = [g.text for g in tiny_model.generate(chip, landmarks, name, speculate=False)]
    calls, side = _passes(tiny_model, monkeypatch), _side_passes(tiny_model, monkeypatch)
    for i, text in enumerate(plain):  # speculating, generate writes one face at a time
        face = chip[i:i + 1], landmarks[i:i + 1]
        right = [tiny_model.answer_ids(name, fmt.parse(text, AUS))]
        monkeypatch.setattr(tiny_model, "draft_ids", lambda *args: right)
        calls.clear(), side.clear()
        assert tiny_model.generate(*face, name)[0].text == text
        # one pass writes the answer; a random LLM's flat choices among AU codes may need side passes
        assert len(calls) - len(side) == 1
        if name in ("binary", "intensity"):  # single-token options: everything is read in the one pass
            assert not side
        # a draft wrong from its first decision costs passes but not the answer
        flipped = [a for a in AUS if not fmt.parse(text, AUS).present[a]]
        wrong = [tiny_model.answer_ids(name, fmt_lib.AUResult.from_active(AUS, flipped, {a: 3.0 for a in flipped}))]
        monkeypatch.setattr(tiny_model, "draft_ids", lambda *args: wrong)
        calls.clear()
        assert tiny_model.generate(*face, name)[0].text == text
        if name in ("binary", "intensity"):  # every value flipped: the LLM decides otherwise at every AU
            assert len(calls) == len(AUS)  # one pass per AU: the draft is picked up again after each


class _StubLM:
    """Just what `_PlanState` asks of the model: a hidden state is the vector of next-token logits."""
    eos_id = 0
    vocabulary = {"A": 1, "0": 2, "1": 3, "4": 4, "9": 5, "7": 6}

    def encode(self, text):
        return [self.vocabulary[c] for c in text]

    def _option_trie(self, options):
        from aullava.model import _OptionTrie
        return _OptionTrie({o: [self.eos_id] if o is fmt_lib.END else self.encode(o) for o in options})

    def token_logits(self, hidden, tokens):
        return hidden[list(tokens)]


def _logits(**probabilities):
    out = torch.full((7,), -1e9)
    for token, p in probabilities.items():
        out[_StubLM.vocabulary[token]] = torch.tensor(p).log()
    return out


def test_a_choice_takes_the_likeliest_option_not_the_likeliest_first_token():
    from aullava.model import _PlanState

    def plan():
        yield fmt_lib.Choice(("A04", "A09", "A14", "A17"))

    # after the forced "A": "0" has more mass (0.6) than "1" (0.4), but split evenly over two codes, while A17
    # takes 0.9 of "1": A17 (0.36) is the likeliest option
    after = {(): _logits(**{"0": 0.6, "1": 0.4}), (2,): _logits(**{"4": 0.5, "9": 0.5}),
             (3,): _logits(**{"4": 0.1, "7": 0.9})}
    asked = []

    def look_ahead(paths):
        asked.extend(paths)
        return [after[tuple(p)] for p in paths]

    def decide(fed):
        asked.clear()
        row = _PlanState(plan())
        row.advance(model, None)
        assert row.pending == [1]  # the forced "A", fed before the decision
        row.pending.clear()
        row.decide(model, torch.stack([after.get(tuple(fed[:j]), after[()]) for j in range(len(fed) + 1)]),
                   fed, look_ahead)
        assert row.finished
        return row.pending, row.decisions[0]

    model = _StubLM()
    pending, decision = decide([])  # nothing drafted: both branch points after the first digit are read
    assert pending == [3, 6] and decision.chosen == "A17" and decision.probability == pytest.approx(0.36)
    assert sorted(asked) == [(2,), (3,)]
    pending, decision = decide([2, 4])  # a draft that writes A04: only the branch point off its path is read
    assert decision.chosen == "A17" and sorted(asked) == [(3,)]
    after[()] = _logits(**{"0": 0.9, "1": 0.1})  # A04 (0.45) beats the bound on A1x (0.1): no side pass
    pending, decision = decide([2, 4])
    assert decision.chosen == "A04" and decision.probability == pytest.approx(0.45) and not asked


def test_every_caller_thread_runs_the_llm_on_the_torch_thread(tiny_model, monkeypatch):
    import threading

    monkeypatch.setattr(tiny_model, "serve_on_torch_thread", True)
    seen = []
    decode = tiny_model._decode
    monkeypatch.setattr(tiny_model, "_decode", lambda *a: seen.append(threading.current_thread().name) or decode(*a))
    chip, landmarks = _faces(1, seed=5)
    expected = tiny_model.generate(chip, landmarks, "list")[0].text
    answers = []
    callers = [threading.Thread(target=lambda: answers.append(tiny_model.generate(chip, landmarks, "list")[0].text))
               for _ in range(6)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert answers == [expected] * 6
    assert len(set(seen)) == 1 and seen[0].startswith("aullava-torch")


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


def test_decisions_that_say_an_au_is_there_can_weigh_more(tiny_model):
    chip, landmarks = _faces(2)
    result = fmt_lib.AUResult.from_active(AUS, [1, 25], {1: 2, 25: 3})
    ids, choices, present = tiny_model.answer_targets("binary", result)
    chosen = [tiny_model.tokenizer.decode([t]) for t, c, p in zip(ids, choices, present) if c is not None and p]
    assert chosen == ["1", "1"]  # the two active AUs' digits, nothing else
    _, _, listed = tiny_model.answer_targets("list", result)
    assert any(listed) and not listed[-1]  # AU01 and AU25 named; the end is not
    ones = [[1.0] * len(ids)] * 2
    weighted = [[3.0 if p else 1.0 for p in present]] * 2
    with torch.no_grad():
        plain, _ = tiny_model.answer_loss(chip, landmarks, "binary", [ids] * 2, choices=[choices] * 2, reduction="sum")
        same, _ = tiny_model.answer_loss(chip, landmarks, "binary", [ids] * 2, choices=[choices] * 2,
                                         reduction="sum", weights=ones)
        heavier, _ = tiny_model.answer_loss(chip, landmarks, "binary", [ids] * 2, choices=[choices] * 2,
                                            reduction="sum", weights=weighted)
    assert torch.allclose(plain, same) and heavier > plain


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
    with pytest.raises(ValueError, match="aullava_config.json is not readable JSON"):
        from_pretrained(tmp_path / "bad")


def test_presence_read_out_converges_to_the_written_binary_answer(tiny_model):
    # Jacobi passes: a fixed point is exactly the answer the decoder writes digit by digit, same probabilities.
    chip, landmarks = _faces(3, seed=2)
    presence, converged = tiny_model.read_presence(chip, landmarks, passes=len(AUS) + 1)
    assert presence.shape == (3, len(AUS)) and bool(converged.all())
    for row, generation in enumerate(tiny_model.generate(chip, landmarks, "binary")):
        for index, decision in enumerate(generation.decisions):
            p_one = decision.probability if decision.chosen == "1" else 1 - decision.probability
            assert presence[row, index].item() == pytest.approx(p_one, abs=1e-4)


def test_one_pass_read_out_is_exact_up_to_the_first_present_au(tiny_model):
    chip, landmarks = _faces(3, seed=3)
    presence, _ = tiny_model.read_presence(chip, landmarks, passes=1)
    for row, generation in enumerate(tiny_model.generate(chip, landmarks, "binary")):
        for index, decision in enumerate(generation.decisions):
            p_one = decision.probability if decision.chosen == "1" else 1 - decision.probability
            assert presence[row, index].item() == pytest.approx(p_one, abs=1e-4)
            if decision.chosen == "1":
                break


def test_adapter_disabled_runs_the_base_llm_and_restores_the_adapter(tiny_model):
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with_adapter = tiny_model.llm(input_ids=ids).logits
        with tiny_model.adapter_disabled():
            base = tiny_model.llm(input_ids=ids).logits
        again = tiny_model.llm(input_ids=ids).logits
    assert not torch.allclose(with_adapter, base)
    assert torch.equal(with_adapter, again)


def test_merged_lora_gives_the_same_answers_and_still_switches_off(tiny_model, tmp_path):
    from aullava.llm import tiny_llm

    llm, tokenizer = tiny_llm(seed=0)
    merged = from_pretrained(save_pretrained(tiny_model, tmp_path / "ckpt"), llm=llm, tokenizer=tokenizer)
    merged.merge_lora()
    assert merged.lora_merged and not tiny_model.lora_merged
    chip, landmarks = _faces(2, seed=4)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(merged.llm(input_ids=ids).logits, tiny_model.llm(input_ids=ids).logits, atol=1e-4)
        before = {name: p.detach().clone() for name, p in merged.llm.named_parameters()}
        for _ in range(3):  # switching swaps stored weights: no unmerge/re-merge arithmetic, so no drift
            with merged.adapter_disabled(), tiny_model.adapter_disabled():
                assert torch.allclose(merged.llm(input_ids=ids).logits, tiny_model.llm(input_ids=ids).logits,
                                      atol=1e-4)
        assert merged.lora_merged
        assert all(torch.equal(p, before[name]) for name, p in merged.llm.named_parameters())
    for name in ("list", "binary"):
        assert [g.text for g in merged.generate(chip, landmarks, name)] == \
               [g.text for g in tiny_model.generate(chip, landmarks, name)]


def test_encoder_ensemble_joins_tokens_averages_logits_and_round_trips(tmp_path):
    from aullava.encoders import EncoderEnsemble, build_encoder
    from aullava.llm import tiny_llm

    torch.manual_seed(1)
    llm, tokenizer = tiny_llm(seed=0)
    encoder = {"type": "landmark_patch", "dim": 16, "chip_size": 64, "channels": 8, "head_layers": 1, "members": 3}
    model = AULlava(AULlavaConfig(aus=AUS, encoder=encoder, lora=None), llm, tokenizer).eval()
    assert isinstance(model.encoder, EncoderEnsemble) and model.encoder.hidden_size == 48  # three members' tokens joined
    chip, landmarks = _faces(2, seed=5)
    with torch.no_grad():
        tokens, logits = model.encoder(chip, landmarks)
        _, per_member = model.encoder(chip, landmarks, per_member=True)
        one_tokens, _ = model.encoder.members[1](chip, landmarks)
    assert tokens.shape == (2, len(AUS), 48) and per_member.shape == (3, 2, len(AUS))
    assert torch.allclose(logits, per_member.mean(0)) and torch.equal(tokens[..., 16:32], one_tokens)
    assert not torch.allclose(per_member[0], per_member[1])  # members start from their own weights
    path = save_pretrained(model, tmp_path / "ensemble")
    loaded = from_pretrained(path, llm=tiny_llm(seed=0)[0], tokenizer=tokenizer)
    assert [g.text for g in loaded.generate(chip, landmarks, "list")] == [g.text for g in model.generate(chip, landmarks, "list")]
    with pytest.raises(ValueError, match="members must be at least 1"):
        build_encoder({**encoder, "members": 0}, len(AUS))


def test_landmark_regression_adds_its_logit_as_one_token_feature_and_round_trips(tmp_path):
    from aullava.encoders import EncoderEnsemble, build_encoder
    from aullava.llm import tiny_llm

    torch.manual_seed(2)
    llm, tokenizer = tiny_llm(seed=0)
    encoder = {"type": "landmark_patch", "dim": 16, "chip_size": 64, "channels": 8, "head_layers": 1, "members": 2,
               "landmark_logistic": 0.5}
    model = AULlava(AULlavaConfig(aus=AUS, encoder=encoder, lora=None), llm, tokenizer).eval()
    regression = model.encoder.landmark_logistic
    assert model.encoder.hidden_size == 2 * 16 + 1
    # fit: labels from a linear rule of two landmark coordinates, one AU never present
    _, landmarks = _faces(300, seed=3)
    x = landmarks.flatten(1)
    labels = torch.zeros(300, len(AUS))
    labels[:, 0] = (x[:, 10] - x[:, 20] + 0.1 * torch.randn(300) > 0).float()
    labels[:, 1] = (x[:, 5] > 0.2).float()
    known = torch.ones_like(labels)
    known[:50, 1] = 0  # unknown labels play no part in the fit
    regression.fit(landmarks, labels, known)
    z = (x.double() - regression.mean.double()) / regression.scale.double()
    design = torch.cat([z, torch.ones(300, 1, dtype=z.dtype)], 1)
    for k, rows in ((0, slice(None)), (1, slice(50, None))):
        w = torch.cat([regression.weight[k], regression.bias[k:k + 1]]).double()
        p = torch.sigmoid(design[rows] @ w)
        gradient = design[rows].T @ (p - labels[rows, k].double()) + regression.l2 * torch.cat([w[:-1], w.new_zeros(1)])
        assert gradient.abs().max() < 1e-3  # the penalised likelihood's optimum (float32 buffers)
    assert ((regression(landmarks)[:, 0] > 0) == (labels[:, 0] > 0)).float().mean() > 0.9
    assert (regression(landmarks)[:, 2] < 0).all()  # only absent in training: read absent
    chip, faces = _faces(3, seed=4)
    with torch.no_grad():
        tokens, logits = model.encoder(chip, faces)
        _, per_member = model.encoder(chip, faces, per_member=True)
        geometry = regression(faces)
    assert tokens.shape == (3, len(AUS), 33) and torch.allclose(tokens[..., -1], geometry)
    assert torch.allclose(logits, per_member.mean(0) + 0.5 * geometry, atol=1e-5)
    assert torch.allclose(model.encoder.read_logits(tokens), logits, atol=1e-5)  # linear in the token, mixes too
    path = save_pretrained(model, tmp_path / "with_geometry")
    loaded = from_pretrained(path, llm=tiny_llm(seed=0)[0], tokenizer=tokenizer)
    assert torch.equal(loaded.encoder.landmark_logistic.weight, regression.weight)
    assert [g.text for g in loaded.generate(chip, faces, "binary")] == [g.text for g in model.generate(chip, faces, "binary")]
    assert isinstance(build_encoder({**encoder, "members": 1}, len(AUS)), EncoderEnsemble)  # one member + regression


def test_evidence_puts_each_tokens_head_reading_beside_it_and_round_trips(tmp_path):
    from aullava.llm import tiny_llm
    from aullava.model import EVIDENCE_FEATURES

    torch.manual_seed(2)
    llm, tokenizer = tiny_llm(seed=0)
    encoder = {"type": "landmark_patch", "dim": 16, "chip_size": 64, "channels": 8, "head_layers": 1, "members": 2}
    model = AULlava(AULlavaConfig(aus=AUS, encoder=encoder, lora=None, evidence=True), llm, tokenizer).eval()
    assert model.projector.in_features == 32 + len(EVIDENCE_FEATURES)
    chip, landmarks = _faces(2, seed=6)
    with torch.no_grad():
        tokens, logits = model.encoder(chip, landmarks)
        image, _ = model.image_embeddings(chip, landmarks)
        # the evidence columns of the projector act on the head's logit of each token alone
        evidence_weight = model.projector.weight[:, 32:]
        plain = torch.nn.functional.linear(tokens, model.projector.weight[:, :32], model.projector.bias)
        scale = 32 ** 0.5
        features = torch.stack([f(logits) for f in EVIDENCE_FEATURES.values()], dim=-1) * scale
        assert torch.allclose(image, plain + features @ evidence_weight.T, atol=1e-5)
        # an altered token (here: another face's AU 12 token) brings its own reading along
        swapped = tokens.clone()
        swapped[0, 4] = tokens[1, 4]
        projected = model.project(swapped)
        assert torch.allclose(projected[0, 4], image[1, 4], atol=1e-5)
    path = save_pretrained(model, tmp_path / "evidence")
    loaded = from_pretrained(path, llm=tiny_llm(seed=0)[0], tokenizer=tokenizer)
    assert loaded.config.evidence
    assert [g.text for g in loaded.generate(chip, landmarks, "list")] == [g.text for g in model.generate(chip, landmarks, "list")]
    # a config written before the field existed describes a projector without evidence columns
    assert AULlavaConfig.from_dict({"aus": list(AUS)}).evidence is False


def test_labelled_tokens_follow_their_codes_in_the_prompt(tiny_model):
    chip, landmarks = _faces(2, seed=7)
    with torch.no_grad():
        image, _ = tiny_model.image_embeddings(chip, landmarks)
        block = tiny_model.image_sequence(image, image.dtype)
    if not tiny_model.config.labelled_tokens:
        assert torch.equal(block, image)
        return
    embed = tiny_model._causal_lm().get_input_embeddings()
    at = 0
    for k, au in enumerate(AUS):
        ids = tiny_model.encode(("" if k == 0 else " ") + fmt_lib.au_code(au) + ":")
        with torch.no_grad():
            assert torch.equal(block[:, at:at + len(ids)], embed(torch.tensor(ids)).expand(2, -1, -1))
        assert torch.equal(block[:, at + len(ids)], image[:, k])
        at += len(ids) + 1
    assert block.shape[1] == at


def test_image_suffix_follows_the_image_block_and_is_saved(tmp_path):
    from aullava.llm import tiny_llm

    torch.manual_seed(3)
    llm, tokenizer = tiny_llm(seed=0)
    encoder = {"type": "landmark_patch", "dim": 16, "chip_size": 64, "channels": 8, "head_layers": 1}
    config = AULlavaConfig(aus=AUS, encoder=encoder, lora=None, image_suffix="\nAnswer for this face.")
    model = AULlava(config, llm, tokenizer).eval()
    before, after = model.prompt_parts("list")
    assert after.startswith("\nAnswer for this face.") and "Answer for this face" not in before
    plain_before, plain_after = AULlava(AULlavaConfig(aus=AUS, encoder=encoder, lora=None), llm, tokenizer).prompt_parts("list")
    assert plain_before == before and after == "\nAnswer for this face." + plain_after
    chip, landmarks = _faces(2, seed=8)
    loaded = from_pretrained(save_pretrained(model, tmp_path / "suffix"), llm=llm, tokenizer=tokenizer)
    assert loaded.config.image_suffix == config.image_suffix
    assert [g.text for g in loaded.generate(chip, landmarks, "list")] == [g.text for g in model.generate(chip, landmarks, "list")]
    # a config written before the field existed: the image ends the user turn
    assert AULlavaConfig.from_dict({"aus": list(AUS)}).image_suffix == ""


def test_mean_option_is_the_levels_mean_written_to_a_tenth():
    from aullava.model import _mean_option

    levels = [str(d) for d in range(6)]
    log = [math.log(p) if p else -math.inf for p in (0.0, 0.0, 0.6, 0.4, 0.0, 0.0)]
    index, chosen = _mean_option(levels, log)
    assert (index, chosen) == (2, "2") and chosen.mean == pytest.approx(2.4)
    index, chosen = _mean_option(levels, [math.log(p) for p in (0.02, 0.02, 0.02, 0.02, 0.02, 0.9)])
    assert chosen == "4" and chosen.mean == pytest.approx(4.7)  # the whole part: the option below the mean
    index, chosen = _mean_option(levels, [math.log(p) for p in (0.001, 0.001, 0.001, 0.001, 0.001, 0.995)])
    assert chosen == "5"  # 4.98 is written 5.0


def test_continuous_answer_is_the_mean_of_the_llms_level_probabilities(tiny_model):
    chip, landmarks = _faces(2, seed=5)
    fmt = fmt_lib.get_format("continuous")
    for speculate in (True, False):
        for generation in tiny_model.generate(chip, landmarks, "continuous", speculate=speculate):
            result = fmt.parse(generation.text, AUS)
            levels = [d for d in generation.decisions if isinstance(d.chosen, fmt_lib.MeanOf)]
            assert len(levels) == len(AUS)  # one read per AU, the tenth written from it
            for a, decision in zip(AUS, levels):
                assert result.intensity[a] == pytest.approx(min(5.0, fmt_lib.round_half_up(decision.chosen.mean * 10) / 10))
