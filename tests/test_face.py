"""The face stage: image reading, dlib detection and landmarks, alignment geometry, on real photos and crops."""
import io
import json
import math
import struct
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aullava import face as F  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOKE = SHARED / "smoke"
CKPLUS = SHARED / "ckplus48" / "images"


def eye_centres(points):
    return points[36:42].mean(axis=0), points[42:48].mean(axis=0)


def eye_angle(points) -> float:
    """Degrees of the line from the subject's right eye to the left eye; 0 = horizontal."""
    right, left = eye_centres(points)
    dx, dy = left - right
    return math.degrees(math.atan2(dy, dx))


@pytest.fixture(scope="module")
def hopper() -> Image.Image:
    cbook = pytest.importorskip("matplotlib.cbook")
    with cbook.get_sample_data("grace_hopper.jpg") as file:
        image = Image.open(file)
        image.load()
    return image.convert("RGB")


@pytest.fixture(scope="module")
def detector() -> F.FaceDetector:
    return F.FaceDetector()


@pytest.fixture(scope="module")
def hopper_face(hopper, detector) -> F.Face:
    faces = detector.detect(hopper)
    assert len(faces) == 1
    return faces[0]


def smoke(name: str) -> Path:
    path = SMOKE / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return path


def ckplus_sample(every: int = 25) -> list[Path]:
    files = sorted(CKPLUS.glob("*.png")) if CKPLUS.is_dir() else []
    if not files:
        pytest.skip(f"no CK+ crops in {CKPLUS}")
    return files[::every]


def png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ real photos

def test_grace_hopper_face(hopper, hopper_face):
    face = hopper_face
    x0, y0, x1, y1 = face.box
    assert 120 < x0 < 200 and 100 < y0 < 180 and 330 < x1 < 420 and 310 < y1 < 400
    assert face.width == pytest.approx(x1 - x0)
    assert face.index == 0 and face.score > 0 and not face.fallback
    assert face.landmarks.shape == (68, 2) and face.landmarks.dtype == np.float32
    assert face.chip.shape == (64, 64) and face.chip.dtype == np.uint8
    assert face.chip_landmarks.shape == (68, 2) and face.chip_landmarks.dtype == np.float32
    # the landmarks lie inside the box, give or take the jaw, and the eyes sit above the mouth
    assert (face.landmarks[:, 0] > x0 - 10).all() and (face.landmarks[:, 0] < x1 + 10).all()
    assert eye_centres(face.landmarks)[0][1] < face.landmarks[48:68, 1].min()
    # chip landmarks are the image landmarks under the same similarity
    assert abs(eye_angle(face.chip_landmarks)) < 3
    assert json.loads(json.dumps(face.to_dict()))["box"] == pytest.approx(list(face.box), abs=0.01)


def test_landmarks_in_box_matches_detect(hopper, hopper_face):
    points = F.landmarks_in_box(np.asarray(hopper), hopper_face.box)
    assert np.abs(points - hopper_face.landmarks).max() < 1e-3


def test_smoke_single_face():
    faces = F.FaceDetector().detect(smoke("single_face.jpg"))
    assert len(faces) == 1 and faces[0].width > 100


def test_smoke_multi_face_largest_first():
    path = smoke("multi_face.jpg")
    faces = F.FaceDetector().detect(path)
    # Five people; HOG misses the one in sunglasses (score -0.7), the CNN detector finds all five but takes seconds.
    assert 4 <= len(faces) <= 5
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert [f.index for f in faces] == list(range(len(faces)))
    centres = {(round((f.box[0] + f.box[2]) / 2), round((f.box[1] + f.box[3]) / 2)) for f in faces}
    assert len(centres) == len(faces)
    only = F.FaceDetector(max_faces=1).detect(path)
    assert len(only) == 1 and only[0].box == faces[0].box


def test_smoke_no_face():
    with pytest.raises(F.NoFaceError, match="No face was found"):
        F.FaceDetector().detect(smoke("free-mountain-vector-01.jpg"))


def test_no_face_in_flat_image():
    with pytest.raises(F.NoFaceError):
        F.FaceDetector(crop_fallback=True).detect(np.full((300, 400, 3), 200, np.uint8))


