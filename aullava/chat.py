"""Grounded follow-up chat about an analysed face.

The chat LLM is the SAME base LLM that writes the AUs, with the LoRA adapter switched off. A 135M model knows
little and invents freely, so the chat is grounded hard:

* the prompt is a fixed head (instruction + one worked example, read once per process: its keys and values are
  kept), then the last exchange, then the question preceded by its facts, computed from the analysis and
  `facs` (`factual_answer`: what an AU means, what is detected on a region, how strong an AU is, whether a
  smile is genuine by the Duchenne rule, the emotion hint, the detected AUs);
* the generated text is checked (`unsupported_aus`): if it names an AU that was not detected and that the user
  did not ask about, or leaves out the AU the question is about, the computed factual answer replaces it;
* no analysis -> a plain sentence, without calling the LLM; empty or over-long messages -> a plain sentence.

Everything except `LLMStreamer` is plain Python, testable without a model: `respond()` takes any callable
that streams text pieces for (system, messages).
"""
from __future__ import annotations

import contextlib
import copy
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from . import facs
from .formats import round_half_up

MAX_MESSAGE_CHARS = 2000
MAX_NEW_TOKENS = 120
HISTORY_TURNS = 1  # earlier exchanges kept in the prompt (each message cut to HISTORY_CHARS)
HISTORY_CHARS = 300

NO_ANALYSIS = ("No face analysed yet: give me a photo first (upload, webcam, paste or an example), "
               "then ask about its Action Units. If a photo is being analysed, ask again once its answer shows.")
EMPTY_MESSAGE = 'Please type a question, for example "what does AU6 mean?" or "is this a genuine smile?".'
# no length quoted: the page's box stops a paste one character past the limit, so the length seen here is not
# the length pasted
TOO_LONG = ("That message is over {limit:,} characters long; please ask in at most {limit:,} characters "
            "(one short question works best).")
NOT_READABLE = ("The model's answer for this face could not be read as AUs ({error}), so I have no Action "
                "Units to talk about. Try another answer format or another photo.")
FALLBACK_NOTE = "(Stated from the analysis itself: the language model's own wording did not match it.)"
FAILED_NOTE = "(Stated from the analysis itself: the language model could not answer.)"


# ----- what the chat knows about one face ---------------------------------------------------------------
@dataclass
class FaceFacts:
    """The analysis of one face as the chat sees it."""
    aus: tuple[int, ...]  # every AU the model reads
    active: tuple[int, ...]  # the detected ones
    intensity: dict = field(default_factory=dict)  # AU -> 0-5 float, or None when the format gives none
    format_title: str = ""
    face_number: int = 1  # 1-based, as the page shows it
    face_count: int = 1

    @classmethod
    def from_result(cls, result, format_title: str = "", face_number: int = 1, face_count: int = 1):
        """From an `AUResult` (formats.py)."""
        return cls(tuple(result.aus), tuple(result.active), dict(result.intensity), format_title,
                   face_number, face_count)

    @property
    def has_intensity(self) -> bool:
        return any(self.intensity.get(a) is not None for a in self.active)

    def detected(self, a: int) -> bool:
        return a in self.active


def intensity_word(value: float) -> str:
    """'marked' for 3.0: the FACS word of the nearest level (0 absent .. 5 maximum)."""
    level = min(facs.MAX_INTENSITY, max(0, round_half_up(value)))
    if value > 0 and level == 0:
        level = 1
    return facs.INTENSITY_WORDS[level]


def _name(a: int) -> str:
    return facs.au_label(a)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def describe_detected(facts: FaceFacts, a: int) -> str:
    """'AU12 lip corner puller at intensity 3.4 of 5 (marked)' or '... (present; this format gives no intensity)'."""
    value = facts.intensity.get(a)
    if value is None:
        return f"{_name(a)} (present)"
    return f"{_name(a)} at intensity {value:.1f} of {facs.MAX_INTENSITY} ({intensity_word(value)})"


def au_fact(a: int) -> str:
    """The FACS facts of one AU: name, muscles, region."""
    au = facs.AUS.get(a)
    if au is None:
        return f"{facs.au_code(a)} is not an Action Unit I know."
    return f"{facs.au_code(a)} is the {au.name}: the {au.muscles} muscle action, in the {au.region} region of the face."


