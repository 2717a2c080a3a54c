"""The face stage: any image -> RGB array -> dlib faces -> 68 landmarks -> similarity-aligned grayscale chips.

Every float coordinate here is a continuous pixel coordinate, the convention PIL uses: pixel (column i, row j)
covers [i, i+1) x [j, j+1), so its centre is (i + 0.5, j + 0.5). dlib's integer landmark and box indices are
converted on the way in and out.
"""
from __future__ import annotations

import importlib.util
import io
import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class FaceError(ValueError):
    """A problem with the input image or its face, told as a sentence that can be shown to the user."""


class ImageReadError(FaceError):
    pass


class ImageTooSmallError(FaceError):
    pass


class NoFaceError(FaceError):
    pass


MAX_PIXELS = 100_000_000  # decompression-bomb guard
# The only formats Pillow is asked to decode: no EPS/PS (Ghostscript), PDF, PSD or other rarely fuzzed decoders.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP, TIFF or PPM/PGM"
MIN_SIDE = 16
NO_FACE_MESSAGE = "No face was found in the image. Use a frontal, well-lit face at least ~40 px wide."

# The initial (mean) shape of dlib's shape_predictor_68_face_landmarks.dat, read from the file itself, in units of
# the detector box: (0, 0) is the box's top-left corner and (1, 1) its bottom-right. Points in iBUG 68 order.
DLIB_MEAN_SHAPE = np.array([
    (0.0294, 0.3219), (0.0326, 0.4464), (0.0459, 0.5704), (0.0718, 0.6920),
    (0.1203, 0.8050), (0.1947, 0.9029), (0.2858, 0.9846), (0.3863, 1.0502),
    (0.5000, 1.0697), (0.6137, 1.0502), (0.7142, 0.9846), (0.8053, 0.9029),
    (0.8797, 0.8050), (0.9282, 0.6920), (0.9541, 0.5704), (0.9674, 0.4464),
    (0.9706, 0.3219), (0.1192, 0.2309), (0.1775, 0.1784), (0.2598, 0.1627),
    (0.3451, 0.1749), (0.4249, 0.2081), (0.5751, 0.2081), (0.6550, 0.1749),
    (0.7402, 0.1627), (0.8225, 0.1784), (0.8809, 0.2309), (0.5000, 0.3055),
    (0.5000, 0.3857), (0.5000, 0.4652), (0.5000, 0.5470), (0.4045, 0.6023),
    (0.4504, 0.6192), (0.5000, 0.6337), (0.5497, 0.6192), (0.5955, 0.6023),
    (0.2139, 0.3156), (0.2647, 0.2863), (0.3259, 0.2872), (0.3794, 0.3276),
    (0.3221, 0.3378), (0.2612, 0.3370), (0.6207, 0.3276), (0.6742, 0.2872),
    (0.7353, 0.2863), (0.7862, 0.3156), (0.7388, 0.3370), (0.6780, 0.3378),
    (0.3171, 0.7511), (0.3844, 0.7242), (0.4525, 0.7103), (0.5000, 0.7220),
    (0.5475, 0.7103), (0.6156, 0.7242), (0.6829, 0.7511), (0.6178, 0.8169),
    (0.5516, 0.8460), (0.5000, 0.8515), (0.4484, 0.8460), (0.3823, 0.8169),
    (0.3452, 0.7547), (0.4519, 0.7499), (0.5000, 0.7550), (0.5481, 0.7499),
    (0.6548, 0.7547), (0.5490, 0.7857), (0.5000, 0.7916), (0.4510, 0.7857),
])

# Canonical placement: the mean shape at 0.74 chip sides per box unit, centred left-right, the centre of the eyes
# at 37% of the chip's height. The brows' top then sits at 26% and the chin at 93%; the jaw spans 15%..85%.
TEMPLATE_SCALE = 0.74
EYE_HEIGHT = 0.37
_EYES = DLIB_MEAN_SHAPE[36:48].mean(axis=0)
TEMPLATE = ((DLIB_MEAN_SHAPE - _EYES) * TEMPLATE_SCALE + (0.5, EYE_HEIGHT)).astype(np.float32)

