"""The web demo's logic without the UI: the shared analyser, one page session's analysis, what the page shows
for a face (text, chart, overlay, emotion hint), and the JSON / CSV downloads. `app.py` only wires this into
Gradio components, so all of it is testable without a browser or a server.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import chat as chat_lib, facs, plots
from . import formats as fmt_lib
from .chat import FaceFacts
from .face import FaceError

logger = logging.getLogger(__name__)

LIVE_FORMAT = "list"  # the live webcam mode writes the short list answer
LIVE_MAX_SIDE = 640  # live frames are analysed at most this large
DISPLAY_MAX_SIDE = 1024  # the overlay is drawn on a copy at most this large

# ----- the analyser: one per process ----------------------------------------------------------------------
_analyzer = None
_analyzer_lock = threading.Lock()
_analyzer_error: str | None = None


def model_settings() -> dict:
    """Where the model comes from, from the environment (documented in README):
    AULLAVA_CHECKPOINT  folder or hub repo id of the AU-LLaVA checkpoint (default: the embedded one)
    AULLAVA_BASE_LLM    base LLM id or folder instead of the one the checkpoint names
    AULLAVA_DTYPE       float32 or bfloat16 (default: llm.preferred_dtype(), bfloat16 only on CPUs with bf16
                        units; elsewhere its matmuls run slower than float32)
    AULLAVA_THREADS     torch threads (default: the CPUs this process may use)"""
    from .service import default_checkpoint

    return {"checkpoint": default_checkpoint(), "base_llm": os.environ.get("AULLAVA_BASE_LLM") or None,
            "dtype": os.environ.get("AULLAVA_DTYPE") or None}


def get_analyzer():
    """The process's analyser, loaded on first use (thread-safe; later callers wait for the first load)."""
    global _analyzer, _analyzer_error
    with _analyzer_lock:
        if _analyzer is None:
            from .llm import dtype_named
            from .service import Analyzer

            settings = model_settings()
            started = time.perf_counter()
            try:
                dtype = dtype_named(settings["dtype"]) if settings["dtype"] else None
                _analyzer = Analyzer(settings["checkpoint"], dtype=dtype, base_llm=settings["base_llm"])
            except Exception as error:
                _analyzer_error = f"{type(error).__name__}: {error}"
                raise
            _analyzer_error = None
            logger.info("AU-LLaVA model %s loaded in %.1f s (%s)", settings["checkpoint"],
                        time.perf_counter() - started, _analyzer.model.llm_dtype)
        return _analyzer


def warm_up(formats=("list",)):
    """Load the model and compute the prompt prefix of some formats and of the chat (for a background thread at
    start-up)."""
    try:
        analyzer = get_analyzer()
        analyzer.model.warm(formats)
        chat_lib.LLMStreamer(analyzer.model, lock=analyzer.lock).warm()
    except Exception:  # noqa: BLE001 - reported again, as a sentence, on the first request
        logger.exception("warm-up failed")


# ----- one session's analysis ---------------------------------------------------------------------------
@dataclass
class Session:
    """What one page (or API client) has analysed: the image, its faces, the model's answers in one format."""
    key: str  # identifies the image, so a format change re-uses the detected faces
    display: Image.Image  # the image, at most DISPLAY_MAX_SIDE px
    scale: float  # display pixels per image pixel
    faces: list  # aullava.face.Face, image coordinates
    format: str
    results: list  # aullava.service.FaceResult, one per face
    seconds: dict = field(default_factory=dict)
    image_size: tuple = (0, 0)
    source: str = ""  # the image file's name as uploaded ("" for an image given as pixels)
    replaced: bool = False  # another image (or none) has taken its place on the page

    def result(self, index: int):
        index = index if 0 <= index < len(self.results) else 0
        return self.results[index]

    def facts(self, index: int) -> FaceFacts | None:
        """What the chat knows about one face (None if the model's answer could not be read)."""
        if not self.results:
            return None
        face_result = self.result(index)
        if face_result.result is None:
            return None
        return FaceFacts.from_result(face_result.result, fmt_lib.get_format(self.format).title,
                                     face_result.face.number, len(self.results))

    def parse_error(self, index: int) -> str | None:
        return self.result(index).error if self.results else None