def test_ckplus_crops_found_with_upsampling():
    files = ckplus_sample()
    plain = F.FaceDetector(upsample=0)
    detector = F.FaceDetector()
    missed_without_upsampling = 0
    for path in files:
        try:
            plain.detect(path)
        except F.NoFaceError:
            missed_without_upsampling += 1
        face = detector.detect(path)[0]
        assert not face.fallback and face.score > 0
        assert 30 < face.width <= 48
        assert abs(eye_angle(face.chip_landmarks)) < 5
    assert missed_without_upsampling > len(files) // 2  # why small images are upsampled


def test_ckplus_crop_fallback():
    files = ckplus_sample(every=100)
    detected = F.FaceDetector(crop_fallback=True)
    never_detects = F.FaceDetector(crop_fallback=True, threshold=100.0)
    for path in files:
        face = detected.detect(path)[0]
        fallback = never_detects.detect(path)[0]
        assert fallback.fallback and fallback.score == 0.0 and not face.fallback
        right, left = eye_centres(face.landmarks)
        interocular = np.linalg.norm(left - right)
        assert np.linalg.norm(fallback.landmarks - face.landmarks, axis=1).mean() < 0.05 * interocular
    with pytest.raises(F.NoFaceError):  # off by default, as the app wants it
        F.FaceDetector(threshold=100.0).detect(files[0])


def test_fallback_only_for_small_crops(hopper):
    with pytest.raises(F.NoFaceError):
        F.FaceDetector(crop_fallback=True, threshold=100.0).detect(hopper)


# ------------------------------------------------------------------------------------------------ geometry

def test_similarity_transform_recovers_known_motion():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (20, 2))
    scale, angle, shift = 1.7, math.radians(33), np.array([5.0, -7.0])
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ (scale * rotation).T + shift
    matrix = F.similarity_transform(src, dst)
    assert matrix.shape == (2, 3)
    assert np.allclose(matrix[:, :2], scale * rotation) and np.allclose(matrix[:, 2], shift)
    # with noise: still close, and never a reflection
    noisy = F.similarity_transform(src, dst + rng.normal(0, 0.5, dst.shape))
    assert np.allclose(noisy[:, :2], scale * rotation, atol=0.02)
    assert np.linalg.det(noisy[:, :2]) > 0
    mirrored = F.similarity_transform(src, src * [-1, 1])
    assert np.linalg.det(mirrored[:, :2]) >= 0
    with pytest.raises(ValueError):
        F.similarity_transform(np.ones((5, 2)), dst[:5])


def test_template_placement():
    template = F.chip_template(64)
    right, left = eye_centres(template)
    assert right[1] == pytest.approx(left[1]) and (right[1] + left[1]) / 2 == pytest.approx(0.37 * 64, abs=0.01)
    assert (right[0] + left[0]) / 2 == pytest.approx(32, abs=0.01)
    assert 0.2 * 64 < template[17:27, 1].min() < 0.3 * 64  # brows
    assert 0.9 * 64 < template[8, 1] < 0.97 * 64  # chin
    assert template[:, 0].min() > 0.1 * 64 and template[:, 0].max() < 0.9 * 64