# ----- what the question asks --------------------------------------------------------------------------
_AU_CODE = re.compile(r"\b(?:AU|action[\s-]*unit)\s*[-#]?\s*0*(\d{1,2})(?!\d|\.\d)", re.IGNORECASE)
_REGION_WORDS = {
    "brows": ("brow", "brows", "eyebrow", "eyebrows", "forehead"),
    "eyes": ("eye", "eyes", "eyelid", "eyelids", "lid", "lids"),
    "nose": ("nose", "nostril", "nostrils"),
    "cheeks": ("cheek", "cheeks"),
    "mouth": ("mouth", "lip", "lips"),
    "chin": ("chin",),
    "jaw": ("jaw",),
    "neck": ("neck",),
}
_GENUINE = re.compile(r"\b(genuine|duchenne|real|fake|felt|sincere|authentic|true|forced|polite|social)\b", re.I)
_SMILE = re.compile(r"\bsmil\w*|\blaugh\w*", re.I)
_STRENGTH = re.compile(r"\b(how (strong|intense|much|big|high)|strength|intensity|intense|level|score|degree)\b",
                       re.I)
_DEFINE = re.compile(r"\b(mean|means|meaning|what is|what's|what are|define|definition|explain|muscle|muscles|"
                     r"stand for|tell me about)\b", re.I)
_LIST = re.compile(r"\b(which|what|list|detected|active|present|see|show|found)\b.*\b(aus?|action units?|"
                   r"movements?)\b|\bwhat do you see\b|\bdetected\b", re.I)
_EMOTION = re.compile(r"\b(emotion\w*|feel\w*|mood|express\w*|happy|happiness|sad\w*|angry|anger|fear\w*|"
                      r"afraid|scared|surprise\w*|disgust\w*|contempt\w*)\b", re.I)


def mentioned_aus(text: str) -> list[int]:
    """AU numbers a text names, by code ('AU6', 'AU06', 'action unit 6') or by FACS name ('cheek raiser'),
    in order of first mention."""
    found: dict[int, int] = {}
    for match in _AU_CODE.finditer(text):
        found.setdefault(int(match.group(1)), match.start())
    lowered = text.lower()
    for number, au in facs.AUS.items():
        position = lowered.find(au.name)
        if position >= 0:
            found.setdefault(number, position)
    return [a for a, _ in sorted(found.items(), key=lambda item: item[1])]


def _region_of(text: str) -> str | None:
    words = set(re.findall(r"[a-z]+", text.lower()))
    for region, names in _REGION_WORDS.items():
        if words & set(names):
            return region
    return None


@dataclass(frozen=True)
class Intent:
    kind: str  # genuine_smile, intensity, region, define, emotion, list, open
    aus: tuple[int, ...] = ()  # the AUs the question names (or is about)
    region: str | None = None


def parse_question(question: str) -> Intent:
    """What kind of question this is, and which AUs or region it is about."""
    named = tuple(mentioned_aus(question))
    if _SMILE.search(question) and (_GENUINE.search(question) or "duchenne" in question.lower()):
        return Intent("genuine_smile", tuple(dict.fromkeys(named + facs.GENUINE_SMILE)))
    if "duchenne" in question.lower():
        return Intent("genuine_smile", tuple(dict.fromkeys(named + facs.GENUINE_SMILE)))
    if named and _STRENGTH.search(question):
        return Intent("intensity", named)
    region = _region_of(question)
    if named:
        return Intent("define", named)
    if region and re.search(r"\b(which|what|any|anything|list|show|happening|going on|aus?|action units?)\b",
                            question, re.I):
        return Intent("region", (), region)
    if _EMOTION.search(question) or _SMILE.search(question):
        return Intent("emotion")
    if _LIST.search(question):
        return Intent("list")
    return Intent("open")


# ----- computed answers --------------------------------------------------------------------------------
def _detected_list(facts: FaceFacts, numbers) -> str:
    return _join([describe_detected(facts, a) for a in numbers])