def image_key(image) -> str:
    """A cheap identity of an input image: a file path with its size and modification time, or a hash of
    the pixels of an array."""
    if isinstance(image, (str, os.PathLike)):
        try:
            stat = os.stat(image)
            return f"{os.fspath(image)}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return os.fspath(image)
    if isinstance(image, np.ndarray):
        return "array:" + hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
    return f"object:{id(image)}"


def analyse(analyzer, image, format_name: str, session: Session | None = None,
            max_side: int | None = None, max_faces: int | None = None) -> Session:
    """Detect the faces (re-used from `session` when it holds the same image) and let the model describe
    them (the `max_faces` largest, when given) in `format_name`. Raises aullava.face.FaceError subclasses
    with a sentence for the user."""
    fmt_lib.get_format(format_name)  # ValueError for an unknown format, before any work
    seconds = {}
    key = image_key(image)
    if session is not None and session.key == key and session.faces:
        faces, display, scale, size = session.faces, session.display, session.scale, session.image_size
        seconds["detect"] = 0.0
    else:
        started = time.perf_counter()
        faces, display, scale, size = _detect(analyzer, image, max_side)
        seconds["detect"] = time.perf_counter() - started
    started = time.perf_counter()
    results = analyzer.describe(faces[:max_faces] if max_faces else faces, format_name)
    seconds["generate"] = time.perf_counter() - started
    source = Path(image).name if isinstance(image, (str, os.PathLike)) else ""
    return Session(key, display, scale, faces, format_name, results, seconds, size, source)


def _detect(analyzer, image, max_side: int | None = None):
    """(faces, display copy of the image, display scale, image size); FaceError with a sentence if none."""
    rgb, faces = analyzer.detect(image if max_side is None else _shrunk(image, max_side))
    size = (rgb.shape[1], rgb.shape[0])
    scale = plots.display_scale(*size, max_side=DISPLAY_MAX_SIDE)
    display = Image.fromarray(rgb)
    if scale < 1:
        display = display.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.BILINEAR)
    return faces, display, scale, size


# ----- live webcam ----------------------------------------------------------------------------------------
LIVE_MODES = {"written": "The model writes its answer (AU list; its encoder's draft checked in one pass)",
              "readout": "Probabilities: the model's binary answer read in a few forward passes"}
LIVE_DEFAULT = "written"  # what the page and live_update use when no mode is chosen
LIVE_PASSES = 3  # forward passes of the fast read-out (parallel decoding of the binary answer)
READOUT_LABEL = (f"Fast read-out of the model's binary answer (AU01:0/1 ...) in at most {LIVE_PASSES} forward "
                 "passes, probability of 'present' per AU: ")
CONVERGED = "converged, so these are exactly the decisions the model writes."
NOT_CONVERGED = "did not converge, so a read-out of the model's probabilities, not its written answer."


