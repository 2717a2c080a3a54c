"""Detect and landmark every manifest image once, then re-align them cheaply (with jitter) at every step."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..encoders import face_tensors, flip_face
from ..face import FaceDetector, FaceError, align_face, load_image, to_gray
from ..llm import cache_root


@dataclass
class FaceTable:
    """Grayscale images and their 68 landmarks, aligned with the samples that had a face."""
    samples: list
    images: list  # HxW uint8 grayscale
    landmarks: np.ndarray  # [N,68,2] in image coordinates
    fallback: np.ndarray  # [N] True where the landmarks come from the whole-crop fallback, not a detection

    def __len__(self):
        return len(self.samples)


def prepare_faces(samples, crop_fallback: bool = True, progress: bool = True, use_cache: bool = True) -> FaceTable:
    """Landmarks of the largest face in every image (cached on disk by file path and size + mtime)."""
    detector = FaceDetector(crop_fallback=crop_fallback)
    store = cache_root() / "landmarks"  # beside the base LLM's cache
    store.mkdir(parents=True, exist_ok=True)
    kept, images, landmarks, fallback = [], [], [], []
    for sample in tqdm(samples, desc="faces", disable=not progress, unit="img"):
        try:
            rgb = load_image(sample.path)
        except FaceError as error:
            print(f"skipped {sample.path}: {error}")
            continue
        stat = Path(sample.path).stat()
        tag = hashlib.sha1(f"{Path(sample.path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{crop_fallback}".encode())
        cached = store / f"{tag.hexdigest()}.npy"
        points = _read_cached(cached) if use_cache else None
        if points is None:
            try:
                face = detector.detect(rgb)[0]
            except FaceError:
                points = np.full((69, 2), np.nan, dtype=np.float32)
            else:
                points = np.vstack([face.landmarks, [[float(getattr(face, "fallback", False)), 0.0]]]).astype(np.float32)
            _write_cached(cached, points)
        if np.isnan(points).any():
            continue
        kept.append(sample)
        images.append(to_gray(rgb))
        landmarks.append(points[:68])
        fallback.append(bool(points[68, 0]))
    return FaceTable(kept, images, np.asarray(landmarks, dtype=np.float32).reshape(-1, 68, 2), np.asarray(fallback))


def _read_cached(path: Path) -> np.ndarray | None:
    """The cached landmarks, or None where there are none or the file is unreadable (then they are recomputed)."""
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError):
        return None


def _write_cached(path: Path, points: np.ndarray):
    # Written whole under another name, then renamed: processes preparing the same images side by side (two
    # training runs) never read a half-written file.
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
    np.save(partial, points)
    os.replace(partial, path)


def face_batch(table: FaceTable, indices, chip_size: int, rng: np.random.Generator | None = None):
    """Aligned chips + landmarks as encoder tensors; with `rng`, random jitter, flips and photometric noise."""
    chips, points = [], []
    for i in indices:
        jitter = None
        if rng is not None:
            jitter = (rng.normal(0, 0.03), rng.normal(0, 0.03), float(np.exp(rng.normal(0, 0.05))), rng.normal(0, 5))
        chip, chip_landmarks = align_face(table.images[i], table.landmarks[i], size=chip_size, jitter=jitter)
        if rng is not None:
            if rng.random() < 0.5:
                chip, chip_landmarks = flip_face(chip, chip_landmarks)
            gamma = float(np.exp(rng.normal(0, 0.25)))
            chip = 255.0 * (chip / 255.0) ** gamma + rng.normal(0, 3.0, chip.shape)
            chip = np.clip(chip, 0, 255).astype(np.uint8)
            chip_landmarks = chip_landmarks + rng.normal(0, 0.3, chip_landmarks.shape).astype(np.float32)
        pixels, lm = face_tensors(chip, chip_landmarks)
        chips.append(pixels)
        points.append(lm)
    return torch.stack(chips), torch.stack(points)
