"""FACS facts: Action Units, their muscles and face regions, dataset AU sets, EMFACS emotion prototypes.

Every other module reads AU knowledge from here, so a change of wording or of a dataset's AU set happens once.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActionUnit:
    number: int
    name: str
    muscles: str
    region: str  # one of REGIONS


# Face regions, top to bottom: the order used to sort AUs in charts and tables.
REGIONS = ("brows", "eyes", "nose", "cheeks", "mouth", "chin", "jaw", "neck")

_AU_TABLE = [
    (1, "inner brow raiser", "frontalis, pars medialis", "brows"),
    (2, "outer brow raiser", "frontalis, pars lateralis", "brows"),
    (4, "brow lowerer", "corrugator supercilii, depressor supercilii, procerus", "brows"),
    (5, "upper lid raiser", "levator palpebrae superioris", "eyes"),
    (6, "cheek raiser", "orbicularis oculi, pars orbitalis", "cheeks"),
    (7, "lid tightener", "orbicularis oculi, pars palpebralis", "eyes"),
    (9, "nose wrinkler", "levator labii superioris alaeque nasi", "nose"),
    (10, "upper lip raiser", "levator labii superioris", "mouth"),
    (11, "nasolabial deepener", "zygomaticus minor", "cheeks"),
    (12, "lip corner puller", "zygomaticus major", "mouth"),
    (13, "sharp lip puller", "levator anguli oris (caninus)", "mouth"),
    (14, "dimpler", "buccinator", "cheeks"),
    (15, "lip corner depressor", "depressor anguli oris (triangularis)", "mouth"),
    (16, "lower lip depressor", "depressor labii inferioris", "mouth"),
    (17, "chin raiser", "mentalis", "chin"),
    (18, "lip pucker", "incisivii labii superioris and inferioris", "mouth"),
    (20, "lip stretcher", "risorius, platysma", "mouth"),
    (21, "neck tightener", "platysma", "neck"),
    (22, "lip funneler", "orbicularis oris", "mouth"),
    (23, "lip tightener", "orbicularis oris", "mouth"),
    (24, "lip pressor", "orbicularis oris", "mouth"),
    (25, "lips part", "depressor labii inferioris, relaxation of mentalis or orbicularis oris", "mouth"),
    (26, "jaw drop", "masseter relaxed, temporalis and internal pterygoid relaxed", "jaw"),
    (27, "mouth stretch", "pterygoids, digastric", "jaw"),
    (28, "lip suck", "orbicularis oris", "mouth"),
    (43, "eyes closed", "relaxation of levator palpebrae superioris", "eyes"),
    (45, "blink", "relaxation of levator palpebrae superioris, orbicularis oculi", "eyes"),
]

AUS: dict[int, ActionUnit] = {n: ActionUnit(n, name, muscles, region) for n, name, muscles, region in _AU_TABLE}

# FACS intensity letters: A trace, B slight, C marked, D severe, E maximum (0 = absent).
INTENSITY_LETTERS = "ABCDE"
INTENSITY_WORDS = ("absent", "trace", "slight", "marked", "severe", "maximum")
MAX_INTENSITY = len(INTENSITY_LETTERS)  # E
# The level taught (and drafted) for a present AU where no label codes its intensity and no coded example
# gives a mean: C, "marked", the middle of the scale.
UNCODED_INTENSITY = 3

# AU sets coded by the datasets the paper trains on (and CK+, which ships here for development).
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_AUS = (1, 2, 4, 6, 9, 12, 25, 26)
# FEAFA codes 24 units, several of them one side of the face (L/R) or FACS action descriptors (AD);
# FEAFA_AUS holds the FACS AU numbers those units belong to. The per-unit order of the release's label
# files belongs to its reader.
FEAFA_UNITS = (
    "AU1", "AU2L", "AU2R", "AU4", "AU5L", "AU5R", "AU9", "AU10", "AU12L", "AU12R", "AU14L", "AU14R",
    "AU15", "AU17", "AU18", "AU20", "AU24", "AU25", "AU26", "AU27", "AU43L", "AU43R", "AD19", "AD30",
)
FEAFA_AUS = tuple(sorted({int(u[2:].rstrip("LR")) for u in FEAFA_UNITS if u.startswith("AU")}))
# CK+ codes every FACS AU; these are the ones its 593 sequences use at the peak frame (AU numbers up to 28).
CKPLUS_AUS = (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 23, 24, 25, 26, 27, 28)
# The embedded model's AUs: every AU with at least 10 positive peak frames in the shared CK+ data.
MODEL_AUS = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27)
DATASET_AUS = {"bp4d": BP4D_AUS, "disfa": DISFA_AUS, "feafa": FEAFA_AUS, "ckplus": CKPLUS_AUS}

# EMFACS-style prototypes (Ekman, Friesen & Hager 2002 investigator's guide; Matsumoto & Ekman): the AU
# combinations most often seen with each basic emotion. A match is a hint, never a diagnosis.
EMOTION_PROTOTYPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "happiness": ((6, 12),),
    "sadness": ((1, 4, 15), (1, 4, 17), (6, 15)),
    "surprise": ((1, 2, 5, 26), (1, 2, 5, 27), (1, 2, 26), (1, 2, 27)),
    "fear": ((1, 2, 4, 5, 20, 26), (1, 2, 4, 5, 20, 25), (1, 2, 4, 5, 7, 20, 26)),
    "anger": ((4, 5, 7, 23), (4, 5, 7, 24), (4, 7, 23), (4, 7, 24), (4, 5, 23), (4, 5, 24)),
    "disgust": ((9, 15, 16), (9, 17), (10, 15, 16), (10, 17), (9,), (10,)),
    "contempt": ((12, 14),),
}
# The Duchenne marker of a felt (genuine) smile: cheek raiser with lip corner puller.
GENUINE_SMILE = (6, 12)


def au_code(number: int) -> str:
    """'AU01' for 1: the zero-padded code the model writes, and every output and the page show."""
    return f"AU{number:02d}"


def au_label(number: int) -> str:
    """'AU06 cheek raiser' (or 'AU99' for a code this table does not know)."""
    au = AUS.get(number)
    return f"{au_code(number)} {au.name}" if au else au_code(number)


def sort_by_region(numbers) -> list[int]:
    """AU numbers ordered top of the face to bottom, then by number."""
    def key(n):
        au = AUS.get(n)
        return (REGIONS.index(au.region) if au else len(REGIONS), n)
    return sorted(numbers, key=key)


@dataclass(frozen=True)
class EmotionHint:
    emotion: str
    supporting_aus: tuple[int, ...]
    coverage: float  # share of the best-matching prototype's AUs that are present


def emotion_hints(active, min_coverage: float = 0.6) -> list[EmotionHint]:
    """Emotions whose EMFACS prototype the active AUs cover, best first."""
    active = set(active)
    hints = []
    for emotion, prototypes in EMOTION_PROTOTYPES.items():
        best = max(prototypes, key=lambda p: (len(active & set(p)) / len(p), len(p)))
        coverage = len(active & set(best)) / len(best)
        if coverage >= min_coverage:
            hints.append(EmotionHint(emotion, tuple(sorted(active & set(best))), coverage))
    return sorted(hints, key=lambda h: (-h.coverage, -len(h.supporting_aus), h.emotion))