def live_update(analyzer, frame, mode: str = LIVE_DEFAULT) -> tuple[str, str, Image.Image, Image.Image]:
    """One webcam frame, largest face -> (what was shown, text, chart, overlay). `mode` "written" (default) lets
    the model write its list answer (speculative writing makes that one pass for most faces); "readout" reads
    its binary answer's probabilities in a few forward passes (says whether they converged to the written
    answer). Raises FaceError with a sentence when there is no face."""
    if mode not in LIVE_MODES:
        raise ValueError(f"unknown live mode {mode!r}; choose one of {', '.join(LIVE_MODES)}")
    if mode == "written":
        session = analyse(analyzer, frame, LIVE_FORMAT, None, max_side=LIVE_MAX_SIDE, max_faces=1)  # the one shown
        what = f"the model's own written answer ({fmt_lib.get_format(LIVE_FORMAT).title})"
        return what, model_text(session, 0), chart(session, 0), overlay(session, 0)
    faces, display, scale, _ = _detect(analyzer, frame, LIVE_MAX_SIDE)
    probabilities, converged = analyzer.read_presence(faces[:1], LIVE_PASSES)[0]
    active = [a for a, p in probabilities.items() if p >= 0.5]
    listed = ", ".join(f"{fmt_lib.au_code(a)} {probabilities[a]:.2f}" for a in active) or "no AU at p >= 0.5"
    picture = plots.face_overlay(display, [_ScaledFace(f, scale) for f in faces], selected=0, active_aus=active,
                                 max_side=DISPLAY_MAX_SIDE)
    what = "the fast read-out of the model's binary answer" + ("" if converged else " (not converged)")
    return (what, READOUT_LABEL + (CONVERGED if converged else NOT_CONVERGED) + "\n" + listed,
            plots.probability_chart(probabilities, title="Face 1 - fast read-out of the binary answer"), picture)


def _shrunk(image, max_side: int):
    """A webcam frame (array) reduced to max_side px, for the live mode."""
    if isinstance(image, np.ndarray) and max(image.shape[:2]) > max_side:
        picture = Image.fromarray(image)
        picture.thumbnail((max_side, max_side), Image.BILINEAR)
        return np.asarray(picture)
    return image


# ----- what the page shows for one face -----------------------------------------------------------------
def face_choices(session: Session | None) -> list[str]:
    if session is None:
        return []
    return [f"Face {r.face.number}" for r in session.results]


def face_index(choice) -> int:
    """'Face 2' (or 2, or None) -> 1 (0-based; 0 when unknown)."""
    if isinstance(choice, (int, float)):
        return max(0, int(choice) - 1)
    if isinstance(choice, str) and choice.strip().split()[-1:] and choice.strip().split()[-1].isdigit():
        return max(0, int(choice.strip().split()[-1]) - 1)
    return 0


def model_text(session: Session, index: int) -> str:
    face_result = session.result(index)
    text = face_result.text
    if face_result.error:
        text += f"\n\n[Could not be read as {fmt_lib.get_format(session.format).title}: {face_result.error}]"
    return text


def emotion_hint(result) -> str:
    """The EMFACS hint, worded as a hint, with the AUs that support it (markdown)."""
    if result is None:
        return "No emotion hint: the model's answer could not be read."
    active = facs.sort_by_region(result.active)
    hints = facs.emotion_hints(active)
    if not hints:
        if not active:
            return "**Emotion hint:** none; no Action Unit is active (a neutral face, as far as the model sees)."
        return ("**Emotion hint:** none; the active AUs (" + ", ".join(fmt_lib.au_code(a) for a in active)
                + ") match no EMFACS emotion prototype.")
    lines = []
    for hint in hints[:3]:
        support = " + ".join(facs.au_label(a) for a in hint.supporting_aus)
        lines.append(f"**{hint.emotion}** ({hint.coverage:.0%} of its prototype): {support}")
    return ("**Emotion hint** (EMFACS prototypes; a hint from the AUs, not a reading of feelings):  \n"
            + "  \n".join(lines))


def chart(session: Session, index: int) -> Image.Image:
    face_result = session.result(index)
    fmt = fmt_lib.get_format(session.format)
    title = f"Face {face_result.face.number} - {fmt.title}"
    if face_result.result is None:
        return plots.message_image(f"{title}\nThe model's answer could not be read,\nso there is nothing to chart.")
    return plots.intensity_chart(face_result.result, title=title, carries_intensity=fmt.carries_intensity)


def overlay(session: Session, index: int) -> Image.Image:
    face_result = session.result(index)
    active = face_result.result.active if face_result.result is not None else ()
    scaled = [_ScaledFace(f, session.scale) for f in session.faces]
    return plots.face_overlay(session.display, scaled, selected=face_result.face.index, active_aus=active,
                              max_side=DISPLAY_MAX_SIDE)


