"""Answer formats: how the LLM writes the Action Units it sees, and how that text is read back.

Each format (registry `FORMATS`) is a small object that knows
  * `instruction(aus)`: the user-prompt text (task, definitions of the asked AUs from facs, output type, example);
  * `render(result)`: the canonical answer text for an `AUResult` (the training target);
  * `parse(text, aus)`: a strict reader; anything that is not a well-formed answer raises `FormatParseError`
    (a parse failure never silently becomes "no AUs");
  * `plan(aus)`: a generator describing the answer's grammar for constrained decoding. It yields `Forced(text)`
    (text written as-is) and `Choice(options)` (the decoder sends back the chosen option with `gen.send`;
    the option `END` means the answer stops there). Forced texts and chosen options concatenate to exactly
    `render(result)` of some result; the options of one choice are distinct and prefix-free;
  * `normalize(result)`: what survives a trip through the format, i.e. `parse(render(r), r.aus) == normalize(r)`.

AU codes are written zero-padded to two digits (`AU01`, `AU12`) so every code has the same shape and choices
between codes are prefix-free; parsers also accept the unpadded `AU1`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

from . import facs

MAX_INTENSITY = facs.MAX_INTENSITY
_LEVEL_WORDS = facs.INTENSITY_WORDS[1:MAX_INTENSITY + 1]  # trace .. maximum, for levels 1..5

END = None  # the Choice option meaning "the answer stops here"


# ----- AU codes and AU sets --------------------------------------------------------------------------
au_code = facs.au_code  # the spelling the model writes, where the formats' readers look for it


def check_aus(aus: Iterable[int]) -> tuple[int, ...]:
    """The asked AUs as a tuple; ValueError for an empty set, duplicates or numbers facs does not know."""
    aus = tuple(aus)
    if not aus:
        raise ValueError("no AUs given")
    for a in aus:
        if isinstance(a, bool) or not isinstance(a, int):
            raise ValueError(f"AU numbers must be integers, got {a!r}")
        if a not in facs.AUS:
            raise ValueError(f"AU{a} is not a FACS action unit known to aullava.facs")
    if len(set(aus)) != len(aus):
        raise ValueError(f"duplicate AUs in {aus}")
    return aus


def _definitions(aus) -> str:
    return "; ".join(f"{au_code(a)} {facs.AUS[a].name}" for a in aus)


# ----- results ---------------------------------------------------------------------------------------
def _check_intensity(a: int, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"intensity of {au_code(a)} must be a number or None, got {value!r}")
    if not 0 <= value <= MAX_INTENSITY:
        raise ValueError(f"intensity of {au_code(a)} must lie in 0..{MAX_INTENSITY}, got {value!r}")
    return float(value)


@dataclass
class AUResult:
    """Which of the asked AUs are present, and how intense (0-5 FACS scale; None where unknown)."""
    aus: tuple[int, ...]
    present: dict[int, bool]
    intensity: dict[int, float | None] = field(default_factory=dict)

    def __post_init__(self):
        self.aus = check_aus(self.aus)
        for name, mapping in (("present", self.present), ("intensity", self.intensity)):
            extra = set(mapping) - set(self.aus)
            if extra:
                raise ValueError(f"{name} names AUs that were not asked: {sorted(extra)}")
        self.present = {a: bool(self.present.get(a, False)) for a in self.aus}
        self.intensity = {a: _check_intensity(a, self.intensity.get(a)) for a in self.aus}

    @property
    def active(self) -> list[int]:
        """The present AUs, in `aus` order."""
        return [a for a in self.aus if self.present[a]]

    @classmethod
    def from_active(cls, aus: Iterable[int], active: Iterable[int],
                    intensity: Mapping[int, float | None] | None = None) -> "AUResult":
        """A result from the set of active AUs. With `intensity` given, AUs it leaves out get 0.0 if absent
        (and None if present); without it every intensity is None."""
        aus = check_aus(aus)
        active = set(active)
        unknown = active - set(aus)
        if unknown:
            raise ValueError(f"active AUs {sorted(unknown)} are not among the asked AUs {aus}")
        if intensity is None:
            values = {a: None for a in aus}
        else:
            values = {a: intensity.get(a, None if a in active else 0.0) for a in aus}
        return cls(aus, {a: a in active for a in aus}, values)

    def to_dict(self) -> dict:
        """JSON-ready: {"AU01": {"present": bool, "intensity": float | None}, ...} in `aus` order."""
        return {au_code(a): {"present": self.present[a], "intensity": self.intensity[a]} for a in self.aus}

    @classmethod
    def from_dict(cls, data: Mapping) -> "AUResult":
        """Inverse of `to_dict`."""
        aus, present, intensity = [], {}, {}
        for key, value in data.items():
            match = re.fullmatch(r"AU(\d{1,2})", key)
            if not match:
                raise ValueError(f"bad AU key {key!r}")
            a = int(match.group(1))
            aus.append(a)
            present[a] = bool(value["present"])
            intensity[a] = value.get("intensity")
        return cls(tuple(aus), present, intensity)


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _level(result: AUResult, a: int) -> int:
    """The discrete 0-5 intensity a format writes: 0 if absent, else the rounded intensity clipped to 1..5."""
    if not result.present[a]:
        return 0
    value = result.intensity[a]
    if value is None:
        raise ValueError(f"{au_code(a)} is present but has no intensity; this format writes one")
    return min(MAX_INTENSITY, max(1, round_half_up(value)))


def _tenths(result: AUResult, a: int) -> int:
    """The continuous intensity in tenths, clipped so presence survives: 5..50 if present, 0..4 if absent."""
    value = result.intensity[a]
    if value is None:
        if result.present[a]:
            raise ValueError(f"{au_code(a)} is present but has no intensity; this format writes one")
        return 0
    tenths = round_half_up(value * 10)
    return min(10 * MAX_INTENSITY, max(5, tenths)) if result.present[a] else min(4, max(0, tenths))


# ----- parse errors ----------------------------------------------------------------------------------
class FormatParseError(ValueError):
    """The text is not a well-formed answer in the format; `.reason` says why, `.text` is what was read."""

    def __init__(self, text: str, reason: str):
        self.text = text
        self.reason = reason
        shown = text if len(text) <= 200 else text[:200] + "..."
        super().__init__(f"{reason} (in {shown!r})")


def _resolve(code: str, aus: tuple[int, ...], seen, text: str) -> int:
    """The AU number of a written code ('AU01' or 'AU1') if it is one of the asked AUs, not seen before."""
    match = re.fullmatch(r"AU(\d+)", code)
    if not match:
        raise FormatParseError(text, f"expected an AU code like {au_code(aus[0])!r}, got {code!r}")
    if len(match.group(1)) > 2:
        raise FormatParseError(text, f"malformed AU code {code!r} (expected two digits, e.g. {au_code(aus[0])!r})")
    number = int(match.group(1))
    if number not in facs.AUS:
        raise FormatParseError(text, f"{code} is not a FACS action unit")
    if number not in aus:
        raise FormatParseError(text, f"{au_code(number)} was not asked (asked: {', '.join(map(au_code, aus))})")
    if number in seen:
        raise FormatParseError(text, f"{au_code(number)} appears more than once")
    return number


def _check_order(number: int, previous: int | None, aus, text: str):
    if previous is not None and aus.index(number) < aus.index(previous):
        raise FormatParseError(text, f"{au_code(number)} comes after {au_code(previous)}; "
                                     f"AUs must follow the asked order")


# ----- plans -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forced:
    """Text the answer contains here, written as-is."""
    text: str


@dataclass(frozen=True)
class Choice:
    """A point where the LLM picks one of `options` (END = stop here). Options are distinct and prefix-free.

    `mean`: the options are numbers and the decoder reads their mean under the LLM's probabilities instead of
    the likeliest one: it writes the largest option not above that mean (rounded to tenths) and sends it back
    as a `MeanOf`, which carries the mean for the plan to write its fraction."""
    options: tuple
    mean: bool = False

    def __post_init__(self):
        options = tuple(self.options)
        object.__setattr__(self, "options", options)
        if len(options) < 2:
            raise ValueError(f"a choice needs at least two options, got {options}")
        if len(set(options)) != len(options):
            raise ValueError(f"duplicate options in {options}")
        texts = [o for o in options if o is not END]
        for o in texts:
            if not isinstance(o, str) or not o:
                raise ValueError(f"options must be non-empty strings or END, got {o!r}")
        for o in texts:
            for p in texts:
                if o is not p and o.startswith(p):
                    raise ValueError(f"option {p!r} is a prefix of option {o!r}")


Plan = Iterator  # a generator of Forced / Choice items that receives chosen options via send()


class MeanOf(str):
    """The option a `Choice(mean=True)` wrote, with the mean it stands for."""

    def __new__(cls, option: str, mean: float):
        chosen = super().__new__(cls, option)
        chosen.mean = mean
        return chosen


def _choose(options, mean: bool = False):
    """`chosen = yield from _choose(options)` inside a plan: yield a Choice and check what comes back."""
    options = tuple(options)
    chosen = yield Choice(options, mean)
    if chosen not in options:
        raise ValueError(f"{chosen!r} is not one of the options {options}")
    return chosen


def _merge_forced(plan: Plan) -> Plan:
    """Wrap a plan so consecutive Forced texts come out as one."""
    buffer, sent = "", None
    while True:
        try:
            item = plan.send(sent)
        except StopIteration:
            if buffer:
                yield Forced(buffer)
            return
        if isinstance(item, Forced):
            buffer += item.text
            sent = None
            continue
        if buffer:
            yield Forced(buffer)
            buffer = ""
        sent = yield item


def follow_plan(plan: Plan, choose: Callable[[tuple], object]) -> str:
    """Run a plan, letting `choose(options) -> option` decide every Choice; returns the written text."""
    pieces = []
    try:
        item = next(plan)
        while True:
            if isinstance(item, Forced):
                pieces.append(item.text)
                item = plan.send(None)
                continue
            option = choose(item.options)
            if option not in item.options:
                raise ValueError(f"chooser returned {option!r}, not one of {item.options}")
            if option is END:
                plan.close()
                break
            pieces.append(option)
            item = plan.send(option)
    except StopIteration:
        pass
    return "".join(pieces)


def replay(choices: Iterable) -> Callable[[tuple], object]:
    """A chooser for `follow_plan` that returns the given options one after another."""
    pending = iter(choices)

    def choose(options):
        return next(pending)
    return choose


def plan_choices(plan: Plan, text: str) -> list:
    """The options (END included where chosen) that make `plan` write exactly `text`; ValueError if the plan
    cannot write it. The oracle of teacher forcing: `follow_plan(plan, replay(choices))` writes `text` again."""
    choices, pos = [], 0
    try:
        item = next(plan)
        while True:
            if isinstance(item, Forced):
                if not text.startswith(item.text, pos):
                    raise ValueError(f"expected {item.text!r} at position {pos} of {text!r}")
                pos += len(item.text)
                item = plan.send(None)
                continue
            matches = [o for o in item.options if o is not END and text.startswith(o, pos)]
            if not matches:
                if END in item.options and pos == len(text):
                    choices.append(END)
                    plan.close()
                    return choices
                raise ValueError(f"none of {item.options} continues {text!r} at position {pos}")
            choices.append(matches[0])
            pos += len(matches[0])
            item = plan.send(matches[0])
    except StopIteration:
        pass
    if pos != len(text):
        raise ValueError(f"the plan ends at position {pos} of {text!r}")
    return choices


# ----- formats ---------------------------------------------------------------------------------------
class Format:
    name: str = ""
    title: str = ""
    carries_intensity: bool = False

    # subclasses implement these four
    def _task(self, aus) -> str:
        raise NotImplementedError

    def render(self, result: AUResult) -> str:
        raise NotImplementedError

    def parse(self, text: str, aus: Iterable[int]) -> AUResult:
        raise NotImplementedError

    def _plan(self, aus) -> Plan:
        raise NotImplementedError

    # shared
    def instruction(self, aus: Iterable[int]) -> str:
        """The user-prompt text: task, definitions of the asked AUs, output type with an example."""
        aus = check_aus(aus)
        return (f"Which facial Action Units (AUs) are active in this face? The AUs to consider: "
                f"{_definitions(aus)}. {self._task(aus)} Example: {self.render(example_result(aus))}")

    def says_present(self, option) -> bool:
        """Whether choosing `option` says an AU is there (training weighs these decisions). Only the list and
        the binary and 0-5 vectors say it in one choice; elsewhere False."""
        return False

    def plan(self, aus: Iterable[int]) -> Plan:
        """The answer's grammar as a generator of Forced / Choice (see the module docstring)."""
        aus = check_aus(aus)
        return _merge_forced(self._plan(aus))

    def normalize(self, result: AUResult) -> AUResult:
        """What of `result` the format keeps: `parse(render(result), result.aus)` equals this."""
        if not self.carries_intensity:
            return AUResult(result.aus, dict(result.present), {})
        return AUResult(result.aus, dict(result.present), {a: float(_level(result, a)) for a in result.aus})

    def __repr__(self):
        return f"<Format {self.name}>"


