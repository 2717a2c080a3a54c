"""`python -m aullava bench`: where the time goes when a photo is analysed, and how it grows.

Measures, on this machine: cold start (importing the package in a fresh interpreter), model load, the
median time of every stage for one photo (decode, detect, landmarks, align, encode, generate per format,
parse, chart), tokens fed per second while writing, the fast presence read-out of the live mode,
end-to-end analyse per format, peak RSS; and end-to-end list time as faces per image (1, 5, 10) and image
size (VGA, 1080p, 4K) grow. Prints a table and writes JSON. Figures, not pass/fail: run it alone on the
machine (a second busy process doubles every figure on 2 cores).
"""
from __future__ import annotations

import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = {"VGA": (640, 480), "1080p": (1920, 1080), "4K": (3840, 2160)}
FACE_COUNTS = (1, 5, 10)


def sample_photo() -> Path:
    """matplotlib's public-domain portrait of Grace Hopper, shipped with the package."""
    import matplotlib.cbook

    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def on_canvas(photo: Image.Image, size: tuple[int, int], faces: int = 1) -> Image.Image:
    """`faces` copies of the photo side by side, scaled to fill a mid-grey canvas of `size` (w, h)."""
    width, height = size
    columns = int(np.ceil(np.sqrt(faces * width / height)))
    rows = int(np.ceil(faces / columns))
    cell_w, cell_h = width // columns, height // rows
    scale = min(cell_w / photo.width, cell_h / photo.height)
    tile = photo.resize((max(1, int(photo.width * scale)), max(1, int(photo.height * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", size, (128, 128, 128))
    for index in range(faces):
        row, column = divmod(index, columns)
        canvas.paste(tile, (column * cell_w + (cell_w - tile.width) // 2, row * cell_h + (cell_h - tile.height) // 2))
    return canvas


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def cold_start_seconds() -> float:
    """Importing the serving path in a fresh interpreter."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import aullava.service, aullava.model, aullava.face"], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
    return time.perf_counter() - started


def stage_times(analyzer, photo_bytes: bytes, formats, repeats: int) -> dict:
    """Median seconds of each stage for one photo, and tokens per second while writing each format."""
    import torch

    from . import formats as fmt_lib
    from .encoders import face_tensors
    from .face import align_face, landmarks_in_box, load_image, to_gray
    from .plots import forget_drawn_charts, intensity_chart

    detector, model = analyzer.detector, analyzer.model
    out: dict = {}
    out["decode"], rgb = _median_seconds(lambda: load_image(io.BytesIO(photo_bytes)), repeats)
    gray = to_gray(rgb)
    out["detect"], found = _median_seconds(lambda: detector.find_boxes(rgb, gray), repeats)
    if not found:
        raise RuntimeError("no face found in the benchmark photo")
    box = max(found, key=lambda item: (item[0][2] - item[0][0]) * (item[0][3] - item[0][1]))[0]
    out["landmarks"], landmarks = _median_seconds(lambda: landmarks_in_box(gray, box), repeats)
    out["align"], (chip, chip_landmarks) = _median_seconds(
        lambda: align_face(gray, landmarks, model.config.chip_size), repeats)
    chip_t, landmarks_t = (t.unsqueeze(0) for t in face_tensors(chip, chip_landmarks))
    with torch.no_grad():
        out["encode"], _ = _median_seconds(lambda: model.image_embeddings(chip_t, landmarks_t), repeats)
    out["read_presence"], _ = _median_seconds(lambda: model.read_presence(chip_t, landmarks_t), repeats)
    for name in formats:
        fmt = fmt_lib.get_format(name)
        model.warm([name])
        seconds, generation = _median_seconds(lambda: model.generate(chip_t, landmarks_t, name)[0], repeats)
        out[f"generate_plain_{name}"], plain = _median_seconds(
            lambda: model.generate(chip_t, landmarks_t, name, speculate=False)[0], repeats)
        out[f"same_text_{name}"] = plain.text == generation.text  # the draft changes the cost, not the answer
        parse_seconds, result = _median_seconds(lambda: fmt.parse(generation.text, model.config.aus), repeats)
        tokens = len(model.answer_ids(name, result))
        out[f"generate_{name}"] = seconds
        out[f"parse_{name}"] = parse_seconds
        out[f"tokens_{name}"] = tokens
        out[f"tokens_per_second_{name}"] = tokens / seconds
        out[f"text_{name}"] = generation.text
    result = fmt_lib.get_format(formats[0]).parse(out[f"text_{formats[0]}"], model.config.aus)
    def first_draw():
        forget_drawn_charts()
        return intensity_chart(result)

    out["chart"], _ = _median_seconds(first_draw, repeats)  # drawn anew: a chart seen before is reused
    out["chart_drawn_before"], _ = _median_seconds(lambda: intensity_chart(result), repeats)
    return out


def end_to_end(analyzer, photo_bytes: bytes, format_name: str, repeats: int) -> tuple[float, int]:
    """Median seconds of `Analyzer.analyze` (decode to parsed answer, every face) and the faces found."""
    seconds, outcome = _median_seconds(lambda: analyzer.analyze(io.BytesIO(photo_bytes), format_name), repeats)
    return seconds, len(outcome.faces)


def run(checkpoint: str | None = None, image: str | None = None, formats=("list", "binary", "json"),
        repeats: int = 5, scaling: bool = True, merge: bool = False, log=print) -> dict:
    from .llm import run_on_torch_thread
    from .service import Analyzer

    report: dict = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)),
                    "python": platform.python_version()}
    import torch

    report["torch"] = torch.__version__
    report["cold_start_import"] = cold_start_seconds()
    log(f"cold start (imports): {report['cold_start_import']:.2f} s")
    started = time.perf_counter()
    analyzer = Analyzer(checkpoint, merge=merge)
    report["model_load"] = time.perf_counter() - started
    report["lora"] = ("merged away (--merge)" if merge else
                      "merged in place, switchable (as the app runs)" if analyzer.model.lora_merged else "unmerged")
    report["checkpoint"] = str(analyzer.checkpoint)
    report["dtype"] = str(analyzer.model.llm_dtype)
    log(f"model load: {report['model_load']:.2f} s ({analyzer.checkpoint}, {report['dtype']}, "
        f"LoRA {report['lora']})")

    photo = Image.open(image or sample_photo()).convert("RGB")
    vga = _jpeg_bytes(on_canvas(photo, SIZES["VGA"]))
    started = time.perf_counter()
    analyzer.analyze(io.BytesIO(vga), formats[0])
    report["first_analyze"] = time.perf_counter() - started  # includes computing the prompt prefix once
    log(f"first analyse ({formats[0]}, computes the cached prompt prefix): {report['first_analyze']:.2f} s")

    report["stages"] = run_on_torch_thread(stage_times, analyzer, vga, formats, repeats)  # where the model runs
    report["end_to_end_vga"] = {}
    for name in formats:
        report["end_to_end_vga"][name], _ = end_to_end(analyzer, vga, name, repeats)
    if scaling:
        report["faces_per_image"] = {}
        for n in FACE_COUNTS:
            seconds, found = end_to_end(analyzer, _jpeg_bytes(on_canvas(photo, SIZES["1080p"], n)), "list",
                                        max(1, repeats // 2))
            report["faces_per_image"][str(n)] = {"seconds": seconds, "faces_found": found}
        report["image_size"] = {}
        for label, size in SIZES.items():
            seconds, found = end_to_end(analyzer, _jpeg_bytes(on_canvas(photo, size)), "list", max(1, repeats // 2))
            report["image_size"][label] = {"seconds": seconds, "faces_found": found}
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(format_report(report))
    return report


def write_photo_folder(photo: Image.Image, folder: Path, count: int) -> list[Path]:
    """`count` VGA JPEGs of the photo, each a little different (mirror, shift, brightness), as a lab's folder."""
    from PIL import ImageEnhance, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        variant = ImageOps.mirror(photo) if index % 2 else photo
        variant = ImageEnhance.Brightness(variant).enhance(0.8 + 0.4 * ((index * 7) % 10) / 10)
        canvas = on_canvas(variant, SIZES["VGA"]).rotate(0, translate=((index % 5) * 8 - 16, 0), fillcolor=(128,) * 3)
        path = folder / f"photo_{index:04d}.jpg"
        canvas.save(path, quality=90)
        paths.append(path)
    return paths


def write_video(photo: Image.Image, path: Path, seconds: float, rate: int = 25) -> Path:
    """An H.264/MPEG-4 VGA video of the photo drifting sideways, encoded by FFmpeg through PyAV."""
    import av

    base = on_canvas(photo, SIZES["VGA"])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = base.width, base.height, "yuv420p"
        for index in range(int(seconds * rate)):
            frame = base.rotate(0, translate=(int(20 * np.sin(index / 12)), 0), fillcolor=(128,) * 3)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def batch_throughput(analyzer, photo: Image.Image, folder: Path, images: int = 200, video_seconds: float = 30,
                     fps: float = 5.0, format_name: str = "list", log=print) -> dict:
    """Items per second of `analyze --csv` on a folder of `images` photos and on a `video_seconds` video
    sampled at `fps`, rows written to CSV as the command line does."""
    from .batch import analyze_batch

    report = {"format": format_name}
    if images:
        write_photo_folder(photo, folder / "photos", images)
        started = time.perf_counter()
        summary = analyze_batch(analyzer, [folder / "photos"], format_name, folder / "photos.csv", progress=False)
        seconds = time.perf_counter() - started
        report["images"] = {"count": summary.images, "faces": summary.faces, "failed": len(summary.failed),
                            "seconds": seconds, "per_second": summary.images / seconds}
        log(f"{summary.images} photos: {seconds:.1f} s, {summary.images / seconds:.2f} images/s")
    if video_seconds:
        video = write_video(photo, folder / "clip.mp4", video_seconds)
        started = time.perf_counter()
        summary = analyze_batch(analyzer, [video], format_name, folder / "video.csv", progress=False, fps=fps)
        seconds = time.perf_counter() - started
        report["video"] = {"seconds_of_video": video_seconds, "sampled_fps": fps, "frames": summary.video_frames,
                           "faces": summary.faces, "failed": len(summary.failed), "seconds": seconds,
                           "frames_per_second": summary.video_frames / seconds,
                           "video_seconds_per_second": video_seconds / seconds}
        log(f"{video_seconds:g} s video at {fps:g} frames/s: {summary.video_frames} frames in {seconds:.1f} s, "
            f"{summary.video_frames / seconds:.2f} frames/s ({video_seconds / seconds:.2f}x real time)")
    return report


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_report(report: dict) -> str:
    lines = [f"aullava bench {report['date']} on {report['cpu']} ({report['cores']} cores), torch {report['torch']}, "
             f"{report['dtype']}, LoRA {report.get('lora')}",
             "stage medians for one VGA photo (ms; generate_plain_*: without the encoder head's draft):"]
    stages = report["stages"]
    for key, value in stages.items():
        if key.startswith(("text_", "tokens_", "same_text_")):
            continue
        lines.append(f"  {key:<22} {value * 1000:9.1f}")
    for key, value in stages.items():
        if key.startswith("tokens_per_second_"):
            name = key.removeprefix("tokens_per_second_")
            same = "" if stages.get("same_text_" + name, True) else " (DIFFERS from plain decoding)"
            lines.append(f"  {name:<10} {stages['tokens_' + name]:4d} tokens, {value:6.1f} tokens/s: "
                         f"{stages['text_' + name][:60]}{same}")
    lines.append("end-to-end analyse of the VGA photo (median s): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in report["end_to_end_vga"].items()))
    for key, label in (("faces_per_image", "faces per 1080p image"), ("image_size", "image size")):
        if key in report:
            lines.append(f"{label} (list, s): " + ", ".join(
                f"{k}: {v['seconds']:.3f} ({v['faces_found']} found)" for k, v in report[key].items()))
    lines.append(f"cold start {report['cold_start_import']:.2f} s, model load {report['model_load']:.2f} s, "
                 f"first analyse {report['first_analyze']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def main(args) -> int:
    if args.batch:
        import tempfile

        from .service import Analyzer

        analyzer = Analyzer(args.checkpoint)
        photo = Image.open(args.image or sample_photo()).convert("RGB")
        with tempfile.TemporaryDirectory() as folder:
            report = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)),
                      **batch_throughput(analyzer, photo, Path(folder), args.batch_images, args.video_seconds,
                                         args.video_fps, args.formats[0])}
    else:
        report = run(args.checkpoint, args.image, tuple(args.formats), args.repeats, not args.no_scaling, args.merge)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"written {args.out}")
    return 0
