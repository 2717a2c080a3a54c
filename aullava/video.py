"""Video input: frames decoded with PyAV (FFmpeg), sampled at a chosen rate, faces followed across frames.

A frame that cannot be decoded becomes a failure row (success=0 with the reason), never a silent gap; a
face keeps its id from frame to frame while its box overlaps the previous one (IoU), as OpenFace's face_id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .face import FaceError

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ogv"}
DEFAULT_FPS = 5.0


class VideoReadError(FaceError):
    """The file is not a video PyAV can decode (callers show the message, like an unreadable image)."""


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass
class VideoFrame:
    number: int  # 1-based position among the decoded frames (OpenFace's `frame`)
    timestamp: float  # seconds from the start
    rgb: np.ndarray | None  # None when the frame could not be decoded
    error: str | None = None


@dataclass
class VideoInfo:
    duration: float | None
    rate: float | None  # frames per second of the file

    def sampled_frames(self, fps: float | None) -> int | None:
        """How many frames `read_frames` will yield, when the file says (for progress bars)."""
        if not self.duration:
            return None
        per_second = fps if fps and (not self.rate or fps < self.rate) else self.rate
        return max(1, math.ceil(self.duration * per_second)) if per_second else None


def _open(path):
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path.name}: no such file")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)  # FFmpeg's words, without its errno and the path
        raise VideoReadError(f"{path.name}: not a video that can be decoded ({reason})") from error
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path.name}: the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # decoding it would crash FFmpeg (PyAV issue 2344)
        container.close()
        raise VideoReadError(f"{path.name}: the video stream cannot be decoded (truncated or unknown codec)")
    return container, stream


def video_info(path) -> VideoInfo:
    container, stream = _open(path)
    with container:
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if duration is None and container.duration:
            duration = container.duration / 1_000_000
        rate = float(stream.average_rate) if stream.average_rate else None
    return VideoInfo(duration, rate)


def read_frames(path, fps: float | None = DEFAULT_FPS) -> Iterator[VideoFrame]:
    """Decoded RGB frames, one per 1/`fps` seconds of video time (every frame when `fps` is None)."""
    import av

    if fps is not None and fps <= 0:
        raise ValueError(f"the sampling rate must be positive, got {fps}")
    container, stream = _open(path)
    number, next_time = 0, 0.0
    fallback_rate = float(stream.average_rate) if stream.average_rate else 25.0
    with container:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as error:
                time = float(packet.pts * packet.time_base) if packet.pts is not None and packet.time_base else None
                number += 1
                reason = getattr(error, "strerror", None) or str(error)
                yield VideoFrame(number, round(time if time is not None else (number - 1) / fallback_rate, 4), None,
                                 f"frame {number} could not be decoded: {reason}")
                continue
            for frame in frames:
                number += 1
                time = frame.time if frame.time is not None else (number - 1) / fallback_rate
                if fps is not None and time + 1e-6 < next_time:
                    continue
                if fps is not None:
                    next_time = (math.floor(time * fps + 1e-6) + 1) / fps
                yield VideoFrame(number, round(float(time), 4), frame.to_ndarray(format="rgb24"))


def iou(a, b) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class FaceTracker:
    """Gives each face an id that it keeps across frames: greedy matching by box overlap with the faces seen
    in the last `max_gap` seconds; a face that matches none gets a new id."""
    min_iou: float = 0.3
    max_gap: float = 1.0
    _tracks: dict = field(default_factory=dict)  # id -> (box, last time seen)
    _next_id: int = 0

    def assign(self, boxes, timestamp: float) -> list[int]:
        alive = {i: t for i, t in self._tracks.items() if timestamp - t[1] <= self.max_gap}
        pairs = sorted(((iou(box, track[0]), b, i) for b, box in enumerate(boxes) for i, track in alive.items()),
                       reverse=True)
        ids: list[int | None] = [None] * len(boxes)
        taken = set()
        for overlap, b, i in pairs:
            if overlap < self.min_iou:
                break
            if ids[b] is None and i not in taken:
                ids[b], taken = i, taken | {i}
        for b, box in enumerate(boxes):
            if ids[b] is None:
                ids[b], self._next_id = self._next_id, self._next_id + 1
            self._tracks[ids[b]] = (tuple(box), timestamp)
        self._tracks = {i: t for i, t in self._tracks.items() if timestamp - t[1] <= self.max_gap}
        return ids