# Points that expressions barely move (eye corners, nose bridge and base) fix the alignment; brows, lids, mouth
# and jaw move with the very AUs the model reads, so they must not pull the face into a neutral pose.
ALIGN_POINTS = np.array([36, 39, 42, 45, 27, 28, 29, 30, 31, 32, 33, 34, 35])

# Where dlib's HOG box falls, on average, in a tight 48x48 CK+ face crop (fractions of the crop's sides, made
# symmetric): the box used when the detector misses the face of a crop (crop_fallback). On CK+ its landmarks are
# within ~1% of the inter-ocular distance of those from the detected box.
CROP_FALLBACK_BOX = (0.06, 0.17, 0.94, 1.05)
CROP_FALLBACK_MAX_SIDE = 128


def chip_template(size: int = 64) -> np.ndarray:
    """The 68 canonical landmark positions in a size x size chip."""
    return TEMPLATE * np.float32(size)


# ---------------------------------------------------------------------------------------------------- images

def load_image(src) -> np.ndarray:
    """A path, bytes, file-like object, PIL image or array -> (H, W, 3) uint8 RGB, upright per its EXIF tag."""
    if isinstance(src, np.ndarray):
        rgb = _array_to_rgb(src)
    else:
        name = _name_of(src)
        image = src if isinstance(src, Image.Image) else _open(src, name)
        rgb = _pil_to_rgb(image, name)
    height, width = rgb.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ImageTooSmallError(f"The image is only {width}x{height} px; a face needs at least "
                                 f"{MIN_SIDE}x{MIN_SIDE} px (better 100 px or more).")
    return rgb


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as PIL computes it."""
    if rgb.ndim == 2:
        return rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))


def _name_of(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "The image data"
    if isinstance(src, Image.Image):
        return "The image"
    return str(getattr(src, "name", "The image"))


def _open(src, name: str) -> Image.Image:
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise ImageReadError(f"{name} does not exist or is not a file.")
        if path.stat().st_size == 0:
            raise ImageReadError(f"{name} is an empty file, not an image.")
        source = path
    elif isinstance(src, (bytes, bytearray, memoryview)) or hasattr(src, "read"):
        try:
            data = bytes(src) if not hasattr(src, "read") else src.read()
        except OSError as error:
            raise ImageReadError(f"{name} could not be read: {error}.") from error
        if isinstance(data, str):
            raise ImageReadError(f"{name} was opened as text; open image files in binary mode ('rb').")
        if not data:
            raise ImageReadError(f"{name} is empty, not an image.")
        source = io.BytesIO(data)
    else:
        raise ImageReadError(f"Cannot read an image from a {type(src).__name__}: give a path, bytes, a file, "
                             "a PIL image or a numpy array.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{name} has more than {MAX_PIXELS // 1_000_000} megapixels, "
                             "too many to read safely.") from error
    except UnidentifiedImageError as error:
        raise ImageReadError(f"{name} is not an image in a format read here ({FORMATS_TEXT}).") from error
    except OSError as error:
        raise ImageReadError(f"{name} could not be read: {error}.") from error
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageReadError(f"{name} is {width}x{height} px ({width * height / 1e6:.0f} megapixels), over the "
                             f"{MAX_PIXELS // 1_000_000}-megapixel limit for one image.")
    return image


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated or multi-page: the first frame
        image.load()
    except (OSError, ValueError, EOFError, SyntaxError) as error:
        raise ImageReadError(f"{name} is truncated or corrupt ({error}).") from error
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block should not cost the picture
        pass
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image)
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return _array_to_rgb(np.asarray(image))
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX
    except (OSError, ValueError) as error:
        raise ImageReadError(f"{name} has an unsupported pixel format ({mode}).") from error


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        values = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if values.size and values.max() <= 1.0:  # floats in [0, 1]; anything brighter is taken as 0..255
            values = values * 255.0
        return np.clip(values + 0.5, 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        peak = int(array.max()) if array.size else 0
        if peak > 255:  # 16-bit (or wider) data: stretch its own maximum to 255
            return np.clip(array.astype(np.float32) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return np.clip(array, 0, 255).astype(np.uint8)
    raise ImageReadError(f"An image array of type {array.dtype} cannot be read as pixels.")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (2, 3, 4))):
        raise ImageReadError(f"An image array must be HxW, HxWx1, HxWx3 or HxWx4; this one is {array.shape}.")
    pixels = _to_uint8(array)
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels)
    colour = pixels[..., :-1].astype(np.float32)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    alpha = pixels[..., -1:].astype(np.float32) / 255.0
    return (colour * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)  # composite on white


# ---------------------------------------------------------------------------------------------------- geometry

def similarity_transform(src_pts, dst_pts) -> np.ndarray:
    """The 2x3 rotation + uniform scale + translation that maps src onto dst in least squares (Umeyama 1991)."""
    src = np.asarray(src_pts, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst_pts, dtype=np.float64).reshape(-1, 2)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c ** 2).sum() / len(src)
    if len(src) < 2 or src_var <= 1e-12:
        raise ValueError("similarity_transform needs at least two distinct source points")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    reflect = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ reflect @ vt
    scale = np.trace(np.diag(s) @ reflect) / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def _jitter_matrix(jitter, size: int) -> np.ndarray:
    """(dx, dy as a fraction of the chip, scale factor, rotation in degrees counter-clockwise) about the chip centre."""
    if isinstance(jitter, dict):
        dx, dy = jitter.get("dx", 0.0), jitter.get("dy", 0.0)
        scale, degrees = jitter.get("scale", 1.0), jitter.get("rotation", 0.0)
    else:
        dx, dy, scale, degrees = jitter
    angle = math.radians(degrees)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    centre = size / 2.0
    # y points down, so [[cos, sin], [-sin, cos]] turns the face counter-clockwise as seen.
    return np.array([[cos, sin, centre + dx * size - cos * centre - sin * centre],
                     [-sin, cos, centre + dy * size + sin * centre - cos * centre],
                     [0.0, 0.0, 1.0]])


def align_face(gray_image, landmarks, size: int = 64, jitter=None) -> tuple[np.ndarray, np.ndarray]:
    """The face warped onto the canonical template: a (size, size) uint8 chip and its (68, 2) float32 landmarks."""
    gray = to_gray(np.asarray(gray_image))
    points = np.asarray(landmarks, dtype=np.float64).reshape(68, 2)
    matrix = np.eye(3)
    matrix[:2] = similarity_transform(points[ALIGN_POINTS], chip_template(size)[ALIGN_POINTS])
    if jitter is not None:
        matrix = _jitter_matrix(jitter, size) @ matrix
    chip = _warp(gray, matrix, size)
    chip_points = points @ matrix[:2, :2].T + matrix[:2, 2]
    return chip, chip_points.astype(np.float32)


def _warp(gray: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Sample the chip through the inverse of `matrix`, reading only the source region the chip covers."""
    inverse = np.linalg.inv(matrix)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
    source = corners @ inverse[:2].T
    shrink = int(1.0 / math.sqrt(abs(np.linalg.det(matrix[:2, :2]))))  # source pixels per chip pixel
    shrink = max(shrink, 1)
    x0, y0 = np.floor(source.min(axis=0)).astype(int) - 1 - shrink
    x1, y1 = np.ceil(source.max(axis=0)).astype(int) + 1 + shrink
    height, width = gray.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx1 <= cx0 or cy1 <= cy0:
        return np.zeros((size, size), dtype=np.uint8)
    region = gray[cy0:cy1, cx0:cx1]
    # Repeat the edge pixels where the chip reaches past the image: tight crops (CK+) would otherwise get black
    # bars that photos never have.
    region = np.pad(region, ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1)), mode="edge")
    image = Image.fromarray(np.ascontiguousarray(region))
    to_region = np.array([[1.0, 0.0, -x0], [0.0, 1.0, -y0], [0.0, 0.0, 1.0]])
    if shrink >= 2:  # a box filter first, so that a big face does not alias in bilinear sampling
        image = image.reduce(shrink)
        to_region = np.diag([1.0 / shrink, 1.0 / shrink, 1.0]) @ to_region
    coefficients = (to_region @ inverse)[:2].ravel()
    chip = image.transform((size, size), Image.AFFINE, tuple(coefficients), resample=Image.BILINEAR)
    return np.asarray(chip)