@pytest.mark.parametrize("degrees", [20, -20])
def test_rotated_face_aligns_to_template(hopper, hopper_face, degrees):
    rotated = hopper.rotate(degrees, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    face = F.FaceDetector().detect(rotated)[0]
    assert abs(eye_angle(face.landmarks) + degrees) < 5  # the photo's eyes are tilted...
    assert abs(eye_angle(face.chip_landmarks)) < 2  # ...the chip's are level
    error = np.linalg.norm(face.chip_landmarks - F.chip_template(64), axis=1).mean()
    assert error < 3
    assert np.linalg.norm(face.chip_landmarks - hopper_face.chip_landmarks, axis=1).mean() < 2.5


def test_align_face_jitter(hopper_face):
    gray = F.to_gray(np.asarray(Image.fromarray(hopper_face.chip)))  # any image works for the geometry
    base_chip, base = F.align_face(gray, hopper_face.chip_landmarks, size=64)
    shifted_chip, shifted = F.align_face(gray, hopper_face.chip_landmarks, size=64, jitter=(0.1, -0.05, 1.0, 0.0))
    assert np.allclose(shifted - base, [6.4, -3.2], atol=1e-3)
    _, bigger = F.align_face(gray, hopper_face.chip_landmarks, size=64, jitter={"scale": 1.2})
    spread = np.linalg.norm(base - base.mean(0), axis=1).mean()
    assert np.linalg.norm(bigger - bigger.mean(0), axis=1).mean() == pytest.approx(1.2 * spread, rel=1e-4)
    _, turned = F.align_face(gray, hopper_face.chip_landmarks, size=64, jitter=(0, 0, 1.0, 10.0))
    assert eye_angle(turned) == pytest.approx(eye_angle(base) - 10.0, abs=0.01)  # counter-clockwise as seen
    _, same = F.align_face(gray, hopper_face.chip_landmarks, size=64, jitter=(0, 0, 1.0, 0.0))
    assert np.allclose(same, base, atol=1e-4)
    assert shifted_chip.shape == base_chip.shape == (64, 64)


def test_align_face_other_sizes(hopper, hopper_face):
    chip, points = F.align_face(F.to_gray(np.asarray(hopper)), hopper_face.landmarks, size=112)
    assert chip.shape == (112, 112)
    assert np.linalg.norm(points - F.chip_template(112), axis=1).mean() < 3 * 112 / 64


def test_chip_samples_the_right_pixels():
    """A bright pixel under a landmark shows up at that landmark's chip position (continuous coordinates)."""
    landmarks = F.DLIB_MEAN_SHAPE * 120 + 40  # a face 120 px wide
    col, row = np.floor(landmarks[30]).astype(int)  # the nose tip's pixel...
    landmarks = landmarks + (col + 0.5, row + 0.5) - landmarks[30]  # ...whose centre is the landmark
    gray = np.zeros((200, 200), np.uint8)
    gray[row, col] = 255
    chip, points = F.align_face(gray, landmarks, size=64)
    chip_row, chip_col = np.unravel_index(np.argmax(chip), chip.shape)
    assert abs(chip_col + 0.5 - points[30, 0]) <= 1 and abs(chip_row + 0.5 - points[30, 1]) <= 1


# ------------------------------------------------------------------------------------------------ inputs

def test_exif_rotated_jpeg_gives_the_same_face(hopper, hopper_face, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": store the pixels turned counter-clockwise
    path = tmp_path / "sideways.jpg"
    hopper.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    rgb = F.load_image(path)
    assert rgb.shape == np.asarray(hopper).shape
    face = F.FaceDetector().detect(rgb)[0]
    assert np.abs(np.subtract(face.box, hopper_face.box)).max() < 0.1 * hopper_face.width


def test_input_kinds_agree(hopper, tmp_path):
    expected = np.asarray(hopper)
    path = tmp_path / "hopper.png"
    hopper.save(path)
    data = path.read_bytes()
    for src in (path, str(path), data, bytearray(data), io.BytesIO(data), hopper, expected):
        rgb = F.load_image(src)
        assert rgb.dtype == np.uint8 and rgb.shape == expected.shape and np.array_equal(rgb, expected)
    with open(path, "rb") as file:
        assert np.array_equal(F.load_image(file), expected)


def test_grayscale_image(hopper, detector, tmp_path):
    path = tmp_path / "gray.png"
    hopper.convert("L").save(path)
    rgb = F.load_image(path)
    assert rgb.shape[2] == 3 and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert len(detector.detect(path)) == 1


def test_rgba_composited_on_white(hopper, detector, tmp_path):
    rgba = hopper.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:50] = 0  # a transparent top band
    rgba.putalpha(Image.fromarray(alpha))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    rgb = F.load_image(path)
    assert (rgb[:50] == 255).all() and np.array_equal(rgb[60:], np.asarray(hopper)[60:])
    assert len(detector.detect(path)) == 1


def test_16_bit_png(hopper, detector, tmp_path):
    gray = np.asarray(hopper.convert("L")).astype(np.uint16) * 257
    path = tmp_path / "deep.png"
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = F.load_image(path)
    assert rgb.dtype == np.uint8 and np.abs(rgb[..., 0].astype(int) - gray // 257).max() <= 1
    assert len(detector.detect(path)) == 1


def test_cmyk_jpeg(hopper, detector, tmp_path):
    path = tmp_path / "cmyk.jpg"
    hopper.convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    rgb = F.load_image(path)
    assert np.abs(rgb.astype(int) - np.asarray(hopper)).mean() < 8
    assert len(detector.detect(path)) == 1


def test_palette_gif_and_animation(hopper, tmp_path):
    frames = [hopper.convert("P"), Image.new("RGB", hopper.size, (0, 0, 0)).convert("P")]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    rgb = F.load_image(path)
    assert np.abs(rgb.astype(int) - np.asarray(hopper)).mean() < 20  # the first frame, not the black one


def test_arrays(hopper):
    rgb = np.asarray(hopper)
    gray = np.asarray(hopper.convert("L"))
    assert np.array_equal(F.load_image(gray)[..., 1], gray)
    assert np.array_equal(F.load_image(gray[..., None])[..., 0], gray)
    assert np.abs(F.load_image(rgb / 255.0).astype(int) - rgb).max() <= 1
    assert np.abs(F.load_image(rgb.astype(np.uint16) * 257).astype(int) - rgb).max() <= 1
    rgba = np.dstack([rgb, np.zeros(gray.shape, np.uint8)])
    assert (F.load_image(rgba) == 255).all()  # fully transparent -> white
    with pytest.raises(F.ImageReadError):
        F.load_image(np.zeros((64, 64, 5), np.uint8))


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a text file, not a picture\n")
    with pytest.raises(F.ImageReadError, match="notes.jpg"):
        F.load_image(path)


def test_empty_and_missing_files(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(F.ImageReadError, match="empty"):
        F.load_image(path)
    with pytest.raises(F.ImageReadError, match="empty"):
        F.load_image(b"")
    with pytest.raises(F.ImageReadError, match="missing.jpg"):
        F.load_image(tmp_path / "missing.jpg")
    with pytest.raises(F.ImageReadError):
        F.load_image(12345)


def test_truncated_jpeg(hopper, tmp_path):
    buffer = io.BytesIO()
    hopper.save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(F.ImageReadError, match="cut.jpg"):
        F.load_image(path)


def test_decompression_bomb_refused():
    """A PNG whose header claims 30000x30000 px is refused before any pixel is decoded."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    header = struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    with pytest.raises(F.ImageReadError, match="megapixel"):
        F.load_image(bytes(data))
    # between our 100-megapixel cap and Pillow's own (179): refused by the cap, no DecompressionBombWarning
    header = struct.pack(">II", 11000, 10000) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(F.ImageReadError, match="11000x10000 px"):
            F.load_image(bytes(data))


def test_too_small():
    with pytest.raises(F.ImageTooSmallError):
        F.load_image(png_bytes(Image.new("RGB", (1, 1))))
    with pytest.raises(F.ImageTooSmallError):
        F.FaceDetector().detect(np.zeros((10, 300, 3), np.uint8))
    assert issubclass(F.ImageTooSmallError, F.FaceError) and issubclass(F.FaceError, ValueError)


def test_big_image_box_in_original_coordinates(hopper, hopper_face):
    scale = 4000 / hopper.height
    big = Image.new("RGB", (6000, 4000), (90, 110, 130))
    big.paste(hopper.resize((round(hopper.width * scale), 4000), Image.BICUBIC), (1000, 0))
    face = F.FaceDetector().detect(np.asarray(big))[0]
    expected = np.array(hopper_face.box) * scale + [1000, 0, 1000, 0]
    assert np.abs(np.array(face.box) - expected).max() < 0.1 * hopper_face.width * scale
    expected_points = hopper_face.landmarks * scale + [1000, 0]
    assert np.linalg.norm(face.landmarks - expected_points, axis=1).mean() < 0.03 * face.width
    assert np.linalg.norm(face.chip_landmarks - hopper_face.chip_landmarks, axis=1).mean() < 1.5


def test_threads_share_the_models(hopper, hopper_face):
    results, errors = [], []

    def work():
        try:
            results.append(F.FaceDetector().detect(hopper)[0].landmarks)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4
    assert all(np.array_equal(points, hopper_face.landmarks) for points in results)
