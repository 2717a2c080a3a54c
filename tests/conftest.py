import csv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SMOKE = SHARED / "smoke"
CKPLUS = SHARED / "ckplus48"


def grace_hopper_path() -> str:
    import matplotlib.cbook

    return str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="session")
def grace_hopper():
    return grace_hopper_path()


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory):
    """Six labelled faces made from the public-domain grace_hopper photo (crops, mirror, brightness)."""
    from PIL import Image, ImageOps, ImageEnhance

    folder = tmp_path_factory.mktemp("tiny_manifest")
    image = Image.open(grace_hopper_path()).convert("RGB")
    variants = [image, ImageOps.mirror(image), ImageEnhance.Brightness(image).enhance(0.7),
                image.crop((20, 0, 500, 500)), image.rotate(8), ImageOps.grayscale(image).convert("RGB")]
    labels = ["1;2;25", "6;12", "", "4;7", "1;2;25", "6;12;25"]
    rows = []
    for i, (variant, aus) in enumerate(zip(variants, labels)):
        name = f"images/face{i}.png"
        (folder / "images").mkdir(exist_ok=True)
        variant.save(folder / name)
        rows.append({"path": name, "subject": f"S{i % 3}", "sequence": "001", "frame": str(i),
                     "kind": "neutral" if not aus else "peak", "emotion": "", "aus": aus,
                     "intensities": "12:3" if "12" in aus else ""})
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (shared data not on this machine)")


def write_video(path, image, seconds=3, rate=10, size=(256, 320)):
    """An mp4 of `image` drifting sideways, encoded by FFmpeg through PyAV (as a camera file would be)."""
    import av
    import numpy as np
    from PIL import Image

    image = image.convert("RGB").resize(size)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.gop_size = 5
        for i in range(seconds * rate):
            frame = Image.new("RGB", size)
            frame.paste(image, (int(6 * np.sin(i / 5)), 0))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts several processes (about a minute or two); -m 'not slow' skips it")


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """app.py serving the embedded checkpoint on localhost, one for every module that asks (see app_server.py)."""
    from app_server import running_app

    checkpoint = REPO / "assets" / "aullava-ckplus"
    if not (checkpoint / "aullava_config.json").is_file():
        pytest.skip("no embedded checkpoint")
    with running_app(str(checkpoint), tmp_path_factory.mktemp("app") / "app.log") as app:
        yield app
