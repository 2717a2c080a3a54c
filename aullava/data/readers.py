"""Readers that turn each AU dataset's own release layout into manifest samples (aullava.data.manifest).

The datasets are licensed and never shipped; these read a local copy. Each reader returns (samples, problems):
`problems` names every label row that could not become a sample (a frame image that is missing, an unreadable
value), so nothing is dropped silently. Labels a release marks unknown go to `Sample.unknown`.

- BP4D: `AUCoding/AU_OCC/<subject>_<task>.csv` (first column the frame, a header of AU numbers, 0 absent /
  1 present / 9 unknown), intensities `AU_INT/AU06/<subject>_<task>_AU06.csv` ("frame,intensity", 0-5,
  9 unknown), frames `2DFaces/<subject>/<task>/<frame>.jpg`.
- DISFA: `ActionUnit_Labels/SN001/SN001_au1.txt` ("frame,intensity" 0-5 per line, one file per AU); frames
  extracted from the left-camera videos into `<frames>/<subject>/<frame>.jpg`. An AU counts as present from
  intensity 2 (the usual DISFA occurrence threshold; `present_from`).
- FEAFA: each frame image with a label file of the same name beside it (`.auw` or `.txt`): the 24 unit values
  in [0, 1] in FEAFA's order (facs.FEAFA_UNITS). Left/right units join into their AU (the larger value);
  intensity = round(5 * value), present from intensity 1; the action descriptors AD19/AD30 are not AUs.
  The unit order in facs.FEAFA_UNITS was written from the FEAFA paper, not checked against a release file:
  check it against your copy's documentation before training on FEAFA.
- CK+: `FACS/Sxxx/yyy/Sxxx_yyy_<frame>_facs.txt` ("AU intensity" per line, intensity 0 = unspecified) with
  `cohn-kanade-images/Sxxx/yyy/Sxxx_yyy_<frame>.png`; the coded frame is the peak, the sequence's first frame
  the neutral (no AU), and `near_peak` frames before the peak carry the peak's AUs without intensities.
  `Emotion/Sxxx/yyy/*_emotion.txt` (0-7) names the emotion where present.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from .. import facs
from ..facs import MAX_INTENSITY
from .manifest import Sample

FRAME_SUFFIXES = (".jpg", ".png", ".jpeg", ".bmp")
CKPLUS_EMOTIONS = ("neutral", "anger", "contempt", "disgust", "fear", "happiness", "sadness", "surprise")


def find_frame(folder: Path, frame: int) -> Path | None:
    """The image of a frame number in a folder, whatever its zero padding (none, 3-8 digits)."""
    for width in (0, 3, 4, 5, 6, 7, 8):
        for suffix in FRAME_SUFFIXES:
            candidate = folder / f"{frame:0{width}d}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _number(text: str, where: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{where}: {text.strip()!r} is not a number") from None


def _frame_rows(path: Path) -> list[tuple[int, float]]:
    """"frame,value" lines (an optional header line is skipped)."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
        if not parts:
            continue
        if number == 1 and not re.fullmatch(r"-?\d+(\.\d+)?", parts[0]):
            continue  # header
        rows.append((int(_number(parts[0], f"{path}:{number}")), _number(parts[1], f"{path}:{number}")))
    return rows


# ----- BP4D -----------------------------------------------------------------------------------------------
def read_bp4d(root) -> tuple[list[Sample], list[str]]:
    root = Path(root)
    occurrence_dir = root / "AUCoding" / "AU_OCC"
    if not occurrence_dir.is_dir():
        raise FileNotFoundError(f"{occurrence_dir} not found: not a BP4D release folder")
    samples, problems = [], []
    for table in sorted(occurrence_dir.glob("*.csv")):
        subject, _, task = table.stem.partition("_")
        intensities = _bp4d_intensities(root, subject, task)
        with table.open(newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            # the release's header names the AUs by number ("1", "2", ...); "AU01" style is read too
            aus = [int(_number(re.sub(r"(?i)^\s*au", "", h), f"{table}:1 (header)")) for h in header[1:]]
            for number, row in enumerate(reader, start=2):
                if not row or not row[0].strip():
                    continue
                where = f"{table}:{number}"
                frame = int(_number(row[0], where))
                image = find_frame(root / "2DFaces" / subject / task, frame)
                if image is None:
                    problems.append(f"{table.name} frame {frame}: no image in 2DFaces/{subject}/{task}")
                    continue
                present, unknown = set(), set()
                for au, value in zip(aus, row[1:]):
                    number_read = _number(value, where) if value.strip() else 9  # an empty cell: not coded
                    code = 9 if number_read != number_read else int(number_read)  # NaN: not coded either
                    if code == 1:
                        present.add(au)
                    elif code != 0:
                        unknown.add(au)
                levels = {}
                for au, by_frame in intensities.items():
                    level = by_frame.get(frame)
                    if au in present and level is not None and 1 <= level <= MAX_INTENSITY:
                        levels[au] = int(level)
                samples.append(Sample(image, subject, task, str(frame), "frame", "", frozenset(present), levels,
                                      frozenset(unknown), frozenset(aus)))
    return samples, problems


def _bp4d_intensities(root: Path, subject: str, task: str) -> dict[int, dict[int, float]]:
    levels = {}
    for path in sorted((root / "AU_INT").glob(f"AU*/{subject}_{task}_AU*.csv")):
        au = int(re.search(r"_AU(\d+)$", path.stem).group(1))
        levels[au] = dict(_frame_rows(path))
    return levels


# ----- DISFA ----------------------------------------------------------------------------------------------
def read_disfa(root, frames=None, present_from: int = 2) -> tuple[list[Sample], list[str]]:
    root = Path(root)
    labels_dir = root / "ActionUnit_Labels"
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"{labels_dir} not found: not a DISFA release folder")
    frames = Path(frames) if frames else root / "Frames"
    samples, problems = [], []
    for subject_dir in sorted(p for p in labels_dir.iterdir() if p.is_dir()):
        subject = subject_dir.name
        per_au: dict[int, dict[int, float]] = {}
        for path in sorted(subject_dir.glob(f"{subject}_au*.txt")):
            per_au[int(re.search(r"_au(\d+)$", path.stem).group(1))] = dict(_frame_rows(path))
        for frame in sorted(set().union(*per_au.values()) if per_au else ()):
            image = find_frame(frames / subject, frame)
            if image is None:
                problems.append(f"{subject} frame {frame}: no image in {frames / subject}")
                continue
            levels = {au: by_frame.get(frame) for au, by_frame in per_au.items()}
            present = {au for au, level in levels.items() if level is not None and level >= present_from}
            unknown = {au for au, level in levels.items() if level is None or not 0 <= level <= MAX_INTENSITY}
            samples.append(Sample(image, subject, "", str(frame), "frame", "", frozenset(present),
                                  {au: int(levels[au]) for au in present}, frozenset(unknown), frozenset(per_au)))
    return samples, problems


