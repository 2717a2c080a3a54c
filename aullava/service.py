"""The cached analyser that the app and the CLI share: image -> faces -> the model's text -> parsed AUs."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import formats as fmt_lib
from .encoders import face_tensors
from .face import Face, FaceDetector, load_image

PACKAGE_ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = PACKAGE_ROOT.parent / "assets" / "aullava-ckplus"


def default_checkpoint() -> str:
    """$AULLAVA_CHECKPOINT (a folder or hub repo id), else the checkpoint embedded in the repo."""
    return os.environ.get("AULLAVA_CHECKPOINT") or str(DEFAULT_CHECKPOINT)


@dataclass
class FaceResult:
    face: Face
    format: str
    text: str
    result: fmt_lib.AUResult | None
    error: str | None = None  # the parse failure, reported, never read as "no AUs"
    choice_probabilities: list = field(default_factory=list)  # of each choice the LLM made, in writing order

    def to_dict(self) -> dict:
        return {"face": self.face.number, "box": [round(float(v), 1) for v in self.face.box],
                "detection_score": round(float(self.face.score), 4),  # the rows' `confidence`
                "landmarks": np.round(self.face.landmarks.astype(float), 1).tolist(),  # dlib's 68, image pixels
                "format": self.format, "text": self.text,
                "parse_error": self.error, "aus": self.result.to_dict() if self.result else None,
                "choice_probabilities": self.choice_probabilities}


@dataclass
class ImageResult:
    faces: list
    seconds: dict  # per stage


class Analyzer:
    """Loads the model once; thread-safe; `analyze(image, format)` for every face in the image."""

    def __init__(self, checkpoint: str | None = None, detector: str = "hog", merge: bool = False, model=None,
                 dtype=None, base_llm: str | None = None, speculate: bool = True, own_thread: bool = True):
        """`own_thread`: load and run the model on the process's torch thread (llm.submit_to_torch_thread), as a
        server must; False where this thread already runs torch work (e.g. evaluation after training)."""
        from .llm import run_on_torch_thread, set_threads
        from .model import from_pretrained

        started = time.perf_counter()
        set_threads()
        self.checkpoint = checkpoint or default_checkpoint()

        def load():
            loaded = model if model is not None else from_pretrained(self.checkpoint, merge=merge, dtype=dtype,
                                                                      base_llm=base_llm)
            loaded.merge_lora()  # faster answers; chat still gets the base LLM through adapter_disabled()
            return loaded

        self.model = run_on_torch_thread(load) if own_thread else load()
        self.model.serve_on_torch_thread = own_thread
        self.detector = FaceDetector(detector=detector, chip_size=self.model.config.chip_size)
        self.speculate = speculate  # AULlava.generate: verify the encoder head's draft (same answers, fewer passes)
        self.lock = threading.RLock()
        self.load_seconds = time.perf_counter() - started

    @property
    def aus(self):
        return self.model.config.aus

    def detect(self, image) -> tuple[object, list[Face]]:
        rgb = load_image(image)
        return rgb, self.detector.detect(rgb)

    def describe(self, faces: list[Face], format_name: str, aus=None) -> list[FaceResult]:
        """The model's answer for already detected faces, parsed by the format; `aus` asks about a subset of
        the model's AUs (e.g. the ones a dataset codes), default all."""
        fmt = fmt_lib.get_format(format_name)
        chip, landmarks = self._tensors(faces)
        asked = self.model.asked_aus(aus)
        with self.lock:
            generations = self.model.generate(chip, landmarks, format_name, asked, speculate=self.speculate)
        results = []
        for face, generation in zip(faces, generations):
            try:
                parsed, error = fmt.parse(generation.text, asked), None
            except fmt_lib.FormatParseError as failure:
                parsed, error = None, f"the model's answer could not be read as {format_name}: {failure.reason}"
            results.append(FaceResult(face, format_name, generation.text, parsed, error,
                                      [round(d.probability, 4) for d in generation.decisions]))
        return results

    def read_presence(self, faces: list[Face], passes: int = 3) -> list[tuple[dict[int, float], bool]]:
        """Per face, the probability the model gives each AU being present in its binary answer, read in a few
        forward passes (AULlava.read_presence), and whether that read-out converged to the written answer."""
        chip, landmarks = self._tensors(faces)
        with self.lock:
            presence, converged = self.model.read_presence(chip, landmarks, passes)
        return [({a: round(float(p), 4) for a, p in zip(self.aus, row)}, bool(done))
                for row, done in zip(presence, converged)]

    @staticmethod
    def _tensors(faces: list[Face]):
        tensors = [face_tensors(f.chip, f.chip_landmarks) for f in faces]
        return torch.stack([t[0] for t in tensors]), torch.stack([t[1] for t in tensors])

    def analyze(self, image, format_name: str = "list", max_faces: int | None = None) -> ImageResult:
        seconds = {}
        started = time.perf_counter()
        rgb, faces = self.detect(image)
        faces = faces[:max_faces] if max_faces else faces
        seconds["detect"] = time.perf_counter() - started
        started = time.perf_counter()
        results = self.describe(faces, format_name)
        seconds["generate"] = time.perf_counter() - started
        return ImageResult(results, seconds)


_shared: dict = {}
_shared_lock = threading.Lock()


def get_analyzer(checkpoint: str | None = None, **kwargs) -> Analyzer:
    """One Analyzer per checkpoint per process."""
    key = (checkpoint or default_checkpoint(), tuple(sorted(kwargs.items())))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Analyzer(checkpoint, **kwargs)
        return _shared[key]