class _ScaledFace:
    """A face's box and landmarks in display pixels."""

    def __init__(self, face, scale: float):
        self.index = face.index
        self.box = tuple(float(v) * scale for v in face.box)
        self.landmarks = np.asarray(face.landmarks, dtype=float) * scale


def status_line(session: Session) -> str:
    count = len(session.faces)
    total = sum(session.seconds.values())
    faces = "1 face" if count == 1 else f"{count} faces"
    described = "" if len(session.results) == count else f" for the {len(session.results)} largest"
    return (f"Found {faces}; the model answered{described} in {session.seconds.get('generate', 0):.2f} s "
            f"(total {total:.2f} s).")


# ----- downloads --------------------------------------------------------------------------------------
def result_dict(session: Session) -> dict:
    """Everything the page shows, JSON-ready: per face its box, the model's text, the parsed AUs with names
    and regions, the emotion hints and the probability the model gave each choice it wrote."""
    fmt = fmt_lib.get_format(session.format)
    faces = []
    for face_result in session.results:
        entry = face_result.to_dict()
        if face_result.result is not None:
            result = face_result.result
            entry["active"] = [fmt_lib.au_code(a) for a in facs.sort_by_region(result.active)]
            entry["table"] = [{"au": fmt_lib.au_code(a), "name": facs.AUS[a].name, "region": facs.AUS[a].region,
                               "present": result.present[a], "intensity": result.intensity[a]}
                              for a in facs.sort_by_region(result.aus)]
            entry["emotion_hints"] = [{"emotion": h.emotion, "supporting_aus": [fmt_lib.au_code(a)
                                                                               for a in h.supporting_aus],
                                       "coverage": round(h.coverage, 3)}
                                      for h in facs.emotion_hints(result.active)]
        faces.append(entry)
    return {"image": session.source, "format": session.format, "format_title": fmt.title,
            "image_size": list(session.image_size),
            "faces": faces, "seconds": {k: round(v, 3) for k, v in session.seconds.items()}}


CSV_FIELDS = ("image", "face", "box", "format", "au", "name", "region", "present", "intensity", "model_text",
              "parse_error")


def result_csv(session: Session) -> str:
    """One row per face and AU (faces whose answer could not be read get one row with the error)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for face_result in session.results:
        common = {"image": session.source, "face": face_result.face.number,
                  "box": " ".join(f"{float(v):.1f}" for v in face_result.face.box),
                  "format": session.format, "model_text": face_result.text, "parse_error": face_result.error or ""}
        if face_result.result is None:
            writer.writerow(common)
            continue
        result = face_result.result
        for a in facs.sort_by_region(result.aus):
            value = result.intensity[a]
            writer.writerow(common | {"au": fmt_lib.au_code(a), "name": facs.AUS[a].name,
                                      "region": facs.AUS[a].region, "present": int(result.present[a]),
                                      "intensity": "" if value is None else f"{value:g}"})
    return out.getvalue()


_download_dir = Path(tempfile.mkdtemp(prefix="aullava-downloads-"))
KEEP_DOWNLOADS = 200


def _download_stem(source: str, content: str) -> str:
    """aullava-<the input file's name>-<hash of the content>: a researcher saving several results can tell them
    apart (the name kept to letters, digits, '-', '_' and '.')."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(source).stem)[:40] or "result"
    return f"aullava-{name}-{hashlib.sha1(content.encode()).hexdigest()[:12]}"


def download_files(session: Session) -> list[str]:
    """The result written as aullava-<photo name>-<hash>.json and .csv in a private temp folder (the newest
    KEEP_DOWNLOADS files are kept)."""
    data = json.dumps(result_dict(session), indent=2)
    table = result_csv(session)
    stem = _download_stem(session.source, data + table)
    paths = []
    for suffix, content in (("json", data), ("csv", table)):
        path = _download_dir / f"{stem}.{suffix}"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_text(content)
            os.replace(tmp, path)
        paths.append(str(path))
    _prune_downloads()
    return paths


