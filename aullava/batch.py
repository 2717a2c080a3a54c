"""Batch analysis of many images into OpenFace-2.x-style rows (CSV) and JSON lines.

One row per face found, or one row with success=0 and a reason for an image that could not be read or has no
face: nothing is silently dropped. The AU columns are the model's own parsed answer: `AUxx_c` presence (0/1)
and `AUxx_r` intensity (0-5) when the format writes intensities (`intensity`, `continuous`, `json`), empty
otherwise.
"""
from __future__ import annotations

import csv
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from . import formats as fmt_lib
from .face import FaceError
from .video import DEFAULT_FPS, VIDEO_SUFFIXES, FaceTracker, is_video, read_frames, video_info

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def expand_inputs(items, skipped: list | None = None) -> list[Path]:
    """Files as given; folders replaced by their image and video files (sorted, not recursive). What a folder
    holds besides (other files, subfolders) is appended to `skipped`, so that callers can say so."""
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            for entry in sorted(path.iterdir()):
                if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    paths.append(entry)
                elif skipped is not None:
                    skipped.append(entry)
        else:
            paths.append(path)
    return paths


BOX_COLUMNS = ("face_x", "face_y", "face_width", "face_height")  # the face's box in pixels (py-feat's FaceRect)
# dlib's 68 landmarks in image pixels, named as OpenFace names its 2D landmark columns
LANDMARK_COLUMNS = tuple(f"x_{i}" for i in range(68)) + tuple(f"y_{i}" for i in range(68))


def csv_columns(aus) -> list[str]:
    codes = [fmt_lib.au_code(a) for a in aus]
    return (["file", "frame", "face_id", "timestamp", "confidence", "success", "reason"] + list(BOX_COLUMNS)
            + [f"{c}_r" for c in codes] + [f"{c}_c" for c in codes] + ["format", "text"] + list(LANDMARK_COLUMNS))


@dataclass
class BatchSummary:
    images: int = 0
    videos: int = 0
    video_frames: int = 0
    faces: int = 0
    # (where, reason, file): images and video frames without a result; where = the file, or "file frame N"
    failed: list = field(default_factory=list)
    unreadable: list = field(default_factory=list)  # (where, reason, file): faces whose answer could not be read
    video_rows: dict = field(default_factory=dict)  # video file -> its rows, for time-series plots

    def __str__(self):
        media = f"{self.images} image(s)" + (f", {self.video_frames} frame(s) of {self.videos} video(s)"
                                             if self.videos else "")
        unreadable = f" ({len(self.unreadable)} answer(s) unreadable)" if self.unreadable else ""
        text = f"{media}, {self.faces} face(s) analysed{unreadable}, {len(self.failed)} without a result"
        return text + "".join(f"\n  {failure_line(place, reason, path)}"
                              for place, reason, path in (self.failed + self.unreadable)[:20])

    @property
    def ok(self) -> bool:
        """Every input gave a result and every face's answer was read (the exit code's question)."""
        return not (self.failed or self.unreadable)

    def begin(self, path):
        """Counts one input (an image or a video) about to be analysed."""
        if is_video(path):
            self.videos += 1
        else:
            self.images += 1

    def record(self, path, rows: list[dict]):
        """Counts the rows of one image, or of one sampled frame of a video."""
        if is_video(path):
            self.video_rows.setdefault(str(path), []).extend(rows)
            self.video_frames += rows[0]["frame"] != ""
        self.faces += sum(1 for r in rows if r["face_id"] != "")
        if rows[0]["face_id"] == "":
            self.failed.append((failure_place(path, rows[0]), rows[0]["reason"], str(path)))
        self.unreadable += [(f"{failure_place(path, r)} face_id {r['face_id']}", r["reason"], str(path))
                            for r in rows if r["face_id"] != "" and not r["success"]]


def failure_place(path, row: dict) -> str:
    """The file, and the video frame where the row has one (a video that cannot be opened has none)."""
    return f"{path} frame {row['frame']}" if is_video(path) and row["frame"] != "" else str(path)


def failure_line(place: str, reason: str, path=None) -> str:
    """`place: reason`, the file named once: reasons about a whole file begin with its name ("x.jpg is not an
    image", "clip.mp4: not a video ..."), which the place (`path`, or where in it) then stands in for."""
    path = str(path if path is not None else place)
    for name in (path, Path(path).name):
        if reason.startswith(name):
            return place + reason[len(name):]
    return f"{place}: {reason}"


def failure_row(base: dict, reason: str) -> dict:
    return {**base, "face_id": "", "confidence": 0.0, "success": 0, "reason": reason}


