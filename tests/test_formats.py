"""Answer formats: round trips, plans that reproduce the canonical text, strict parsing."""
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aullava import facs  # noqa: E402
from aullava import formats as F  # noqa: E402

AU19 = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27)
AU_SETS = [(12,), (6, 12), (12, 6, 1), facs.BP4D_AUS, facs.DISFA_AUS, AU19, tuple(facs.AUS)]
NAMES = ["list", "binary", "intensity", "continuous", "json", "sentence"]


def random_result(rng: random.Random, aus, p_active=None) -> F.AUResult:
    """Present AUs get an intensity in 0..5 (some below 0.5, to exercise clipping); absent ones 0..0.6 or None."""
    p = rng.random() if p_active is None else p_active
    active = [a for a in aus if rng.random() < p]
    intensity = {}
    for a in aus:
        if a in active:
            intensity[a] = rng.choice([rng.uniform(0, 5), float(rng.randint(0, 5)), rng.uniform(4.9, 5.0)])
        else:
            intensity[a] = rng.choice([None, 0.0, rng.uniform(0, 0.6)])
    return F.AUResult.from_active(aus, active, intensity)


def results():
    rng = random.Random(1234)
    for aus in AU_SETS:
        yield F.AUResult.from_active(aus, (), {})
        yield F.AUResult.from_active(aus, aus, {a: 5.0 for a in aus})
        for p in (None, None, 0.2, 0.8):
            for _ in range(10):
                yield random_result(rng, aus, p)


RESULTS = list(results())


def walk(plan, choose):
    """follow_plan that also records every Choice it met."""
    seen = []

    def recording(options):
        seen.append(options)
        return choose(options)
    return F.follow_plan(plan, recording), seen


def assert_prefix_free(options):
    assert len(options) >= 2
    assert len(set(options)) == len(options)
    texts = [o for o in options if o is not F.END]
    for o in texts:
        assert isinstance(o, str) and o
        for p in texts:
            assert o is p or not o.startswith(p), (p, o)


# ----- registry --------------------------------------------------------------------------------------
def test_registry():
    assert F.format_names() == NAMES
    for name in NAMES:
        fmt = F.get_format(name)
        assert fmt.name == name and fmt.title
    with pytest.raises(ValueError, match="list, binary, intensity, continuous, json, sentence"):
        F.get_format("yaml")


# ----- results ---------------------------------------------------------------------------------------
def test_au_result():
    r = F.AUResult.from_active((12, 6, 1), [1, 12], {1: 2.0, 12: 3.5})
    assert r.active == [12, 1]
    assert r.intensity == {12: 3.5, 6: 0.0, 1: 2.0}
    d = r.to_dict()
    assert list(d) == ["AU12", "AU06", "AU01"]
    assert d["AU12"] == {"present": True, "intensity": 3.5}
    json.dumps(d)
    assert F.AUResult.from_dict(d) == r
    assert F.AUResult.from_active((1, 2), [2]).intensity == {1: None, 2: None}
    for bad in [lambda: F.AUResult((1, 3), {}), lambda: F.AUResult((1, 30), {}),
                lambda: F.AUResult((1, 1), {}), lambda: F.AUResult((), {}),
                lambda: F.AUResult((1,), {2: True}), lambda: F.AUResult((1,), {}, {1: 6.0}),
                lambda: F.AUResult.from_active((1, 2), [4])]:
        with pytest.raises(ValueError):
            bad()


# ----- round trips and plans -------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name):
    fmt = F.get_format(name)
    for r in RESULTS:
        text = fmt.render(r)
        parsed = fmt.parse(text, r.aus)
        assert parsed == fmt.normalize(r), (text, r)
        assert parsed.present == r.present
        assert fmt.render(parsed) == text  # the rendering is canonical
        if not fmt.carries_intensity:
            assert set(parsed.intensity.values()) == {None}
        else:
            assert all(v is not None for v in parsed.intensity.values())


