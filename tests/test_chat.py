"""The grounded chat's logic (aullava.chat), with a fake LLM: intents, computed facts, checks, fallbacks."""
import pytest

from aullava import chat, facs
from aullava.formats import AUResult

AUS = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27)


def facts_of(active, intensity=None, title="FACS intensity (0-5)"):
    return chat.FaceFacts.from_result(AUResult.from_active(AUS, active, intensity), title)


SMILE = facts_of([6, 12, 25], {6: 2.0, 12: 3.4, 25: 1.0})
SOCIAL = facts_of([12], {12: 3.0})
PRESENCE = facts_of([1, 2, 26], title="List of active AUs")


def fake_llm(*pieces, calls=None):
    def generate(system, messages):
        if calls is not None:
            calls.append((system, messages))
        yield from pieces
    return generate


def final(iterator):
    value = None
    for value in iterator:
        pass
    return value


@pytest.mark.parametrize("question, kind, aus, region", [
    ("what does AU6 mean?", "define", (6,), None),
    ("What is action unit 12?", "define", (12,), None),
    ("is this a genuine smile?", "genuine_smile", (6, 12), None),
    ("Is it a Duchenne smile or a fake one?", "genuine_smile", (6, 12), None),
    ("which AUs are on the brow?", "region", (), "brows"),
    ("what is happening around the mouth", "region", (), "mouth"),
    ("how strong is AU12?", "intensity", (12,), None),
    ("what's the intensity of AU06", "intensity", (6,), None),
    ("what emotion does this show?", "emotion", (), None),
    ("which action units are active?", "list", (), None),
    ("tell me a joke", "open", (), None),
])
def test_questions_are_understood(question, kind, aus, region):
    intent = chat.parse_question(question)
    assert intent.kind == kind
    assert set(intent.aus) == set(aus)
    assert intent.region == region


def test_mentioned_aus_by_code_and_name():
    assert chat.mentioned_aus("AU06 and the lip corner puller, also AU 25") == [6, 12, 25]
    assert chat.mentioned_aus("intensity 3.4 of 5") == []


def test_factual_answers_are_computed_from_analysis_and_facs():
    define = chat.factual_answer(chat.parse_question("what does AU6 mean?"), SMILE)
    assert "cheek raiser" in define and facs.AUS[6].muscles in define and "detected" in define
    absent = chat.factual_answer(chat.parse_question("what does AU4 mean?"), SMILE)
    assert "brow lowerer" in absent and "not detected" in absent
    strength = chat.factual_answer(chat.parse_question("how strong is AU12?"), SMILE)
    assert "3.4" in strength and "marked" in strength
    no_intensity = chat.factual_answer(chat.parse_question("how strong is AU1?"), PRESENCE)
    assert "presence only" in no_intensity
    brows = chat.factual_answer(chat.parse_question("which AUs are on the brow?"), PRESENCE)
    assert "AU01 inner brow raiser" in brows and "AU02 outer brow raiser" in brows and "AU26" not in brows
    assert "No Action Unit" in chat.factual_answer(chat.parse_question("which AUs are on the brow?"), SMILE)


def test_genuine_smile_follows_the_duchenne_rule():
    question = chat.parse_question("is this a genuine smile?")
    assert facs.GENUINE_SMILE == (6, 12)
    assert "genuine (Duchenne)" in chat.factual_answer(question, SMILE)
    assert "non-Duchenne" in chat.factual_answer(question, SOCIAL)
    assert "no smile" in chat.factual_answer(question, PRESENCE)


def test_emotion_answer_is_worded_as_a_hint():
    text = chat.factual_answer(chat.parse_question("what emotion is this?"), SMILE)
    assert "hint" in text and "happiness" in text and "AU06 + AU12" in text