def factual_answer(intent: Intent, facts: FaceFacts) -> str:
    """The answer computed from the analysis and facs alone (also the fallback when the LLM strays)."""
    active = facs.sort_by_region(facts.active)
    if intent.kind == "define":
        parts = []
        for a in intent.aus:
            parts.append(au_fact(a))
            if a not in facs.AUS:
                continue
            if facts.detected(a):
                parts.append(f"In this face it is detected: {describe_detected(facts, a)}.")
            elif a in facts.aus:
                parts.append(f"It is not detected in this face.")
            else:
                parts.append(f"The model does not read {facs.au_code(a)}, so I cannot say whether this face shows it.")
        return " ".join(parts)
    if intent.kind == "intensity":
        parts = []
        for a in intent.aus:
            if a not in facs.AUS:
                parts.append(f"{facs.au_code(a)} is not an Action Unit I know.")
            elif a not in facts.aus:
                parts.append(f"The model does not read {facs.au_code(a)} ({facs.AUS[a].name}).")
            elif not facts.detected(a):
                parts.append(f"{_name(a)} is not detected in this face (intensity 0).")
            elif facts.intensity.get(a) is None:
                parts.append(f"{_name(a)} is detected, but the {facts.format_title or 'chosen'} format gives "
                             f"presence only; pick an intensity format to see how strong it is.")
            else:
                parts.append(f"{describe_detected(facts, a)}.")
        return " ".join(parts)
    if intent.kind == "region":
        region = intent.region
        here = [a for a in active if facs.AUS.get(a) and facs.AUS[a].region == region]
        if here:
            return f"On the {region}, this face shows {_detected_list(facts, here)}."
        return f"No Action Unit is detected on the {region} of this face."
    if intent.kind == "genuine_smile":
        cheek, smile = facs.GENUINE_SMILE
        if facts.detected(smile) and facts.detected(cheek):
            return (f"It looks like a genuine (Duchenne) smile: {describe_detected(facts, smile)} comes with "
                    f"{describe_detected(facts, cheek)}, the cheek raise around the eyes that marks a felt smile. "
                    f"That is a FACS rule of thumb, not proof of feeling.")
        if facts.detected(smile):
            return (f"{describe_detected(facts, smile)} is detected but {_name(cheek)} is not: by the Duchenne "
                    f"rule (AU{cheek} + AU{smile}) it looks like a social, non-Duchenne smile. That is a rule of "
                    f"thumb, not proof.")
        return (f"{_name(smile)} is not detected, so this face shows no smile to judge; a genuine (Duchenne) "
                f"smile needs AU{smile} together with AU{cheek} {facs.AUS[cheek].name}.")
    if intent.kind == "emotion":
        hints = facs.emotion_hints(active)
        if not hints:
            if not active:
                return "No Action Unit is detected, so nothing hints at an emotion (a neutral face)."
            return (f"The detected AUs ({_join([_name(a) for a in active])}) match no emotion prototype; "
                    f"no emotion hint.")
        best = hints[0]
        support = " + ".join(facs.au_code(a) for a in best.supporting_aus)
        text = (f"A hint, not a diagnosis: the detected {support} match the EMFACS prototype of "
                f"{best.emotion} ({best.coverage:.0%} of it).")
        if len(hints) > 1:
            text += " Also partly: " + ", ".join(h.emotion for h in hints[1:3]) + "."
        return text
    # list and open questions: a summary of the analysis
    summary = (f"The model detects {_detected_list(facts, active)}." if active
               else "The model detects no active Action Unit in this face.")
    if intent.kind == "open":
        which = f" (Face {facts.face_number} of {facts.face_count})" if facts.face_count > 1 else ""
        return f"I can only talk about this face's Action Units{which}. " + summary
    return summary


# ----- the prompt --------------------------------------------------------------------------------------
# The prompt is a fixed head (instruction + worked examples), then the last exchanges, then one user turn with
# the facts of THIS face that answer the question. The head never changes, so its keys and values are computed
# once per process and re-used (LLMStreamer); only the last turn is read per question.
INSTRUCTION = ("You are the chat assistant of AU-LLaVA, which reads facial Action Units (FACS) from a photo. "
               "Every question comes with the facts that answer it, computed from the analysis of the face. "
               "Answer in one or two short sentences that restate those facts. Never mention an Action Unit that "
               "the facts do not name.")