# ---------------------------------------------------------------------------------------------------- dlib

_models: dict = {}
_models_lock = threading.Lock()
# dlib's Python objects are not documented as thread-safe; Gradio calls from several threads, so one call at a
# time per model.
_call_locks = {"hog": threading.Lock(), "cnn": threading.Lock(), "landmarks": threading.Lock()}
_MODEL_FILES = {"cnn": "mmod_human_face_detector.dat", "landmarks": "shape_predictor_68_face_landmarks.dat"}


def model_dir() -> Path:
    """The models/ folder of the face_recognition_models package, found without importing it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The dlib model files are missing: pip install face_recognition_models")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _model(kind: str):
    with _models_lock:
        if kind not in _models:
            import dlib

            if kind == "hog":
                _models[kind] = dlib.get_frontal_face_detector()
            elif kind == "cnn":
                _models[kind] = dlib.cnn_face_detection_model_v1(str(model_dir() / _MODEL_FILES[kind]))
            else:
                _models[kind] = dlib.shape_predictor(str(model_dir() / _MODEL_FILES[kind]))
        return _models[kind]


def _resize(gray: np.ndarray, scale: float) -> tuple[np.ndarray, float, float]:
    """The image resized by about `scale`, and the exact x and y factors that rounding left."""
    height, width = gray.shape[:2]
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    resample = Image.BICUBIC if scale > 1 else Image.BILINEAR
    resized = Image.fromarray(gray).resize((new_width, new_height), resample, reducing_gap=2.0 if scale < 1 else None)
    return np.asarray(resized), new_width / width, new_height / height


def landmarks_in_box(image, box) -> np.ndarray:
    """The 68 landmarks (float32, image coordinates) that dlib's shape predictor finds for a face box."""
    is_gray = isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype == np.uint8
    gray = image if is_gray else to_gray(load_image(image))
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    if side <= 1:
        raise ValueError(f"the face box {box} is empty")
    # Small faces are landmarked on an upsampled region: dlib returns whole pixels, too coarse for a 40 px face.
    zoom = 1 if side >= 100 else min(4, math.ceil(100 / side))
    height, width = gray.shape
    rx0 = ry0 = 0
    region = gray
    if zoom > 1:
        margin = 0.5 * side
        rx0, ry0 = max(0, math.floor(x0 - margin)), max(0, math.floor(y0 - margin))
        rx1, ry1 = min(width, math.ceil(x1 + margin)), min(height, math.ceil(y1 + margin))
        region = gray[ry0:ry1, rx0:rx1]
        region = np.asarray(Image.fromarray(region).resize((region.shape[1] * zoom, region.shape[0] * zoom),
                                                            Image.BICUBIC))
    import dlib

    rect = dlib.rectangle(round((x0 - rx0) * zoom), round((y0 - ry0) * zoom),
                          round((x1 - rx0) * zoom) - 1, round((y1 - ry0) * zoom) - 1)
    predictor = _model("landmarks")
    region = np.ascontiguousarray(region)
    with _call_locks["landmarks"]:
        shape = predictor(region, rect)
    points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
    return ((points + 0.5) / zoom + (rx0, ry0)).astype(np.float32)