def example_result(aus: Iterable[int]) -> AUResult:
    """The result the instructions show: a smile (AU06 slight, AU12 marked) when both are asked, else the first
    one or two asked AUs at those intensities."""
    aus = check_aus(aus)
    shown = (6, 12) if 6 in aus and 12 in aus else aus[:2]
    return AUResult.from_active(aus, shown, dict(zip(shown, (1.8, 3.4))))


class ListFormat(Format):
    name = "list"
    title = "List of active AUs"

    def _task(self, aus):
        return ("Answer with the active AUs in that order, separated by commas, or with none if no AU is "
                "active.")

    def render(self, result):
        return ", ".join(au_code(a) for a in result.active) or "none"

    def parse(self, text, aus):
        aus = check_aus(aus)
        body = text.strip()
        if not body:
            raise FormatParseError(text, "empty answer")
        if body == "none":
            return AUResult.from_active(aus, ())
        active, previous = [], None
        for piece in re.split(r"\s*,\s*", body):
            if piece == "none":
                raise FormatParseError(text, "'none' cannot be combined with AU codes")
            number = _resolve(piece, aus, active, text)
            _check_order(number, previous, aus, text)
            active.append(number)
            previous = number
        return AUResult.from_active(aus, active)

    def says_present(self, option):
        return option not in (END, "none")

    def _plan(self, aus):
        codes = [au_code(a) for a in aus]
        chosen = yield from _choose(("none",) + tuple(codes))
        if chosen == "none":
            return
        index = codes.index(chosen)
        while index + 1 < len(codes):
            chosen = yield from _choose(tuple(", " + c for c in codes[index + 1:]) + (END,))
            if chosen is END:
                return
            index = codes.index(chosen[2:])