# ----- FEAFA ----------------------------------------------------------------------------------------------
def read_feafa(root) -> tuple[list[Sample], list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found")
    samples, problems = [], []
    labels = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".auw", ".txt") and p.is_file())
    for label in labels:
        image = next((label.with_suffix(s) for s in FRAME_SUFFIXES if label.with_suffix(s).is_file()), None)
        if image is None:
            problems.append(f"{label.relative_to(root)}: no image of the same name beside it")
            continue
        values = [v for v in re.split(r"[,\s]+", label.read_text().strip()) if v]
        if len(values) != len(facs.FEAFA_UNITS):
            problems.append(f"{label.relative_to(root)}: {len(values)} values, expected {len(facs.FEAFA_UNITS)}")
            continue
        levels: dict[int, int] = {}
        for unit, value in zip(facs.FEAFA_UNITS, values):
            if not unit.startswith("AU"):
                continue
            au = int(unit[2:].rstrip("LR"))
            level = min(MAX_INTENSITY, max(0, round(MAX_INTENSITY * _number(value, str(label)))))
            levels[au] = max(levels.get(au, 0), level)
        present = {au for au, level in levels.items() if level >= 1}
        parts = label.relative_to(root).parts
        subject = parts[0] if len(parts) > 1 else ""
        sequence = "/".join(parts[1:-1])
        samples.append(Sample(image, subject, sequence, label.stem, "frame", "", frozenset(present),
                              {au: levels[au] for au in present}, coded=frozenset(facs.FEAFA_AUS)))
    return samples, problems


# ----- CK+ ------------------------------------------------------------------------------------------------
def read_ckplus(root, near_peak: int = 0) -> tuple[list[Sample], list[str]]:
    root = Path(root)
    facs_dir = root / "FACS"
    if not facs_dir.is_dir():
        raise FileNotFoundError(f"{facs_dir} not found: not a CK+ release folder")
    samples, problems = [], []
    for coding in sorted(facs_dir.glob("*/*/*_facs.txt")):
        subject, sequence = coding.parent.parent.name, coding.parent.name
        peak_frame = int(coding.stem.split("_")[2])
        present, levels = set(), {}
        for line in coding.read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            au = int(_number(parts[0], str(coding)))
            level = int(_number(parts[1], str(coding))) if len(parts) > 1 else 0
            present.add(au)
            if 1 <= level <= MAX_INTENSITY:
                levels[au] = level
        emotion = ""
        for path in (root / "Emotion" / subject / sequence).glob("*_emotion.txt"):
            code = int(_number(path.read_text(), str(path)))
            emotion = CKPLUS_EMOTIONS[code] if 0 <= code < len(CKPLUS_EMOTIONS) else ""
        images = root / "cohn-kanade-images" / subject / sequence
        frames = {int(p.stem.split("_")[-1]): p for p in images.glob(f"{subject}_{sequence}_*.png")}
        if peak_frame not in frames:
            problems.append(f"{coding.name}: peak frame {peak_frame} has no image in {images}")
            continue
        first = min(frames)
        samples.append(Sample(frames[first], subject, sequence, str(first), "neutral", "neutral"))
        for frame in range(max(first + 1, peak_frame - near_peak), peak_frame):
            if frame in frames:
                samples.append(Sample(frames[frame], subject, sequence, str(frame), "near_peak", emotion,
                                      frozenset(present)))
        samples.append(Sample(frames[peak_frame], subject, sequence, str(peak_frame), "peak", emotion,
                              frozenset(present), levels))
    return samples, problems


READERS = {"bp4d": read_bp4d, "disfa": read_disfa, "feafa": read_feafa, "ckplus": read_ckplus}