def test_normalize_values():
    r = F.AUResult.from_active((1, 2, 4, 6), [1, 2, 4], {1: 0.2, 2: 2.5, 4: 7 / 3, 6: 0.46})
    assert F.get_format("intensity").render(r) == "AU01:1 AU02:3 AU04:2 AU06:0"
    assert F.get_format("continuous").render(r) == "AU01:0.5 AU02:2.5 AU04:2.3 AU06:0.4"
    assert F.get_format("sentence").render(r).startswith("This face shows AU01 (inner brow raiser) at trace")
    assert F.get_format("continuous").parse("AU01:0.5 AU02:2.5 AU04:2.3 AU06:0.4", (1, 2, 4, 6)) == \
        F.AUResult.from_active((1, 2, 4, 6), [1, 2, 4], {1: 0.5, 2: 2.5, 4: 2.3, 6: 0.4})
    no_level = F.AUResult.from_active((1, 2), [1])
    for name in ("intensity", "continuous", "json", "sentence"):
        with pytest.raises(ValueError):
            F.get_format(name).render(no_level)
    assert F.get_format("list").render(no_level) == "AU01"
    assert F.get_format("binary").render(no_level) == "AU01:1 AU02:0"


@pytest.mark.parametrize("name", NAMES)
def test_plan_oracle_reproduces_render(name):
    fmt = F.get_format(name)
    for r in RESULTS:
        text = fmt.render(r)
        choices = F.plan_choices(fmt.plan(r.aus), text)
        written, seen = walk(fmt.plan(r.aus), F.replay(choices))
        assert written == text
        for options in seen:
            assert_prefix_free(options)


@pytest.mark.parametrize("name", NAMES)
def test_random_plan_walks_are_canonical_answers(name):
    """Whatever the decoder chooses, the plan writes a text the format parses and renders identically."""
    fmt = F.get_format(name)
    rng = random.Random(99)
    for aus in AU_SETS:
        for _ in range(40):
            bias = rng.random()

            def choose(options):
                if F.END in options and rng.random() < bias:
                    return F.END
                return rng.choice(options)
            text, seen = walk(fmt.plan(aus), choose)
            for options in seen:
                assert_prefix_free(options)
            parsed = fmt.parse(text, aus)
            assert fmt.render(parsed) == text


def test_plan_shapes():
    plan = F.get_format("binary").plan((1, 2))
    assert next(plan) == F.Forced("AU01:")
    assert plan.send(None) == F.Choice(("0", "1"))
    assert plan.send("1") == F.Forced(" AU02:")
    plan = F.get_format("list").plan((1, 6, 12))
    assert next(plan) == F.Choice(("none", "AU01", "AU06", "AU12"))
    assert plan.send("AU01") == F.Choice((", AU06", ", AU12", F.END))
    with pytest.raises(StopIteration):
        plan.send(", AU12")
    plan = F.get_format("continuous").plan((1, 2))
    next(plan)
    plan.send(None)
    assert plan.send("5") == F.Forced(".0 AU02:")
    plan = F.get_format("continuous").plan((1, 2))
    next(plan)
    assert plan.send(None) == F.Choice(tuple("012345"), mean=True)  # decoded as the mean of the levels
    assert plan.send(F.MeanOf("2", 2.37)) == F.Forced(".4 AU02:")  # the decoder's mean: its tenth is written
    assert plan.send(None) == F.Choice(tuple("012345"), mean=True)
    assert plan.send(F.MeanOf("0", 0.04)) == F.Forced(".0")
    plan = F.get_format("continuous").plan((1,))
    next(plan)
    plan.send(None)
    assert plan.send("2") == F.Forced(".")  # a training target: the tenth is one more choice
    assert plan.send(None) == F.Choice(tuple("0123456789"))
    plan = F.get_format("json").plan((6, 12))
    assert next(plan) == F.Forced('{"active": [')
    assert plan.send(None) == F.Choice(('"AU06"', '"AU12"', "]"))
    with pytest.raises(ValueError):
        plan.send("AU06")  # not an option
    with pytest.raises(ValueError):
        F.get_format("list").plan((1, 3))


def test_choice_rejects_prefixes():
    with pytest.raises(ValueError):
        F.Choice(("AU1", "AU12"))
    with pytest.raises(ValueError):
        F.Choice(("a", "a"))
    F.Choice(("AU01", "AU12", F.END))


def test_plan_choices_rejects_unreachable_text():
    with pytest.raises(ValueError):
        F.plan_choices(F.get_format("list").plan((1, 2)), "AU02, AU01")
    with pytest.raises(ValueError):
        F.plan_choices(F.get_format("binary").plan((1, 2)), "AU01:1")


# ----- presence agrees across formats ----------------------------------------------------------------
def test_presence_agrees_across_formats():
    for r in RESULTS:
        presences = [F.get_format(n).parse(F.get_format(n).render(r), r.aus).present for n in NAMES]
        assert all(p == r.present for p in presences), r
        assert all(F.get_format(n).normalize(r).present == r.present for n in NAMES)