class _VectorFormat(Format):
    """`AU01:<value> AU02:<value> ...`: every asked AU once, in the asked order, single spaces between."""
    value_hint = ""

    def _value_text(self, result, a) -> str:
        raise NotImplementedError

    def _read_value(self, value: str, a: int, token: str, text: str) -> tuple[bool, float | None]:
        raise NotImplementedError

    def _value_plan(self):
        raise NotImplementedError

    def render(self, result):
        return " ".join(f"{au_code(a)}:{self._value_text(result, a)}" for a in result.aus)

    def parse(self, text, aus):
        aus = check_aus(aus)
        tokens = text.split()
        if not tokens:
            raise FormatParseError(text, "empty answer")
        present, intensity = {}, {}
        for position, token in enumerate(tokens):
            if position >= len(aus):
                code = token.partition(":")[0]
                if re.fullmatch(r"AU\d+", code):
                    _resolve(code, aus, present, text)  # says why: not FACS, not asked, or repeated
                raise FormatParseError(text, f"unexpected text after the last AU: {' '.join(tokens[position:])!r}")
            expected = aus[position]
            code, colon, value = token.partition(":")
            if not colon:
                raise FormatParseError(text, f"expected '{au_code(expected)}:{self.value_hint}', got {token!r}")
            number = _resolve(code, aus, present, text)
            if number != expected:
                raise FormatParseError(text, f"expected {au_code(expected)} at position {position + 1}, got "
                                             f"{au_code(number)}; every asked AU must appear once, in the "
                                             f"asked order")
            present[number], intensity[number] = self._read_value(value, number, token, text)
        if len(present) < len(aus):
            raise FormatParseError(text, f"the answer stops before {au_code(aus[len(present)])}; every asked "
                                         f"AU needs a value")
        return AUResult(aus, present, intensity)

    def _plan(self, aus):
        for index, a in enumerate(aus):
            yield Forced(("" if index == 0 else " ") + au_code(a) + ":")
            yield from self._value_plan()