@dataclass(eq=False)
class Face:
    index: int  # 0 = the largest face in the image
    box: tuple  # (x0, y0, x1, y1) in the original image's pixels
    score: float  # detector confidence (HOG: SVM margin, CNN: MMOD confidence); 0.0 for a crop fallback
    landmarks: np.ndarray  # (68, 2) float32, original image coordinates
    chip: np.ndarray  # (S, S) uint8 grayscale, aligned
    chip_landmarks: np.ndarray  # (68, 2) float32, chip coordinates
    fallback: bool = False  # True: no detection, the whole tight crop was taken as the face

    @property
    def number(self) -> int:
        """The face's name for people, "face 1" the largest: the page, printed lines and result JSON count from 1;
        only the OpenFace-style rows' `face_id` counts from 0, as OpenFace's does."""
        return self.index + 1

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    def to_dict(self) -> dict:
        return {"index": self.index, "box": [round(float(v), 2) for v in self.box],
                "score": round(float(self.score), 4), "landmarks": np.round(self.landmarks, 2).tolist(),
                "fallback": self.fallback}


class FaceDetector:
    """Every face in an image, largest first, with landmarks and an aligned chip.

    Images with a side over `max_side` px are searched downscaled (landmarks still come from full resolution);
    images shorter than 200 px are searched upscaled 2x (4x below 40 px), since HOG needs ~80 px faces.
    `upsample` (dlib's upsample_num_times) replaces that automatic resizing when given. `threshold` is the
    detector's score cut (HOG: SVM margin; CNN: MMOD confidence). `crop_fallback`: when nothing is found in an
    image of at most 128x128 px, take it as a tight face crop (Face.fallback, score 0.0) -- for training crops.
    """

    def __init__(self, detector: str = "hog", chip_size: int = 64, max_faces: int | None = None,
                 crop_fallback: bool = False, upsample: int | None = None, threshold: float = 0.0,
                 max_side: int = 1600):
        if detector not in ("hog", "cnn"):
            raise ValueError(f"unknown face detector {detector!r}: use 'hog' or 'cnn'")
        self.detector = detector
        self.chip_size = chip_size
        self.max_faces = max_faces
        self.crop_fallback = crop_fallback
        self.upsample = upsample
        self.threshold = threshold
        self.max_side = max_side

    def _search_scale(self, width: int, height: int) -> float:
        if self.upsample is not None:
            return min(1.0, self.max_side / max(width, height))
        if max(width, height) > self.max_side:
            return self.max_side / max(width, height)
        if min(width, height) < 200:
            return min(2.0 if min(width, height) >= 40 else 4.0, self.max_side / max(width, height))
        return 1.0

    def find_boxes(self, rgb: np.ndarray, gray: np.ndarray | None = None) -> list[tuple[tuple, float]]:
        """(box in image coordinates, score) of every detection, unsorted."""
        gray = to_gray(rgb) if gray is None else gray
        height, width = gray.shape
        scale = self._search_scale(width, height)
        upsample = self.upsample or 0
        source = rgb if self.detector == "cnn" else gray  # HOG is as good on gray and 30% faster
        sx = sy = 1.0
        if scale != 1.0:
            source, sx, sy = _resize(source, scale)
        source = np.ascontiguousarray(source)
        model = _model(self.detector)
        with _call_locks[self.detector]:
            if self.detector == "hog":
                rects, scores, _ = model.run(source, upsample, self.threshold)
            else:
                found = model(source, upsample)
                rects = [d.rect for d in found if d.confidence >= self.threshold]
                scores = [d.confidence for d in found if d.confidence >= self.threshold]
        return [((r.left() / sx, r.top() / sy, (r.right() + 1) / sx, (r.bottom() + 1) / sy), float(s))
                for r, s in zip(rects, scores)]

    def detect(self, image) -> list[Face]:
        rgb = load_image(image)
        gray = to_gray(rgb)
        height, width = gray.shape
        found = self.find_boxes(rgb, gray)
        fallback = False
        if not found and self.crop_fallback and max(width, height) <= CROP_FALLBACK_MAX_SIDE:
            fx0, fy0, fx1, fy1 = CROP_FALLBACK_BOX
            found, fallback = [((fx0 * width, fy0 * height, fx1 * width, fy1 * height), 0.0)], True
        if not found:
            raise NoFaceError(NO_FACE_MESSAGE)
        found.sort(key=lambda item: ((item[0][2] - item[0][0]) * (item[0][3] - item[0][1]), item[1]), reverse=True)
        faces = []
        for index, (box, score) in enumerate(found[:self.max_faces] if self.max_faces else found):
            landmarks = landmarks_in_box(gray, box)
            chip, chip_landmarks = align_face(gray, landmarks, self.chip_size)
            clipped = (max(0.0, box[0]), max(0.0, box[1]), min(float(width), box[2]), min(float(height), box[3]))
            faces.append(Face(index, clipped, score, landmarks, chip, chip_landmarks, fallback))
        return faces