def _face_rows(outcome, base: dict, face_ids=None) -> list[dict]:
    rows = []
    for position, face in enumerate(outcome.faces):
        face_id = face.face.index if face_ids is None else face_ids[position]
        x0, y0, x1, y1 = (round(float(v), 1) for v in face.face.box)
        row = {**base, "face_id": face_id, "confidence": round(float(face.face.score), 4),
               "success": 0 if face.error else 1, "reason": face.error or "", "text": face.text,
               **dict(zip(BOX_COLUMNS, (x0, y0, round(x1 - x0, 1), round(y1 - y0, 1)))),
               **dict(zip(LANDMARK_COLUMNS, np.round(face.face.landmarks.T.reshape(-1).astype(float), 1).tolist()))}
        if face.result is not None:
            for a in face.result.aus:
                code = fmt_lib.au_code(a)
                row[f"{code}_c"] = int(bool(face.result.present[a]))
                level = face.result.intensity.get(a)
                row[f"{code}_r"] = "" if level is None else round(float(level), 3)
        rows.append(row)
    return rows


def rows_for(analyzer, path: Path, frame: int, format_name: str, name: str | None = None) -> list[dict]:
    """The CSV rows of one image: one per face, or one failure row."""
    base = {"file": name or str(path), "frame": frame, "timestamp": 0.0, "format": format_name}
    try:
        outcome = analyzer.analyze(path, format_name)
    except FaceError as error:
        return [failure_row(base, str(error))]
    return _face_rows(outcome, base)


def video_rows(analyzer, path: Path, format_name: str, fps: float | None = DEFAULT_FPS,
               progress: bool = True, name: str | None = None, max_frames: int | None = None) -> Iterator[list[dict]]:
    """The rows of each sampled frame of a video (faces keep their id across frames), in time order, up to
    `max_frames` sampled frames; a video that cannot be opened is one failure row, a frame that cannot be
    decoded or has no face is one each."""
    base = {"file": name or str(path), "format": format_name}  # name: what the rows call the file, if not its path
    try:
        total = video_info(path).sampled_frames(fps)
        if max_frames:
            total = min(total, max_frames) if total else max_frames
        frames = itertools.islice(read_frames(path, fps), max_frames)
        tracker = FaceTracker()
        for frame in tqdm(frames, desc=Path(path).name, unit="frame", total=total, disable=not progress,
                          leave=False):
            frame_base = {**base, "frame": frame.number, "timestamp": frame.timestamp}
            if frame.rgb is None:
                yield [failure_row(frame_base, frame.error)]
                continue
            try:
                outcome = analyzer.analyze(frame.rgb, format_name)
            except FaceError as error:
                yield [failure_row(frame_base, str(error))]
                continue
            ids = tracker.assign([f.face.box for f in outcome.faces], frame.timestamp)
            yield _face_rows(outcome, frame_base, ids)
    except FaceError as error:  # the file itself (VideoReadError): not a video, no stream, truncated
        yield [failure_row({**base, "frame": "", "timestamp": ""}, str(error))]


STDOUT = "-"  # as an output path: standard output, so rows can be piped (`--csv - | ...`)


def _open_output(path, **options):
    if not path:
        return None
    return sys.stdout if str(path) == STDOUT else open(path, "w", **options)


class RowWriter:
    """Writes rows to a CSV (the columns of `csv_columns`) and/or JSON lines, flushing after each group."""

    def __init__(self, aus, csv_path=None, jsonl_path=None):
        self.csv_file = _open_output(csv_path, newline="")
        self.json_file = _open_output(jsonl_path)
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
            if handle and handle is not sys.stdout:
                handle.close()


def analyze_batch(analyzer, items, format_name: str = "list", csv_path=None, jsonl_path=None,
                  progress: bool = True, fps: float | None = DEFAULT_FPS, names: dict | None = None,
                  max_video_frames: int | None = None) -> BatchSummary:
    """Analyse every image and video of `items` (files and folders; videos sampled at `fps` frames per
    second, at most `max_video_frames` of each), writing rows as they come (a crash keeps what was written).
    `names`: what the rows call an input's file, by its path (default: the path). Returns a summary; the
    caller decides the exit code."""
    fmt_lib.get_format(format_name)
    names = names or {}
    paths = expand_inputs(items)
    summary = BatchSummary()
    writer = RowWriter(analyzer.aus, csv_path, jsonl_path)
    try:
        for frame, path in enumerate(tqdm(paths, desc="analyse", unit="file", disable=not progress), start=1):
            summary.begin(path)
            name = names.get(str(path))
            groups = (video_rows(analyzer, path, format_name, fps, progress, name, max_video_frames) if is_video(path)
                      else [rows_for(analyzer, path, frame, format_name, name)])
            for rows in groups:
                summary.record(path, rows)
                writer.write(rows)
    finally:
        writer.close()
    return summary