def _prune_downloads():
    files = sorted(_download_dir.glob("aullava-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in files[KEEP_DOWNLOADS:]:
        stale.unlink(missing_ok=True)


# ----- video ----------------------------------------------------------------------------------------------
MAX_VIDEO_FRAMES = 600  # sampled frames one page request may analyse (the command line has no limit)


class Refused(ValueError):
    """A request the page turns down; its message is the sentence the page shows."""


@dataclass
class VideoAnalysis:
    summary: str
    series: Image.Image
    downloads: list


def analyse_video(analyzer, path, format_name: str, fps: float) -> VideoAnalysis:
    """A video sampled at `fps` frames per second, every face of every sampled frame analysed (tqdm progress,
    which the page shows): the AU time series of the most seen face and the rows as CSV and JSON lines."""
    from .batch import analyze_batch
    from .video import video_info

    if not fps or fps <= 0:
        raise Refused("The sampling rate must be above 0 frames per second.")
    info = video_info(path)
    expected = info.sampled_frames(fps)
    if expected and expected > MAX_VIDEO_FRAMES:
        raise Refused(f"At {fps:g} frames per second this {info.duration:.0f} s video needs {expected} analysed "
                         f"frames; the web demo analyses at most {MAX_VIDEO_FRAMES}. Lower the rate, or use "
                         "`python -m aullava analyze VIDEO --csv out.csv` for long videos.")
    stem = _download_stem(Path(path).name, f"{path}{time.time()}")
    csv_path, jsonl_path = _download_dir / f"{stem}.csv", _download_dir / f"{stem}.jsonl"
    # the rows name the uploaded file, not the server's temp path of it
    batch = analyze_batch(analyzer, [path], format_name, csv_path, jsonl_path, fps=fps,
                          names={str(path): Path(path).name}, max_video_frames=MAX_VIDEO_FRAMES)
    rows = next(iter(batch.video_rows.values()), [])
    analysed = sum(1 for r in rows if r["success"] == 1)
    faces = sorted({r["face_id"] for r in rows if r["face_id"] != ""})
    summary = (f"{batch.video_frames} frames sampled at {fps:g}/s: {analysed} face analyses, "
               f"{len(faces)} face id(s), {len(batch.failed)} frame(s) without a result")
    if batch.failed:
        summary += " (first: " + batch.failed[0][1] + ")"
    if batch.unreadable:
        summary += f", {len(batch.unreadable)} face answer(s) that could not be read (first: {batch.unreadable[0][1]})"
    if batch.video_frames >= MAX_VIDEO_FRAMES and not expected:  # a file that does not say how long it is
        summary += (f"; stopped at the web demo's limit of {MAX_VIDEO_FRAMES} sampled frames, the rest is not "
                    "analysed (`python -m aullava analyze VIDEO --csv out.csv` has no limit)")
    _prune_downloads()
    series = plots.au_time_series(rows, analyzer.aus, title=Path(path).name)
    return VideoAnalysis(summary + ".", series, [str(csv_path), str(jsonl_path)])


# ----- errors -----------------------------------------------------------------------------------------
def error_sentence(error: BaseException, image=None) -> str:
    """A plain sentence for anything the analysis raised. Server-side paths of uploads (the image given as
    `image`) are shortened to the file's name."""
    if isinstance(error, FaceError):
        text = str(error)
        if isinstance(image, (str, os.PathLike)) and os.fspath(image):
            text = text.replace(os.fspath(image), f'"{Path(image).name}"')
        return text
    if isinstance(error, Refused):
        return str(error)
    if isinstance(error, MemoryError):
        return "The image is too large to process; try a smaller photo."
    if isinstance(error, ValueError) and "format" in str(error):
        return str(error)
    if _analyzer is None and _analyzer_error:
        return f"The model could not be loaded, so nothing can be analysed ({_analyzer_error})."
    return f"Something went wrong while analysing this image ({type(error).__name__}); please try another photo."