# ----- strict parsing --------------------------------------------------------------------------------
def rejects(name, text, aus=(1, 2, 4, 6), match=None):
    with pytest.raises(F.FormatParseError, match=match) as info:
        F.get_format(name).parse(text, aus)
    assert info.value.text == text and info.value.reason
    return info.value


@pytest.mark.parametrize("name", NAMES)
def test_rejects_empty_and_garbage(name):
    for text in ["", "   ", "\n", "I see a happy face", "AU1, AU2, AU3, AU4", "AU12, AU", "AU01:1 AU02:",
                 '{"active": [', "none none", "This face shows"]:
        rejects(name, text)


def test_list_parse():
    aus = (1, 2, 4, 6)
    fmt = F.get_format("list")
    assert fmt.parse("AU01, AU06", aus).active == [1, 6]
    assert fmt.parse("AU1, AU6\n", aus).active == [1, 6]
    assert fmt.parse("none", aus).active == []
    rejects("list", "AU1, AU2, AU3, AU4", aus, match="AU3 is not a FACS action unit")
    rejects("list", "AU01, AU12", aus, match="AU12 was not asked")
    rejects("list", "AU01, AU30", aus, match="not a FACS")
    rejects("list", "AU08", aus, match="not a FACS")
    rejects("list", "AU01, AU01", aus, match="more than once")
    rejects("list", "AU06, AU01", aus, match="asked order")
    rejects("list", "AU12, AU", (6, 12), match="expected an AU code")
    rejects("list", "AU01, ", aus)
    rejects("list", "AU01 AU02", aus)
    rejects("list", "AU01, AU02.", aus)
    rejects("list", "AU001", aus, match="malformed")
    rejects("list", "none, AU01", aus)
    rejects("list", "au01", aus)


def test_binary_parse():
    aus = (1, 2, 4)
    fmt = F.get_format("binary")
    assert fmt.parse("AU01:1 AU02:0 AU04:1", aus).active == [1, 4]
    assert fmt.parse("AU1:1 AU2:0 AU4:1", aus).active == [1, 4]
    e = rejects("binary", "AU01:1 AU02:2 AU04:0", aus)
    assert e.reason == "expected 'AU02:0' or 'AU02:1' for AU02, got 'AU02:2'"
    rejects("binary", "AU01:1 AU04:0", aus, match="expected AU02")  # missing AU
    rejects("binary", "AU01:1 AU02:0", aus, match="stops before AU04")  # truncated
    rejects("binary", "AU01:1 AU02:", aus, match="AU02:0")
    rejects("binary", "AU01:1 AU02:0 AU04:0 AU06:1", aus, match="was not asked")
    rejects("binary", "AU01:1 AU02:0 AU04:0 junk", aus, match="after the last AU")
    rejects("binary", "AU01:1 AU01:0 AU04:0", aus, match="more than once")
    rejects("binary", "AU02:1 AU01:0 AU04:0", aus, match="asked order")
    rejects("binary", "AU01:1, AU02:0, AU04:0", aus)
    rejects("binary", "AU01=1 AU02:0 AU04:0", aus)
    rejects("binary", "AU01:1 AU03:0 AU04:0", aus, match="not a FACS")


def test_intensity_parse():
    aus = (6, 12)
    fmt = F.get_format("intensity")
    r = fmt.parse("AU06:0 AU12:5", aus)
    assert r.present == {6: False, 12: True} and r.intensity == {6: 0.0, 12: 5.0}
    rejects("intensity", "AU06:0 AU12:6", aus, match="intensity 0-5")
    rejects("intensity", "AU06:0 AU12:C", aus)
    rejects("intensity", "AU06:0 AU12:2.5", aus)
    rejects("intensity", "AU06:0 AU12:", aus)
    rejects("intensity", "AU06:0", aus, match="stops before AU12")


def test_continuous_parse():
    aus = (6, 12)
    fmt = F.get_format("continuous")
    r = fmt.parse("AU06:0.4 AU12:0.5", aus)
    assert r.present == {6: False, 12: True} and r.intensity == {6: 0.4, 12: 0.5}
    for bad in ["AU06:0.4 AU12:5.1", "AU06:0.4 AU12:6.0", "AU06:0.4 AU12:1", "AU06:0.4 AU12:1.25",
                "AU06:0.4 AU12:-1.0", "AU06:0.4 AU12:1.", "AU06:.4 AU12:1.0", "AU06:0.4"]:
        rejects("continuous", bad, aus)