class BinaryFormat(_VectorFormat):
    name = "binary"
    title = "Presence vector (0/1)"
    value_hint = "0|1"

    def _task(self, aus):
        return ("Answer with every AU in that order as AU:1 if it is active or AU:0 if not, separated by "
                "spaces.")

    def _value_text(self, result, a):
        return "1" if result.present[a] else "0"

    def _read_value(self, value, a, token, text):
        if value not in ("0", "1"):
            c = au_code(a)
            raise FormatParseError(text, f"expected '{c}:0' or '{c}:1' for {c}, got {token!r}")
        return value == "1", None

    def says_present(self, option):
        return option != "0"

    def _value_plan(self):
        yield from _choose(("0", "1"))


class IntensityFormat(_VectorFormat):
    name = "intensity"
    title = "FACS intensity (0-5)"
    carries_intensity = True
    value_hint = "0..5"

    def _task(self, aus):
        scale = ", ".join(f"{level} {word}" + (f" ({facs.INTENSITY_LETTERS[level - 1]})" if level else "")
                          for level, word in enumerate(facs.INTENSITY_WORDS[:MAX_INTENSITY + 1]))
        return (f"Answer with every AU in that order as AU:intensity on the FACS scale {scale}, separated by "
                f"spaces.")

    def _value_text(self, result, a):
        return str(_level(result, a))

    def _read_value(self, value, a, token, text):
        if not re.fullmatch(f"[0-{MAX_INTENSITY}]", value):
            raise FormatParseError(text, f"expected an intensity 0-5 for {au_code(a)} (like "
                                         f"'{au_code(a)}:0' or '{au_code(a)}:3'), got {token!r}")
        return value != "0", float(value)

    def says_present(self, option):
        return option != "0"

    def _value_plan(self):
        yield from _choose(tuple(str(level) for level in range(MAX_INTENSITY + 1)))