def test_prompt_head_is_fixed_and_the_last_turn_holds_this_faces_facts():
    system, messages = chat.build_messages("how strong is AU12?", SMILE)
    other_system, other = chat.build_messages("what does AU4 mean?", SOCIAL, [{"role": "user", "content": "q"},
                                                                            {"role": "assistant", "content": "a"}])
    head = len(chat.EXAMPLES)
    assert system == other_system == chat.INSTRUCTION and messages[:head] == other[:head]  # cacheable head
    last = messages[-1]["content"]
    assert messages[-1]["role"] == "user" and last.endswith("Question: how strong is AU12?")
    assert "Facts: AU12 lip corner puller at intensity 3.4 of 5 (marked)" in last
    assert "AU4" not in last  # undetected AUs are not put in the model's mouth
    example = chat.EXAMPLES[-1]["content"]  # the worked example repeats the facts it was given
    assert chat.EXAMPLES[-2]["content"].startswith(f"Facts: {example}\n")


def test_the_model_writing_the_next_question_itself_ends_its_answer():
    reply = chat.Reply()
    final(chat.respond("how strong is AU12?", SMILE, [], fake_llm("AU12 is marked: 3.4 of 5.", "\nQuestion: and",
                                                                   " AU9?"), reply=reply))
    assert reply.source == "llm" and reply.text == "AU12 is marked: 3.4 of 5."


def test_history_is_short_and_well_formed():
    history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1" * 500},
               {"role": "user", "content": [{"type": "text", "text": "q2"}]},
               {"role": "assistant", "content": "a2"}]
    _, messages = chat.build_messages("what does AU6 mean?", SMILE, history)
    tail = messages[len(chat.EXAMPLES):]
    assert [m["role"] for m in tail] == ["user", "assistant", "user"]
    assert tail[0]["content"] == "q2" and all(len(m["content"]) <= chat.HISTORY_CHARS for m in tail[:-1])


def test_no_analysis_answers_without_the_llm():
    calls = []
    assert final(chat.respond("what does AU6 mean?", None, [], fake_llm("x", calls=calls))) == chat.NO_ANALYSIS
    assert calls == []
    unreadable = final(chat.respond("hi", None, [], fake_llm("x", calls=calls), parse_error="bad answer"))
    assert "could not be read" in unreadable and calls == []


@pytest.mark.parametrize("message", ["", "   ", None, "x" * 20000])
def test_empty_and_long_messages_are_refused_plainly(message):
    calls = []
    reply = final(chat.respond(message, SMILE, [], fake_llm("x", calls=calls)))
    assert calls == []
    assert reply in (chat.EMPTY_MESSAGE,) or reply.startswith("That message is over 2,000 characters")


def test_a_good_llm_answer_streams_through():
    pieces = ["AU12, the lip corner puller, ", "is marked: ", "intensity 3.4 of 5."]
    reply = chat.Reply()
    values = list(chat.respond("how strong is AU12?", SMILE, [], fake_llm(*pieces), reply=reply))
    assert len(values) >= 3 and values[0] == pieces[0]
    assert values[-1] == "".join(pieces).strip() and reply.source == "llm"


def test_an_undetected_au_triggers_the_factual_fallback():
    reply = chat.Reply()
    text = final(chat.respond("how strong is AU12?", SMILE, [],
                              fake_llm("AU12 is marked, ", "and AU4 brow lowerer too."), reply=reply))
    assert reply.source == "facts" and "AU04" in reply.rejected
    assert text.startswith("AU12 lip corner puller at intensity 3.4 of 5 (marked).")
    assert "AU4" not in text


def test_the_asked_au_may_be_named_even_if_not_detected():
    text = final(chat.respond("what does AU4 mean?", SMILE, [],
                              fake_llm("AU4 is the brow lowerer; it is not detected here.")))
    assert text == "AU4 is the brow lowerer; it is not detected here."


