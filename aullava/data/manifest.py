"""The manifest schema every dataset is turned into: one row per image with its FACS labels.

Columns (ckplus48's): path, subject, sequence, frame, kind, emotion, aus, intensities, and optionally
unknown. `aus` is the ';'-separated set of present AUs; `intensities` 'AU:level' pairs (0 = present but
intensity not coded); `unknown` the ';'-separated AUs whose label is unknown for that image (left out of the
loss and of every metric; every other AU the dataset codes is known absent when not in `aus`); `coded` the
';'-separated AUs the row's dataset codes at all (empty: every AU). With several datasets in one training,
`coded` is what lets each image be asked only about the AUs its dataset codes.
"""
from __future__ import annotations

import csv
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import facs
from ..facs import MAX_INTENSITY, UNCODED_INTENSITY

REQUIRED_COLUMNS = ("path", "subject", "aus")
COLUMNS = ("path", "subject", "sequence", "frame", "kind", "emotion", "aus", "intensities", "unknown", "coded")


class ManifestError(ValueError):
    pass


@dataclass
class Sample:
    path: Path
    subject: str
    sequence: str = ""
    frame: str = ""
    kind: str = ""
    emotion: str = ""
    aus: frozenset = frozenset()
    intensities: dict = field(default_factory=dict)  # AU -> 1..5 where coded
    unknown: frozenset = frozenset()  # AUs whose label is unknown for this image
    coded: frozenset | None = None  # the AUs this image's dataset codes; None: every AU

    @property
    def key(self) -> str:
        return str(self.path)

    def is_known(self, au: int) -> bool:
        """Whether this image has a label (present or absent) for `au`."""
        return au not in self.unknown and (self.coded is None or au in self.coded)

    def asked(self, aus) -> tuple:
        """The AUs of `aus` this image is asked (and taught) about: those it has a label for, as the paper does
        for mixed datasets."""
        return tuple(a for a in aus if self.is_known(a))


def _parse_aus(text: str, row: str) -> frozenset:
    try:
        return frozenset(int(float(a)) for a in text.replace(",", ";").split(";") if a.strip())
    except ValueError:
        raise ManifestError(f"{row}: cannot read AUs {text!r} (expected e.g. '1;2;25')") from None


def _parse_intensities(text: str, row: str) -> dict:
    levels = {}
    for pair in filter(None, (p.strip() for p in (text or "").split(";"))):
        try:
            au, level = pair.split(":")
            au, level = int(float(au)), int(level)
        except ValueError:
            raise ManifestError(f"{row}: cannot read intensity {pair!r} (expected 'AU:level')") from None
        if not 0 <= level <= MAX_INTENSITY:
            raise ManifestError(f"{row}: intensity {pair!r} is outside 0-{MAX_INTENSITY} (FACS levels A-E are 1-5, "
                                "0 = present, level not coded)")
        if level > 0:
            levels[au] = level
    return levels


def label_warnings(samples, aus, training: bool = True) -> list[str]:
    """What a manifest's labels hold that a model of AUs `aus` will not learn from or score: AUs outside its
    set, images listed more than once and, for training, AUs of its set without one positive face."""
    warnings = []
    outside = Counter(a for s in samples for a in s.aus if a not in aus)
    if outside:
        counted = ", ".join(f"{facs.au_code(a)} ({n} row{'s' if n > 1 else ''})" for a, n in sorted(outside.items()))
        warnings.append(f"{counted} labelled in the manifest but not among the model's {len(aus)} AUs: ignored "
                        "(the \"aus\" of a training config's model sets what a model learns)")
    listed = Counter(s.key for s in samples)
    repeated = [path for path, n in listed.items() if n > 1]
    if repeated:
        warnings.append(f"{len(repeated)} image(s) are listed more than once (e.g. {repeated[0]}): each row counts "
                        "as one more image")
    if training:
        unseen = [a for a in aus if not any(a in s.aus and s.is_known(a) for s in samples)]
        if unseen:
            warnings.append(f"no training face shows {', '.join(map(facs.au_code, unseen))}: the model cannot learn "
                            f"to see {'it' if len(unseen) == 1 else 'them'}")
    return warnings