class ContinuousFormat(_VectorFormat):
    name = "continuous"
    title = "Continuous intensity (0.0-5.0)"
    carries_intensity = True
    value_hint = "0.0..5.0"
    threshold = 0.5  # presence = value >= threshold

    def _task(self, aus):
        return (f"Answer with every AU in that order as AU:value, its intensity from 0.0 (absent) to "
                f"{MAX_INTENSITY}.0 (maximum) with one decimal, separated by spaces; an AU is active from "
                f"{self.threshold}.")

    def _value_text(self, result, a):
        tenths = _tenths(result, a)
        return f"{tenths // 10}.{tenths % 10}"

    def _read_value(self, value, a, token, text):
        if not re.fullmatch(rf"[0-{MAX_INTENSITY}]\.[0-9]", value) or float(value) > MAX_INTENSITY:
            raise FormatParseError(text, f"expected a value 0.0-{MAX_INTENSITY}.0 with one decimal for "
                                         f"{au_code(a)} (like '{au_code(a)}:1.8'), got {token!r}")
        return float(value) >= self.threshold, float(value)

    def normalize(self, result):
        values = {a: _tenths(result, a) / 10 for a in result.aus}
        return AUResult(result.aus, {a: values[a] >= self.threshold for a in result.aus}, values)

    def _value_plan(self):
        # Read as the mean level under the LLM's probabilities (a value between its levels where it is unsure
        # which), not the likeliest level: trained on whole CK+ levels, the likeliest tenth is always .0.
        whole = yield from _choose(tuple(str(d) for d in range(MAX_INTENSITY + 1)), mean=True)
        if whole == str(MAX_INTENSITY):
            yield Forced(".0")
        elif isinstance(whole, MeanOf):
            yield Forced(f".{round_half_up(whole.mean * 10) - int(whole) * 10}")
        else:  # a training target: the tenth as written
            yield Forced(".")
            yield from _choose(tuple(str(d) for d in range(10)))


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