@pytest.mark.parametrize("question, answer, why", [
    ("how strong is AU12?", "AU12 is at 1.5.", "numbers"),
    ("how strong is AU12?", "It is strong.", "does not name AU12"),
    ("how strong is AU12?", "AU12 is not detected.", "absent"),
    ("how strong is AU12?", "AU12 is at maximum intensity.", "intensities"),
    ("is this a genuine smile?", "No, it is not a genuine smile.", "genuine"),
    ("what emotion is this?", "It looks sad to me.", "hinted emotion"),
    ("which AUs are on the brow?", "AU1 is on the brow.", "AU01"),
    ("tell me a joke", "ha ha ha ha ha ha ha ha ha ha ha ha", "repeats"),
    ("what does AU6 mean?", "", "empty"),
])
def test_check_answer_rejects_ungrounded_text(question, answer, why):
    intent = chat.parse_question(question)
    problem = chat.check_answer(answer, SMILE, intent, question)
    assert problem is not None and why.split()[0] in problem


def test_check_answer_accepts_grounded_text():
    for question, answer in [("is this a genuine smile?", "Yes, it is a genuine Duchenne smile: AU6 and AU12."),
                             ("what emotion is this?", "A hint of happiness, from AU6 and AU12."),
                             ("which AUs are on the brow?", "None: no Action Unit is detected on the brow.")]:
        assert chat.check_answer(answer, SMILE, chat.parse_question(question), question) is None


def test_generation_stops_early_when_the_llm_strays():
    produced = []

    def generate(system, messages):
        for piece in ["AU12 is marked ", "but AU9 ", "nose wrinkler ", "and more ", "and more"]:
            produced.append(piece)
            yield piece

    reply = chat.Reply()
    final(chat.respond("how strong is AU12?", SMILE, [], generate, reply=reply))
    assert reply.source == "facts" and len(produced) == 2  # stopped at the first stray AU


def test_answers_are_cut_to_two_sentences():
    text = final(chat.respond("which action units are active?", SMILE, [],
                              fake_llm("AU6, AU12 and AU25 are active. ", "They are cheek raiser. ",
                                       "Also the lips part. ", "And more.")))
    assert chat.sentences(text) == ["AU6, AU12 and AU25 are active.", "They are cheek raiser."]


def test_llm_failure_falls_back_to_facts():
    def broken(system, messages):
        yield "AU12"
        raise RuntimeError("out of memory")

    text = final(chat.respond("how strong is AU12?", SMILE, [], broken))
    facts = chat.factual_answer(chat.parse_question("how strong is AU12?"), SMILE)
    assert text == f"{facts}\n\n{chat.FAILED_NOTE}"  # said to be the analysis's, not the LLM's


@pytest.fixture(scope="module")
def tiny_model():
    from aullava.llm import tiny_llm
    from aullava.model import AULlava, AULlavaConfig

    try:
        llm, tokenizer = tiny_llm()
    except RuntimeError as error:
        pytest.skip(f"the SmolLM2 tokenizer is unavailable: {error}")
    model = AULlava(AULlavaConfig(), llm, tokenizer)
    model.add_lora()
    return model


def test_llm_streamer_runs_the_base_llm_with_the_adapter_off(tiny_model, monkeypatch):
    import threading

    monkeypatch.setattr(tiny_model, "serve_on_torch_thread", True)  # as the Analyzer serves it

    lock = threading.RLock()
    streamer = chat.LLMStreamer(tiny_model, lock=lock, max_new_tokens=8)
    system, messages = chat.build_messages("how strong is AU12?", SMILE)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next(m for m in tiny_model.llm.modules() if isinstance(m, BaseTunerLayer))
    seen = []
    original = tiny_model.llm.forward

    def spy(*args, **kwargs):
        # every pass runs with the adapter switched off, on the model's own thread, which holds the model's lock
        seen.append((layer.disable_adapters, threading.current_thread().name.startswith("aullava-torch"),
                     tiny_model._lock._is_owned()))
        return original(*args, **kwargs)

    tiny_model.llm.forward = spy
    try:
        pieces = list(streamer(system, messages))
    finally:
        del tiny_model.llm.forward
    assert seen and set(seen) == {(True, True, True)}
    assert isinstance("".join(pieces), str)
    assert layer.disable_adapters is False  # the adapter is back on for AU generation
    assert lock.acquire(blocking=False)  # released after the generation
    lock.release()