def test_json_parse():
    aus = (1, 6, 12)
    fmt = F.get_format("json")
    r = fmt.parse('{"active": ["AU06", "AU12"], "intensity": {"AU06": 2, "AU12": 3}}', aus)
    assert r.active == [6, 12] and r.intensity == {1: 0.0, 6: 2.0, 12: 3.0}
    assert fmt.parse('{"intensity": {"AU12": 3, "AU6": 2}, "active": ["AU6","AU12"]}', aus).active == [6, 12]
    assert fmt.parse('{"active": [], "intensity": {}}', aus).active == []
    for bad in [
        '{"active": ["AU06", "AU12"], "intensity": {"AU06": 2, "AU12": 3}',  # truncated
        '{"active": ["AU06"], "intensity": {"AU06": 2}} extra',  # trailing junk
        "{'active': [], 'intensity': {}}",  # not JSON
        '{"active": [], "intensity": {}, "note": "x"}',  # extra key
        '{"active": []}',  # missing key
        '["AU06"]',
        '{"active": "AU06", "intensity": {"AU06": 2}}',
        '{"active": ["AU06"], "intensity": {}}',  # intensity lacks an active AU
        '{"active": [], "intensity": {"AU06": 2}}',  # intensity for an inactive AU
        '{"active": ["AU06"], "intensity": {"AU06": 0}}',
        '{"active": ["AU06"], "intensity": {"AU06": 6}}',
        '{"active": ["AU06"], "intensity": {"AU06": 2.5}}',
        '{"active": ["AU06"], "intensity": {"AU06": "2"}}',
        '{"active": ["AU06"], "intensity": {"AU06": true}}',
        '{"active": ["AU06", "AU06"], "intensity": {"AU06": 2}}',
        '{"active": ["AU06"], "intensity": {"AU06": 2, "AU06": 3}}',  # duplicate key
        '{"active": ["AU12", "AU06"], "intensity": {"AU06": 2, "AU12": 3}}',  # order
        '{"active": ["AU04"], "intensity": {"AU04": 2}}',  # not asked
        '{"active": ["AU03"], "intensity": {"AU03": 2}}',  # not FACS
        '{"active": [6], "intensity": {"AU06": 2}}',
    ]:
        rejects("json", bad, aus)


def test_sentence_parse():
    aus = (1, 6, 12)
    fmt = F.get_format("sentence")
    text = "This face shows AU06 (cheek raiser) at slight intensity, AU12 (lip corner puller) at marked intensity."
    r = fmt.parse(text, aus)
    assert r.active == [6, 12] and r.intensity == {1: 0.0, 6: 2.0, 12: 3.0}
    assert fmt.parse("This face shows no active action units.", aus).active == []
    for bad in [
        text[:-1],  # no full stop
        text + " Also AU01.",
        "This face shows AU06 (cheek raiser) at slight intensity and AU12 (lip corner puller) at marked intensity.",
        "This face shows AU06 (lip corner puller) at slight intensity.",  # wrong name
        "This face shows AU06 (cheek raiser) at huge intensity.",
        "This face shows AU06 (cheek raiser) at absent intensity.",
        "This face shows AU04 (brow lowerer) at slight intensity.",  # not asked
        "This face shows AU03 (x) at slight intensity.",
        "This face shows AU06 (cheek raiser) at slight intensity, AU06 (cheek raiser) at slight intensity.",
        "This face shows AU12 (lip corner puller) at slight intensity, AU06 (cheek raiser) at slight intensity.",
        "This face shows AU06 (cheek raiser) at slight intensity, AU",
        "This face shows no active action units, AU06 (cheek raiser) at slight intensity.",
    ]:
        rejects("sentence", bad, aus)


def test_parse_error_is_value_error():
    e = rejects("list", "AU99")
    assert isinstance(e, ValueError)
    assert "AU99" in str(e)


# ----- instructions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_instruction(name):
    fmt = F.get_format(name)
    for aus in AU_SETS:
        text = fmt.instruction(aus)
        for a in aus:
            assert f"{F.au_code(a)} {facs.AUS[a].name}" in text
        example = text.rsplit("Example: ", 1)[1]
        assert fmt.render(fmt.parse(example, aus)) == example
    assert "AU06:2 AU12:3" in F.get_format("intensity").instruction((6, 12))
    with pytest.raises(ValueError):
        fmt.instruction((1, 3))