class JsonFormat(Format):
    name = "json"
    title = "JSON"
    carries_intensity = True

    def _task(self, aus):
        return (f'Answer with a JSON object: "active", the list of active AUs in that order, and "intensity", '
                f"each active AU's FACS intensity from 1 ({_LEVEL_WORDS[0]}) to {MAX_INTENSITY} "
                f"({_LEVEL_WORDS[-1]}).")

    def render(self, result):
        active = result.active
        return json.dumps({"active": [au_code(a) for a in active],
                           "intensity": {au_code(a): _level(result, a) for a in active}})

    def parse(self, text, aus):
        aus = check_aus(aus)
        if not text.strip():
            raise FormatParseError(text, "empty answer")
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except ValueError as error:  # JSONDecodeError is a ValueError, and so are duplicate keys
            raise FormatParseError(text, f"not valid JSON: {error}") from None
        if not isinstance(data, dict) or set(data) != {"active", "intensity"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise FormatParseError(text, f"expected an object with exactly the keys 'active' and 'intensity', "
                                         f"got {got}")
        if not isinstance(data["active"], list):
            raise FormatParseError(text, "'active' must be a list of AU codes")
        active, previous = [], None
        for code in data["active"]:
            if not isinstance(code, str):
                raise FormatParseError(text, f"'active' must hold AU code strings, got {code!r}")
            number = _resolve(code, aus, active, text)
            _check_order(number, previous, aus, text)
            active.append(number)
            previous = number
        if not isinstance(data["intensity"], dict):
            raise FormatParseError(text, "'intensity' must be an object mapping active AUs to 1-5")
        levels = {}
        for code, value in data["intensity"].items():
            number = _resolve(code, aus, levels, text)
            if number not in active:
                raise FormatParseError(text, f"'intensity' gives {au_code(number)}, which is not in 'active'")
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_INTENSITY:
                raise FormatParseError(text, f"intensity of {au_code(number)} must be an integer 1-"
                                             f"{MAX_INTENSITY}, got {value!r}")
            levels[number] = float(value)
        missing = [au_code(a) for a in active if a not in levels]
        if missing:
            raise FormatParseError(text, f"'intensity' lacks {', '.join(missing)}")
        return AUResult.from_active(aus, active, levels)

    def _plan(self, aus):
        codes = [au_code(a) for a in aus]
        yield Forced('{"active": [')
        chosen = yield from _choose(tuple(f'"{c}"' for c in codes) + ("]",))
        active = []
        while chosen != "]":
            index = codes.index(chosen.lstrip(", ").strip('"'))
            active.append(codes[index])
            if index + 1 == len(codes):
                yield Forced("]")
                break
            chosen = yield from _choose(tuple(f', "{c}"' for c in codes[index + 1:]) + ("]",))
        yield Forced(', "intensity": {')
        for position, code in enumerate(active):
            yield Forced((", " if position else "") + f'"{code}": ')
            yield from _choose(tuple(str(level) for level in range(1, MAX_INTENSITY + 1)))
        yield Forced("}}")


class SentenceFormat(Format):
    name = "sentence"
    title = "English sentence"
    carries_intensity = True
    opening = "This face shows "
    nothing = "no active action units"

    def _task(self, aus):
        return (f"Answer with one English sentence naming each active AU in that order with its name and "
                f"intensity ({', '.join(_LEVEL_WORDS[:-1])} or {_LEVEL_WORDS[-1]}), or saying that it shows "
                f"{self.nothing}.")

    def _item(self, a, level):
        return f"{au_code(a)} ({facs.AUS[a].name}) at {_LEVEL_WORDS[level - 1]} intensity"

    def render(self, result):
        items = [self._item(a, _level(result, a)) for a in result.active]
        return self.opening + (", ".join(items) if items else self.nothing) + "."

    _ITEM = re.compile(r"(AU\d+) \(([^()]*)\) at ([a-z]+) intensity")  # code, name, intensity word
    _SENTENCE = re.compile(r"This face shows (?:no active action units"
                           r"|AU\d+ \([^()]*\) at [a-z]+ intensity(?:, AU\d+ \([^()]*\) at [a-z]+ intensity)*)\.")

    def parse(self, text, aus):
        aus = check_aus(aus)
        body = text.strip()
        if not body:
            raise FormatParseError(text, "empty answer")
        if not self._SENTENCE.fullmatch(body):
            raise FormatParseError(text, f"expected '{self.opening}{self._item(aus[0], 2)}, ...' or "
                                         f"'{self.opening}{self.nothing}.'")
        active, levels, previous = [], {}, None
        for match in self._ITEM.finditer(body):
            code, name, word = match.groups()
            number = _resolve(code, aus, active, text)
            _check_order(number, previous, aus, text)
            if name != facs.AUS[number].name:
                raise FormatParseError(text, f"{au_code(number)} is '{facs.AUS[number].name}', not {name!r}")
            if word not in _LEVEL_WORDS:
                raise FormatParseError(text, f"unknown intensity {word!r} for {au_code(number)}; expected one "
                                             f"of {', '.join(_LEVEL_WORDS)}")
            active.append(number)
            levels[number] = float(_LEVEL_WORDS.index(word) + 1)
            previous = number
        return AUResult.from_active(aus, active, levels)

    def _plan(self, aus):
        codes = [au_code(a) for a in aus]
        yield Forced(self.opening)
        chosen = yield from _choose((self.nothing,) + tuple(codes))
        if chosen == self.nothing:
            yield Forced(".")
            return
        index = codes.index(chosen)
        while True:
            yield Forced(f" ({facs.AUS[aus[index]].name}) at ")
            yield from _choose(_LEVEL_WORDS)
            yield Forced(" intensity")
            if index + 1 == len(codes):
                yield Forced(".")
                return
            chosen = yield from _choose(tuple(", " + c for c in codes[index + 1:]) + (".",))
            if chosen == ".":
                return
            index = codes.index(chosen[2:])


FORMATS: dict[str, Format] = {f.name: f for f in (ListFormat(), BinaryFormat(), IntensityFormat(),
                                                    ContinuousFormat(), JsonFormat(), SentenceFormat())}


def format_names() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown answer format {name!r}; valid formats: {', '.join(FORMATS)}") from None