def test_llm_streamer_reuses_the_prompt_heads_keys_and_values(tiny_model):
    """The fixed head (instruction + example) is read once per model; answers are the same as without it."""
    streamer = chat.LLMStreamer(tiny_model, max_new_tokens=12)
    calls = []
    causal_lm = tiny_model._causal_lm()
    original = causal_lm.forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("input_ids").shape[1] if kwargs.get("input_ids") is not None else None)
        return original(*args, **kwargs)

    prompts = [chat.build_messages(q, SMILE) for q in ("how strong is AU12?", "what does AU6 mean?")]
    plain = chat.LLMStreamer(tiny_model, max_new_tokens=12)
    plain.head_cache = lambda ids: None
    expected = ["".join(plain(*prompt)) for prompt in prompts]
    chat._HEAD_CACHES.pop(tiny_model, None)
    causal_lm.forward = counting
    try:
        answers = ["".join(streamer(*prompt)) for prompt in prompts]
    finally:
        del causal_lm.forward
    assert answers == expected
    head = len(chat._HEAD_CACHES[tiny_model][0])
    assert calls.count(head) == 1  # the head was read once, for the first question only
    full = [streamer.prompt_ids(*prompt).shape[1] for prompt in prompts]
    assert not any(n in full for n in calls)  # no question made the model re-read its whole prompt


def test_warming_the_streamer_reads_the_head_with_the_adapter_off(tiny_model):
    import torch

    lora_b = [p for name, p in tiny_model.llm.named_parameters() if "lora_B" in name]
    saved = [p.detach().clone() for p in lora_b]
    try:
        with torch.no_grad():
            for p in lora_b:  # a fresh adapter changes nothing (B = 0): give it an effect
                p.normal_(0, 0.5)
        chat._HEAD_CACHES.pop(tiny_model, None)
        chat.LLMStreamer(tiny_model).warm()
        head, cache = chat._HEAD_CACHES[tiny_model]
        ids = torch.tensor([head])
        with torch.no_grad():
            adapted = tiny_model.llm(input_ids=ids, use_cache=True).past_key_values
            with tiny_model.adapter_disabled():
                base = tiny_model.llm(input_ids=ids, use_cache=True).past_key_values
    finally:
        with torch.no_grad():
            for p, value in zip(lora_b, saved):
                p.copy_(value)
        chat._HEAD_CACHES.pop(tiny_model, None)
    assert torch.allclose(cache.layers[0].keys, base.layers[0].keys)
    assert not torch.allclose(cache.layers[0].keys, adapted.layers[0].keys)


def test_llm_streamer_stops_when_closed_early(tiny_model):
    streamer = chat.LLMStreamer(tiny_model, max_new_tokens=60)
    stream = streamer(*chat.build_messages("what does AU6 mean?", SMILE))
    next(stream, None)
    stream.close()  # joins the worker, which stops at the next token
    assert not any(t.name == "aullava-chat" and t.is_alive() for t in __import__("threading").enumerate())


def test_muscles_of_undetected_aus_are_rejected():
    intent = chat.parse_question("how strong is AU12?")
    copied = "AU12 lip corner puller, pulled by the depressor anguli oris muscle, is marked at 3.4 of 5."
    assert "depressor anguli oris" in chat.check_answer(copied, SMILE, intent)
    right = "AU12 lip corner puller, pulled by the zygomaticus major, is marked at 3.4 of 5."
    assert chat.check_answer(right, SMILE, intent) is None
    assert chat.unsupported_muscles("the levator labii superioris alaeque nasi wrinkles the nose", {9}) == []


def test_an_au_code_ending_a_sentence_is_read_and_a_decimal_is_not():
    assert chat.mentioned_aus("A smile: AU6 and AU12. Nothing else.") == [6, 12]
    assert chat.mentioned_aus("a value of AU4.5") == []
    assert chat.unsupported_aus("It also shows AU17.", SMILE) == [17]