# One worked turn about an imaginary face, its facts computed exactly as for a real question and its answer
# those facts repeated: measured on 24 questions about 3 analysed faces, the 135M model's answer passed
# `check_answer` 17 times with this turn (14 before `respond` cut the model's made-up next turn), 10 with no
# example and 11 with four varied turns (it copies the last example's answer instead of its own facts).
_EXAMPLE_FACE = FaceFacts(aus=facs.CKPLUS_AUS, active=(4, 15, 25), intensity={4: 2.0, 15: 3.0, 25: 1.0},
                          format_title="Discrete intensity")
_EXAMPLE_QUESTION = "what is AU15?"


def user_turn(question: str, facts: FaceFacts, intent: Intent) -> str:
    """The question, preceded by the facts to state (the computed answer)."""
    return f"Facts: {factual_answer(intent, facts)}\nQuestion: {question.strip()}"


def _examples() -> tuple[dict, ...]:
    intent = parse_question(_EXAMPLE_QUESTION)
    return ({"role": "user", "content": user_turn(_EXAMPLE_QUESTION, _EXAMPLE_FACE, intent)},
            {"role": "assistant", "content": factual_answer(intent, _EXAMPLE_FACE)})


EXAMPLES = _examples()


def build_messages(question: str, facts: FaceFacts, history: Iterable = ()) -> tuple[str, list[dict]]:
    """(system message, conversation) for the chat LLM: the worked examples, the last HISTORY_TURNS
    exchanges (cut short), then the facts to state and the question. The system message and the examples
    are the same for every question (the prompt's fixed head)."""
    intent = parse_question(question)
    turns = [m for m in _plain_history(history) if m["role"] in ("user", "assistant")]
    turns = turns[-2 * HISTORY_TURNS:] if HISTORY_TURNS else []
    while turns and turns[0]["role"] != "user":
        turns = turns[1:]
    if turns and turns[-1]["role"] != "assistant":
        turns = turns[:-1]
    messages = list(EXAMPLES)
    messages += [{"role": m["role"], "content": _clip(m["content"], HISTORY_CHARS)} for m in turns]
    messages.append({"role": "user", "content": user_turn(question, facts, intent)})
    return INSTRUCTION, messages


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain_history(history) -> list[dict]:
    """Gradio messages (dicts, or ChatMessage objects; content a string or a list of parts) as plain dicts."""
    plain = []
    for message in history or ():
        role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if isinstance(content, list):  # gradio 6 may give [{"type": "text", "text": ...}]
            content = " ".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        if isinstance(content, str) and role:
            plain.append({"role": role, "content": content})
    return plain


# ----- checking the generated answer -------------------------------------------------------------------
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
_NEGATION = re.compile(r"\b(no|not|none|nothing|isn't|isnt|doesn't|non|neither|nor|without)\b|n't\b", re.I)
_INTENSITY_WORD = re.compile(r"\b(" + "|".join(facs.INTENSITY_WORDS[1:]) + r")\b", re.I)
MAX_SENTENCES = 2
_NEXT_TURN = re.compile(r"\n\s*(?:Question|Facts)\s*:")


def _muscle_phrases() -> dict[str, set[int]]:
    """Muscle names of facs (e.g. 'zygomaticus major') -> the AUs they move."""
    phrases: dict[str, set[int]] = {}
    for number, au in facs.AUS.items():
        for part in re.split(r",|\band\b|\bor\b|\(|\)", au.muscles):
            part = re.sub(r"^(relaxation of|relaxed|pars \w+)\s*", "", part.strip()).strip()
            if len(part) >= 6 and part not in ("inferioris",) and not part.startswith(("pars ", "masseter")):
                phrases.setdefault(part.lower(), set()).add(number)
    return phrases


_MUSCLES = _muscle_phrases()


def unsupported_muscles(answer: str, allowed) -> list[str]:
    """Muscles the answer names that move none of the allowed AUs (e.g. a muscle copied from the example)."""
    lowered = answer.lower()
    named = [m for m in _MUSCLES if m in lowered]
    named = [m for m in named if not any(m != other and m in other for other in named)]  # longest match only
    return sorted(m for m in named if not _MUSCLES[m] & set(allowed))


