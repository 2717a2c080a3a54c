"""The bad-input battery's files, made from the public-domain grace_hopper photo and the smoke photos.

`make_battery(folder)` writes every case and returns {file name: Expect}: either the number of faces a good
item must give (at least), or the words its plain message must contain.
"""
from __future__ import annotations

import io
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from conftest import SMOKE, grace_hopper_path


@dataclass(frozen=True)
class Expect:
    faces: int = 0  # a good item: at least this many faces
    words: str = ""  # a refused item: its message contains these words

    @property
    def good(self) -> bool:
        return self.faces > 0


def hopper() -> Image.Image:
    with Image.open(grace_hopper_path()) as image:
        return image.convert("RGB")


def png_bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 30000x30000 px (900 megapixels)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = struct.pack(">II", 30000, 30000) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


def tiled(face: Image.Image, columns: int, rows: int, tile: tuple[int, int]) -> Image.Image:
    small = face.resize(tile, Image.LANCZOS)
    sheet = Image.new("RGB", (tile[0] * columns, tile[1] * rows), "white")
    for i in range(columns * rows):
        sheet.paste(ImageOps.mirror(small) if i % 2 else small, ((i % columns) * tile[0], (i // columns) * tile[1]))
    return sheet


def profile_face(face: Image.Image) -> Image.Image:
    """No true profile photo is at hand: the face turned 90 degrees and cut to its right half, which the
    frontal HOG detector must not take for a face."""
    turned = face.rotate(90, expand=True, fillcolor="white")
    return turned.crop((0, 0, turned.width // 2, turned.height))


EXPECTED = {
    "empty.jpg": Expect(words="empty file"),
    "notes.jpg": Expect(words="not an image"),
    "drawing.eps": Expect(words="not an image in a format read here"),  # Ghostscript is never run
    "truncated.jpg": Expect(words="truncated or corrupt"),
    "bomb.png": Expect(words="megapixel"),
    "dot_1x1.png": Expect(words="only 1x1 px"),
    "tiny_48x48.png": Expect(words="No face was found"),
    "huge_12000x9000.jpg": Expect(words="12000x9000 px (108 megapixels), over the 100-megapixel limit"),
    "cmyk.jpg": Expect(faces=1),
    "deep_16bit.png": Expect(faces=1),
    "rgba.png": Expect(faces=1),
    "animated.gif": Expect(faces=1),
    "exif_rotated.jpg": Expect(faces=1),
    "no_face.png": Expect(words="No face was found"),
    "profile.jpg": Expect(words="No face was found"),
    "thirty_faces.jpg": Expect(faces=30),
    "plain.jpg": Expect(faces=1),
    "half_profile.jpg": Expect(faces=1),  # a real head turned ~45 degrees (smoke data; absent on some machines)
}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"


def make_battery(folder: Path) -> dict[str, Expect]:
    """Write every case of EXPECTED that can be made here; returns those cases."""
    folder.mkdir(parents=True, exist_ok=True)
    face = hopper()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("This is a text file renamed .jpg, not a photo.\n" * 20)
    (folder / "drawing.eps").write_bytes(EPS)
    whole = io.BytesIO()
    face.save(whole, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (folder / "bomb.png").write_bytes(png_bomb())
    Image.new("RGB", (1, 1), "red").save(folder / "dot_1x1.png")
    face.resize((48, 48)).save(folder / "tiny_48x48.png")
    Image.new("RGB", (12000, 9000), (200, 180, 160)).save(folder / "huge_12000x9000.jpg", quality=30)
    face.convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    Image.fromarray(np.asarray(face.convert("L")).astype(np.uint16) * 257).save(folder / "deep_16bit.png")
    rgba = face.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    frames = [face.convert("P"), Image.new("RGB", face.size, "black").convert("P")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    face.transpose(Image.Transpose.ROTATE_90).save(folder / "exif_rotated.jpg", quality=92, exif=exif)
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    Image.fromarray(gradient).convert("RGB").save(folder / "no_face.png")
    profile_face(face).save(folder / "profile.jpg", quality=92)
    tiled(face, 6, 5, (256, 300)).save(folder / "thirty_faces.jpg", quality=90)
    face.save(folder / "plain.jpg", quality=92)
    if (SMOKE / "45-m7-di-ph.jpg").is_file():
        shutil.copy(SMOKE / "45-m7-di-ph.jpg", folder / "half_profile.jpg")
    return {name: expect for name, expect in EXPECTED.items() if (folder / name).exists()}
