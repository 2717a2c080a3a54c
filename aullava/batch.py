"""Batch analysis of many images into OpenFace-2.x-style rows (CSV) and JSON lines.

One row per face found, or one row with success=0 and a reason for an image that could not be read or has no
face: nothing is silently dropped. The AU columns are the model's own parsed answer: `AUxx_c` presence (0/1)
and `AUxx_r` intensity (0-5) when the format writes intensities (`intensity`, `continuous`, `json`), empty
otherwise.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from . import formats as fmt_lib
from .face import FaceError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def expand_inputs(items) -> list[Path]:
    """Files as given; folders replaced by their image files (sorted, not recursive)."""
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(path)
    return paths


def csv_columns(aus) -> list[str]:
    codes = [fmt_lib.au_code(a) for a in aus]
    return (["file", "frame", "face_id", "timestamp", "confidence", "success", "reason"]
            + [f"{c}_r" for c in codes] + [f"{c}_c" for c in codes] + ["format", "text"])


@dataclass
class BatchSummary:
    images: int = 0
    faces: int = 0
    failed: list = field(default_factory=list)  # (file, reason)

    def __str__(self):
        text = f"{self.images} image(s), {self.faces} face(s) analysed, {len(self.failed)} image(s) without a result"
        return text + "".join(f"\n  {name}: {reason}" for name, reason in self.failed[:20])

    def add(self, path, rows: list[dict]):
        """Count one input's rows (from `rows_for`)."""
        self.images += 1
        self.faces += sum(1 for r in rows if r["face_id"] != "")
        if rows[0]["face_id"] == "":
            self.failed.append((str(path), rows[0]["reason"]))


def rows_for(analyzer, path: Path, frame: int, format_name: str) -> list[dict]:
    """The CSV rows of one image: one per face, or one failure row."""
    base = {"file": str(path), "frame": frame, "timestamp": 0.0, "format": format_name}
    try:
        outcome = analyzer.analyze(path, format_name)
    except FaceError as error:
        return [{**base, "face_id": "", "confidence": 0.0, "success": 0, "reason": str(error)}]
    rows = []
    for face in outcome.faces:
        row = {**base, "face_id": face.face.index, "confidence": round(float(face.face.score), 4),
               "success": 0 if face.error else 1, "reason": face.error or "", "text": face.text}
        if face.result is not None:
            for a in face.result.aus:
                code = fmt_lib.au_code(a)
                row[f"{code}_c"] = int(bool(face.result.present[a]))
                level = face.result.intensity.get(a)
                row[f"{code}_r"] = "" if level is None else round(float(level), 3)
        rows.append(row)
    return rows


def analyze_batch(analyzer, items, format_name: str = "list", csv_path=None, jsonl_path=None,
                  progress: bool = True) -> BatchSummary:
    """Analyse every image of `items` (files and folders), writing rows as they come (a crash keeps what was
    written). Returns a summary; the caller decides the exit code."""
    fmt_lib.get_format(format_name)
    paths = expand_inputs(items)
    summary = BatchSummary()
    columns = csv_columns(analyzer.aus)
    csv_file = open(csv_path, "w", newline="") if csv_path else None
    json_file = open(jsonl_path, "w") if jsonl_path else None
    try:
        writer = csv.DictWriter(csv_file, columns, restval="") if csv_file else None
        if writer:
            writer.writeheader()
        for frame, path in enumerate(tqdm(paths, desc="analyse", unit="img", disable=not progress), start=1):
            rows = rows_for(analyzer, path, frame, format_name)
            summary.images += 1
            summary.faces += sum(1 for r in rows if r["face_id"] != "")
            if rows[0]["face_id"] == "":
                summary.failed.append((str(path), rows[0]["reason"]))
            for row in rows:
                if writer:
                    writer.writerow(row)
                if json_file:
                    json_file.write(json.dumps(row) + "\n")
            for handle in (csv_file, json_file):
                if handle:
                    handle.flush()
    finally:
        for handle in (csv_file, json_file):
            if handle:
                handle.close()
    return summary


class RowWriter:
    """Writes rows to a CSV (the columns of `csv_columns`) and/or JSON lines, flushing after each input."""

    def __init__(self, aus, csv_path=None, jsonl_path=None):
        self.csv_file = open(csv_path, "w", newline="") if csv_path else None
        self.json_file = open(jsonl_path, "w") if jsonl_path else None
        self.writer = csv.DictWriter(self.csv_file, csv_columns(aus), restval="") if self.csv_file else None
        if self.writer:
            self.writer.writeheader()

    def write(self, rows: list[dict]):
        for row in rows:
            if self.writer:
                self.writer.writerow(row)
            if self.json_file:
                self.json_file.write(json.dumps(row) + "\n")
        for handle in (self.csv_file, self.json_file):
            if handle:
                handle.flush()

    def close(self):
        for handle in (self.csv_file, self.json_file):
            if handle:
                handle.close()