def unsupported_aus(answer: str, facts: FaceFacts, asked: Iterable[int] = ()) -> list[int]:
    """AUs the answer names that were neither detected nor asked about."""
    allowed = set(facts.active) | set(asked)
    return [a for a in mentioned_aus(answer) if a not in allowed]


def _numbers(text: str) -> set[str]:
    """The numbers of a text outside AU codes, normalised ('3.40' -> '3.4', '3.0' -> '3')."""
    plain = _AU_CODE.sub(" ", text)
    return {f"{float(n):g}" for n in _NUMBER.findall(plain)}


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def repeats(text: str, n: int = 4, times: int = 3) -> bool:
    """True when some n-word sequence occurs `times` times: the small LLM is looping."""
    words = re.findall(r"\w+", text.lower())
    counts: dict = {}
    for i in range(len(words) - n + 1):
        key = tuple(words[i:i + n])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= times:
            return True
    return False


def check_answer(answer: str, facts: FaceFacts, intent: Intent, question: str = "") -> str | None:
    """None if the generated answer may stand, else why not. The answer must name no AU that was neither
    detected nor asked about, state no number or intensity word the facts do not hold, not loop, and carry
    the point of a computable question (the AU asked about, yes/no of the smile rule, the emotion...)."""
    if not answer.strip():
        return "empty answer"
    extra = unsupported_aus(answer, facts, intent.aus)
    if extra:
        return "names AUs that were not detected: " + ", ".join(facs.au_code(a) for a in extra)
    muscles = unsupported_muscles(answer, set(facts.active) | set(intent.aus))
    if muscles:
        return "names muscles of AUs that were not detected: " + ", ".join(muscles)
    known = factual_answer(intent, facts)
    grounded_text = known + " " + question
    invented = _numbers(answer) - _numbers(grounded_text)
    if invented:
        return "states numbers the analysis does not hold: " + ", ".join(sorted(invented))
    words = {w.lower() for w in _INTENSITY_WORD.findall(answer)} - {
        w.lower() for w in _INTENSITY_WORD.findall(known)}
    if words:
        return "states intensities the analysis does not hold: " + ", ".join(sorted(words))
    if repeats(answer):
        return "repeats itself"
    named = set(mentioned_aus(answer))
    negated = bool(_NEGATION.search(answer))
    active = set(facts.active)
    if intent.kind in ("define", "intensity"):
        missing = [a for a in intent.aus if a not in named]
        if missing:
            return "does not name " + ", ".join(facs.au_code(a) for a in missing)
        asked_active = [a for a in intent.aus if a in active]
        asked_absent = [a for a in intent.aus if a not in active]
        if len(intent.aus) == 1 and asked_active and negated:
            return "says the detected AU is absent"
        if len(intent.aus) == 1 and asked_absent and any(
                re.search(r"\bdetected\b", s, re.I) and not _NEGATION.search(s) for s in sentences(answer)):
            return "says an absent AU is detected"  # in any sentence: "... not detected. In this face it is detected"
        if intent.kind == "intensity":
            for a in asked_active:
                value = facts.intensity.get(a)
                if value is not None and f"{value:g}" not in _numbers(answer) and \
                        intensity_word(value) not in answer.lower():
                    return f"does not give the intensity of {facs.au_code(a)}"
    elif intent.kind == "genuine_smile":
        cheek, smile = facs.GENUINE_SMILE
        genuine = cheek in active and smile in active
        denied = re.search(r"\b(not|no|isn't|isnt|never)\b\W+(?:\w+\W+){0,3}?(genuine|duchenne|real|felt)\b",
                           answer, re.I)
        if genuine and (denied or not re.search(r"genuine|duchenne|felt|real", answer, re.I)):
            return "does not say the smile is genuine"
        if not genuine and not denied and not re.search(r"social|polite|non-duchenne|no smile", answer, re.I):
            return "does not say the smile is not genuine"
        if smile in active and not {cheek, smile} <= named:  # "a felt smile" alone answers nothing
            return f"does not name the AUs of the Duchenne rule (AU{cheek}, AU{smile})"
    elif intent.kind == "region":
        here = {a for a in active if facs.AUS.get(a) and facs.AUS[a].region == intent.region}
        if here - named:
            return "leaves out " + ", ".join(facs.au_code(a) for a in sorted(here - named))
        if not here and not negated:
            return "does not say that nothing is detected there"
    elif intent.kind == "emotion":
        hints = facs.emotion_hints(facs.sort_by_region(facts.active))
        if hints and hints[0].emotion[:5].lower() not in answer.lower():
            return f"does not name the hinted emotion ({hints[0].emotion})"
    elif intent.kind == "list":
        if active - named:
            return "leaves out " + ", ".join(facs.au_code(a) for a in sorted(active - named))
        if not active and not negated:
            return "does not say that nothing is detected"
    return None