def read_manifest(path, images_root=None, kinds=None) -> list[Sample]:
    """Rows of a manifest CSV; image paths resolved against images_root (default: the CSV's folder)."""
    path = Path(path)
    if path.is_dir():
        raise ManifestError(f"manifest {path} is a folder: give the CSV file (`python -m aullava manifest` writes "
                            "one for a dataset folder)")
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    root = Path(images_root) if images_root else path.parent
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a CSV saved by Excel starts with a BOM
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"manifest {path} lacks column(s) {', '.join(missing)}; "
                                f"expected at least {', '.join(REQUIRED_COLUMNS)}")
        samples, other_kinds = [], set()
        for number, row in enumerate(reader, start=2):
            kind = (row.get("kind") or "").strip()
            if kinds and kind not in kinds:
                other_kinds.add(kind or "(empty)")
                continue
            where = f"manifest {path.name}, row {number}"
            aus = _parse_aus(row.get("aus") or "", where)
            levels = _parse_intensities(row.get("intensities", ""), where)
            if not levels.keys() <= aus:
                raise ManifestError(f"{where}: an intensity is given for {', '.join(map(facs.au_code, sorted(levels.keys() - aus)))}, "
                                    f"which the row's aus ({row.get('aus') or 'none'}) do not list as present")
            unknown = _parse_aus(row.get("unknown") or "", where) - aus
            coded = _parse_aus(row.get("coded") or "", where) or None
            if coded is not None and not aus <= coded:
                raise ManifestError(f"{where}: present AUs {sorted(aus - coded)} are not among the coded AUs "
                                    f"{sorted(coded)}")
            samples.append(Sample(root / row["path"], row["subject"].strip(), (row.get("sequence") or "").strip(),
                                  (row.get("frame") or "").strip(), kind, (row.get("emotion") or "").strip(),
                                  aus, levels, unknown, coded))
    if not samples:
        raise ManifestError(f"manifest {path} has no usable rows" + (f" of kind {', '.join(kinds)}" if kinds else "")
                            + (f" (its rows are of kind {', '.join(sorted(other_kinds))}: choose with --kinds)"
                               if other_kinds else ""))
    return samples


def read_manifests(paths, images_root=None, kinds=None) -> list[Sample]:
    """One manifest, or several (e.g. one per dataset) read one after the other."""
    if isinstance(paths, (str, Path)):
        return read_manifest(paths, images_root, kinds)
    return [sample for path in paths for sample in read_manifest(path, images_root, kinds)]


def write_manifest(samples, path, images_root=None) -> Path:
    """Write samples as a manifest CSV; image paths relative to images_root (default: the CSV's folder) when
    they lie below it, absolute otherwise."""
    path = Path(path)
    root = Path(images_root or path.parent).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for s in samples:
            image = Path(s.path).resolve()
            relative = image.relative_to(root) if image.is_relative_to(root) else image
            writer.writerow({"path": relative.as_posix(), "subject": s.subject, "sequence": s.sequence,
                             "frame": s.frame, "kind": s.kind, "emotion": s.emotion,
                             "aus": ";".join(str(a) for a in sorted(s.aus)),
                             "intensities": ";".join(f"{a}:{s.intensities.get(a, 0)}" for a in sorted(s.aus)),
                             "unknown": ";".join(str(a) for a in sorted(s.unknown)),
                             "coded": ";".join(str(a) for a in sorted(s.coded or ()))})
    return path


def presence_labels(samples, aus) -> tuple[np.ndarray, np.ndarray]:
    """[N,K] bool arrays: whether each sample is labelled with each AU present, and whether that AU is labelled
    for it at all (see `Sample.is_known`)."""
    present = np.array([[a in s.aus for a in aus] for s in samples], dtype=bool).reshape(-1, len(aus))
    known = np.array([[s.is_known(a) for a in aus] for s in samples], dtype=bool).reshape(-1, len(aus))
    return present, known


def subject_folds(samples, folds: int, seed: int = 0) -> list[set[str]]:
    """Subjects dealt into `folds` disjoint groups (subject-exclusive cross-validation)."""
    subjects = sorted({s.subject for s in samples})
    if len(subjects) < folds:
        raise ManifestError(f"{len(subjects)} subjects cannot make {folds} subject-exclusive folds")
    random.Random(seed).shuffle(subjects)
    return [set(subjects[i::folds]) for i in range(folds)]


def split_by_subject(samples, held_out: set[str]):
    train = [s for s in samples if s.subject not in held_out]
    test = [s for s in samples if s.subject in held_out]
    return train, test


def default_intensities(samples, aus, fallback: int = UNCODED_INTENSITY) -> dict[int, int]:
    """Per AU, the rounded mean of its coded intensities: the level taught where a present AU is uncoded."""
    levels = {}
    for au in aus:
        coded = [s.intensities[au] for s in samples if au in s.intensities]
        # Python's round (a tie to the even level): every shipped run was taught so, and ties occur (AU9 over
        # all of ckplus48 averages x.5); rounding them up would change what a retrain teaches
        levels[au] = round(sum(coded) / len(coded)) if coded else fallback
    return levels