def test_a_genuine_smile_answer_must_name_its_aus():
    intent = chat.parse_question("which AUs suggest a genuine smile?")
    assert intent.kind == "genuine_smile"
    vague = "The cheek raise around the eyes that marks a felt smile is a FACS rule of thumb, not a proven fact."
    assert "AU6, AU12" in chat.check_answer(vague, SMILE, intent)
    assert chat.check_answer("AU6 cheek raiser with AU12 lip corner puller: a genuine smile.", SMILE, intent) is None
    assert chat.check_answer(chat.factual_answer(intent, SOCIAL), SOCIAL, intent) is None


def test_genuine_smile_wording_with_negated_alternatives_is_accepted():
    intent = chat.parse_question("is this a genuine smile?")
    assert chat.check_answer("It is a genuine smile, not a fake one: AU6 with AU12.", SMILE, intent) is None
    assert chat.check_answer("It is not a genuine smile.", SMILE, intent) is not None
    assert chat.check_answer("It is not a genuine smile: AU12 without AU6.", SOCIAL, intent) is None


def test_drafted_writing_is_plain_greedy_decoding(tiny_model):
    """write() drafts from the prompt and keeps only the LLM's own choices: the answer greedy generate gives."""
    import torch

    streamer = chat.LLMStreamer(tiny_model, max_new_tokens=24)
    for question in ("how strong is AU12?", "what does AU6 mean?"):
        ids = streamer.prompt_ids(*chat.build_messages(question, SMILE))
        with torch.no_grad(), tiny_model.adapter_disabled():
            plain = tiny_model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                            max_new_tokens=24, min_new_tokens=24)[0, ids.shape[1]:].tolist()
            pieces = []
            written = streamer.write(ids, streamer.head_cache(ids), set(), pieces.append)
        assert written == plain and torch.cat(pieces).tolist() == plain


def test_lookup_drafts_what_followed_the_last_tokens_before():
    assert chat._lookup_draft([5, 6, 7, 8, 9, 5, 6], 2, 3) == [7, 8, 9]
    assert chat._lookup_draft([5, 6, 7, 5, 6, 1, 5, 6], 2, 2) == [1, 5]  # the latest occurrence
    assert chat._lookup_draft([1, 2, 3], 2, 4) == [] and chat._lookup_draft([5, 6, 5, 6], 2, 0) == []


def test_a_question_about_another_face_is_not_answered_with_this_faces_numbers():
    third = chat.FaceFacts.from_result(AUResult.from_active(AUS, [12], {12: 4.0}), "Discrete intensity",
                                       face_number=3, face_count=4)
    calls = []
    for question, words in (("How strong is AU12 in face 2?", "To ask about Face 2, select it"),
                            ("What about the first face?", "To ask about Face 1, select it"),
                            ("and face 7?", "no Face 7")):
        reply = chat.Reply()
        assert words in final(chat.respond(question, third, generate=fake_llm("AU12 is 4.", calls=calls), reply=reply))
        assert reply.source == "other-face"
    assert not calls  # the LLM is not asked
    assert final(chat.respond("how strong is AU12 on face 3?", third, generate=None)).startswith("AU12 lip corner")


def test_off_topic_questions_get_the_facts_not_the_llms_words():
    calls = []
    reply = chat.Reply()
    text = final(chat.respond("What is the capital of France?", SMILE, generate=fake_llm("Paris.", calls=calls),
                              reply=reply))
    assert not calls and reply.source == "facts-only" and "Paris" not in text
    assert all(f"AU{a:02d}" in text for a in (6, 12, 25))  # the whole analysis, not part of it


def test_an_answer_that_calls_an_absent_au_detected_in_any_sentence_is_rejected():
    neutral = facts_of([])
    answer = ("AU12 lip corner puller is not detected in this face (intensity 0). "
              "In this face it is detected: AU12 lip corner puller at intensity 0.")
    why = chat.check_answer(answer, neutral, chat.parse_question("How strong is AU12?"))
    assert why == "says an absent AU is detected"