_FACE_NUMBER = re.compile(r"\bface\s*(?:number\s*|no\.?\s*|#\s*)?(\d{1,2})\b", re.I)
_FACE_ORDINAL = re.compile(r"\b(first|second|third|fourth|fifth|sixth)\s+(?:face|person)\b", re.I)
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")


def other_face(message: str, facts: FaceFacts) -> str | None:
    """The plain sentence for a question about another face of the photo than the one the chat is about (the
    chat holds one face's analysis: answering with its numbers would be wrong), else None."""
    number = _FACE_NUMBER.search(message)
    ordinal = _FACE_ORDINAL.search(message)
    asked = int(number.group(1)) if number else (_ORDINALS.index(ordinal.group(1).lower()) + 1 if ordinal else None)
    if asked is None or asked == facts.face_number:
        return None
    if asked > facts.face_count or asked < 1:
        return (f"This photo has {facts.face_count} analysed face{'s' if facts.face_count > 1 else ''}, so there is "
                f"no Face {asked}. I am answering about Face {facts.face_number}.")
    return (f"I am answering about Face {facts.face_number}, the face selected above. To ask about Face {asked}, "
            f"select it in the face selector, then ask again.")


def refusal(message) -> str | None:
    """The plain sentence for a message that cannot be asked (empty, too long), else None."""
    if not isinstance(message, str) or not message.strip():
        return EMPTY_MESSAGE
    if len(message) > MAX_MESSAGE_CHARS:
        return TOO_LONG.format(limit=MAX_MESSAGE_CHARS)
    return None


Generate = Callable[[str, list], Iterable[str]]  # (system, messages) -> streamed text pieces


@dataclass
class Reply:
    """How the last reply came about (for logs, tests and the benchmark)."""
    text: str = ""
    source: str = ""  # "refusal", "no-analysis", "other-face", "llm", "facts" (fallback), "facts-only" (no LLM
    # given, or a question off the face's AUs)
    llm_text: str = ""
    rejected: str | None = None  # why the LLM's text was not used


def respond(message, facts: FaceFacts | None, history: Iterable = (), generate: Generate | None = None,
            parse_error: str | None = None, reply: Reply | None = None) -> Iterator[str]:
    """Stream the reply to `message`: yields the reply so far; the last value is the final reply.

    Refusals, "no face analysed yet" and unreadable analyses are answered without the LLM. The LLM's text
    streams as it comes and is cut after MAX_SENTENCES sentences; generation is stopped as soon as the text
    names an AU it may not, or loops. If `check_answer` rejects the text, the final value is the computed
    factual answer. Pass a `Reply` to learn which path was taken."""
    reply = reply if reply is not None else Reply()
    problem = refusal(message)
    if problem:
        reply.text, reply.source = problem, "refusal"
        yield problem
        return
    if facts is None:
        reply.text = NOT_READABLE.format(error=parse_error) if parse_error else NO_ANALYSIS
        reply.source = "no-analysis"
        yield reply.text
        return
    elsewhere = other_face(message, facts)
    if elsewhere:
        reply.text, reply.source = elsewhere, "other-face"
        yield elsewhere
        return
    intent = parse_question(message)
    fallback = factual_answer(intent, facts)
    if generate is None or intent.kind == "open":  # off the face's AUs: the small LLM would answer anyway
        reply.text, reply.source = fallback, "facts-only"
        yield fallback
        return
    system, messages = build_messages(message, facts, history)
    text = ""
    stream = iter(generate(system, messages))
    try:
        for piece in stream:
            text += piece
            next_turn = _NEXT_TURN.search(text)
            if next_turn:  # the model goes on to write the user's next turn itself: its answer ended there
                text = text[:next_turn.start()]
                break
            if unsupported_aus(text, facts, intent.aus) or repeats(text):
                break  # hopeless: stop the LLM now
            if len(sentences(text)) > MAX_SENTENCES:
                text = " ".join(sentences(text)[:MAX_SENTENCES])
                break
            yield text
    except Exception as error:  # noqa: BLE001 - the chat must answer; the facts are always available
        reply.text, reply.source, reply.rejected = (f"{fallback}\n\n{FAILED_NOTE}", "facts",
                                                    f"the LLM failed: {type(error).__name__}")
        yield reply.text
        return
    finally:
        close = getattr(stream, "close", None)
        if close:
            close()  # stops the generation thread early
    text = text.strip()
    reply.llm_text = text
    reply.rejected = check_answer(text, facts, intent, message)
    if reply.rejected is not None:
        reply.text, reply.source = f"{fallback}\n\n{FALLBACK_NOTE}", "facts"
    else:
        reply.text, reply.source = text, "llm"
    yield reply.text


# ----- streaming from the base LLM -------------------------------------------------------------------------
_HEAD_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (head token ids, its KV cache)
LOOKUP_NGRAM = 2  # the answer's last tokens looked up in the prompt to draft what follows them
LOOKUP_TOKENS = 8  # drafted tokens per pass at most


def _lookup_draft(tokens: list[int], ngram: int, limit: int) -> list[int]:
    """The tokens that followed the last `ngram` tokens where they last occurred before, at most `limit`."""
    if limit <= 0 or len(tokens) <= ngram:
        return []
    tail = tokens[-ngram:]
    for start in range(len(tokens) - ngram - 1, -1, -1):
        if tokens[start:start + ngram] == tail:
            return tokens[start + ngram: start + ngram + limit]
    return []


class LLMStreamer:
    """Streams a chat answer from the AU model's own base LLM with its LoRA adapter switched off.

    `model` is an AULlava (its .llm may be a peft PeftModel, its .tokenizer owns the chat template). A model that
    serves from the torch thread (llm.submit_to_torch_thread) answers there, one job at a time, so no AU answer
    is written meanwhile with the adapter off; otherwise `lock` serialises, held by a worker thread for the
    whole generation (at most `max_new_tokens`), never by the consumer;
    closing the iterator early stops the generation at the next token. Greedy decoding, no repetition
    penalty (it would penalise copying the facts from the prompt; `respond` stops loops instead)."""

    def __init__(self, model, lock=None, max_new_tokens: int = MAX_NEW_TOKENS):
        self.model = model
        self.lock = lock if lock is not None else threading.RLock()
        self.max_new_tokens = max_new_tokens

    def _adapter_off(self):
        if hasattr(self.model, "adapter_disabled"):
            return self.model.adapter_disabled()
        return contextlib.nullcontext()  # a plain causal LM (tests): the LLM as it is

    def prompt_ids(self, system: str, messages: list):
        import torch

        from .llm import chat_prompt

        text = chat_prompt(self.model.tokenizer, messages, system=system, add_generation_prompt=True)
        return torch.tensor([self.model.tokenizer.encode(text, add_special_tokens=False)])

    def head_cache(self, ids):
        """A copy of the keys and values of the prompt's fixed head (INSTRUCTION + EXAMPLES) if `ids` start with
        that head, else None. Call it with the adapter off, as generation runs."""
        head, cache = self._head()
        if ids.shape[1] <= len(head) or tuple(ids[0, :len(head)].tolist()) != head:
            return None
        return copy.deepcopy(cache)

    def _head(self):
        """(token ids, KV cache) of the prompt's fixed head, computed once per model."""
        import torch

        from .llm import chat_prompt

        tokenizer = self.model.tokenizer
        text = chat_prompt(tokenizer, list(EXAMPLES), system=INSTRUCTION, add_generation_prompt=False)
        head = tuple(tokenizer.encode(text, add_special_tokens=False))
        stored = _HEAD_CACHES.get(self.model)
        if stored is None or stored[0] != head:
            output = self.model.llm(input_ids=torch.tensor([head]), use_cache=True)
            stored = _HEAD_CACHES[self.model] = (head, output.past_key_values)
        return stored

    def write(self, ids, cache, stop_ids, emit, cancelled=None) -> list[int]:
        """Greedy decoding of the answer to the prompt `ids` (`cache`: keys and values of its first tokens, or
        None), emitting each accepted token (a tensor) as it comes; returns the answer's tokens.

        Prompt-lookup drafting: the answers mostly repeat the facts, so after each token the tokens that
        followed the answer's last LOOKUP_NGRAM tokens where they last occur in the prompt (or answer) are fed
        too, and kept as far as they are the LLM's own greedy choices. Memory-bound on this CPU, a pass over a
        few tokens costs about one over a single token, so a copied span costs one pass instead of one per
        token. The answer is the one plain greedy decoding writes (up to float rounding of a longer pass)."""
        import torch

        llm = self.model.llm
        context = ids[0].tolist()
        feed = context[cache.get_seq_length() if cache is not None else 0:]
        answer: list[int] = []
        while len(answer) < self.max_new_tokens and not (cancelled is not None and cancelled.is_set()):
            room = min(LOOKUP_TOKENS, self.max_new_tokens - len(answer) - 1)  # a pass adds at most room + 1
            draft = _lookup_draft(context + answer, LOOKUP_NGRAM, room)
            # logits only where a choice is read: after the last fed token and after each drafted one
            output = llm(input_ids=torch.tensor([feed + draft]), past_key_values=cache, use_cache=True,
                         logits_to_keep=len(draft) + 1)
            cache = output.past_key_values
            choices = output.logits[0].argmax(-1).tolist()
            kept = 0
            while kept < len(draft) and draft[kept] == choices[kept]:
                kept += 1
            accepted = draft[:kept] + [choices[kept]]
            if kept < len(draft):
                cache.crop(-(len(draft) - kept))  # the drafted tokens after the LLM's first other choice
            for position, token in enumerate(accepted):
                if token in stop_ids:
                    accepted = accepted[:position]
                    break
            answer += accepted
            if accepted:
                emit(torch.tensor(accepted))
            if len(accepted) < kept + 1:
                break  # a stop token
            feed = [accepted[-1]]
        return answer

    def warm(self):
        """Read the prompt's fixed head now (at start-up) instead of on the first question."""
        import torch

        def read():
            with self._adapter_off(), torch.no_grad():
                self._head()

        on_model_thread = getattr(self.model, "on_model_thread", None)
        if on_model_thread is not None:
            on_model_thread(read)
        else:
            with self.lock:
                read()

    def __call__(self, system: str, messages: list) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        tokenizer = self.model.tokenizer
        ids = self.prompt_ids(system, messages)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=120)
        stop_ids = {t for t in (getattr(self.model, "eos_id", None), tokenizer.eos_token_id) if t is not None}
        cancelled = threading.Event()
        failure: list[BaseException] = []
        on_model_thread = getattr(self.model, "serve_on_torch_thread", False)  # one job at a time there: no lock

        def work():
            try:
                with (contextlib.nullcontext() if on_model_thread else self.lock), self._adapter_off(), torch.no_grad():
                    self.write(ids, self.head_cache(ids), stop_ids, streamer.put, cancelled)
                streamer.end()
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
                failure.append(error)
                streamer.end()

        if on_model_thread:  # the thread that runs all of the model's torch work (llm.submit_to_torch_thread)
            from .llm import submit_to_torch_thread

            running = submit_to_torch_thread(work)
            wait = lambda: running.exception(timeout=30)  # noqa: E731 - work() keeps its own failure
        else:  # a plain causal LM (tests)
            thread = threading.Thread(target=work, name="aullava-chat", daemon=True)
            thread.start()
            wait = lambda: thread.join(timeout=30)  # noqa: E731
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancelled.set()
            wait()
        if failure:
            raise failure[0]
