"""Pictures of a result: the AU intensity bar chart (matplotlib, Agg) and the face overlay (PIL).

Both return PIL images, so a caller (the web app, a notebook, a report) never holds a live matplotlib figure.
Charts are drawn on a plain `matplotlib.figure.Figure` with the Agg canvas, never through pyplot: nothing is
registered in pyplot's global figure list (no leak, no "too many figures" warning), no GUI backend is touched,
and several threads can draw at once.
"""
from __future__ import annotations

import functools

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from . import facs
from .formats import MAX_INTENSITY, au_code

# Height at which a present AU is drawn when the format says only "present" (list, binary): 1 = FACS "trace",
# the least intensity that counts as present. The bar is hatched and the chart's title says so.
NOMINAL_PRESENT = 1.0

ACTIVE_COLOR = "#e4572e"
INACTIVE_COLOR = "#b8c2cc"
REGION_COLORS = {  # overlay colours of the face regions (RGB)
    "brows": (228, 87, 46), "eyes": (41, 128, 185), "nose": (142, 68, 173), "cheeks": (243, 156, 18),
    "mouth": (231, 76, 60), "chin": (39, 174, 96), "jaw": (22, 160, 133), "neck": (127, 140, 141),
}
CACHED_CHARTS = 16  # distinct bar charts kept drawn (~0.8 MB each)
BOX_COLORS = ((255, 200, 0), (0, 200, 255), (120, 255, 120), (255, 120, 255), (255, 255, 255))



# ----- bar chart ---------------------------------------------------------------------------------------
def chart_rows(result, carries_intensity: bool | None = None) -> list[dict]:
    """One row per AU the result reports, top of the face to bottom: label, region, present, value (bar
    length on the 0-5 scale), intensity (None when the format gives none) and whether the value is nominal."""
    if carries_intensity is None:
        carries_intensity = any(result.intensity.get(a) is not None for a in result.aus)
    rows = []
    for a in facs.sort_by_region(result.aus):
        present = bool(result.present[a])
        intensity = result.intensity.get(a)
        if carries_intensity and intensity is not None:
            value, nominal = float(intensity), False
        else:
            value, nominal = (NOMINAL_PRESENT if present else 0.0), True
        au = facs.AUS.get(a)
        rows.append({"au": a, "label": facs.au_label(a), "region": au.region if au else "",
                     "present": present, "value": min(float(MAX_INTENSITY), max(0.0, value)),
                     "intensity": intensity if carries_intensity else None, "nominal": nominal})
    return rows


def _figure_to_image(fig) -> Image.Image:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def intensity_chart(result, title: str = "", carries_intensity: bool | None = None,
                    dpi: int = 80) -> Image.Image:
    """Horizontal bar chart of every AU in `result` (an AUResult) on a fixed 0-5 axis.

    AUs run top to bottom in face-region order, labelled "AU12 lip corner puller"; present AUs are coloured
    and bold, absent ones grey. When the result carries no intensity (presence-only formats), present AUs are
    drawn hatched at the nominal height NOMINAL_PRESENT and the title says so."""
    rows = chart_rows(result, carries_intensity)
    for r in rows:
        r["text"] = "present" if r["nominal"] else f"{r['value']:.1f}"
    heading = f"{title or 'Action Units'} ({sum(r['present'] for r in rows)} active of {len(rows)})"
    axis = "FACS intensity (0 absent, 1 trace ... 5 maximum)"
    if all(r["nominal"] for r in rows):
        heading += (f"\npresence only (no intensity in this format): present AUs hatched at "
                    f"nominal height {NOMINAL_PRESENT:g}")
        axis = "presence only: no intensity is written in this format (a bar's length is not a level)"
    return _bar_chart(rows, MAX_INTENSITY, list(range(MAX_INTENSITY + 1)), axis, heading, dpi)


def probability_chart(probabilities: dict, title: str = "", threshold: float = 0.5, dpi: int = 80) -> Image.Image:
    """Bar chart of a probability per AU (the live mode's fast read-out) on a fixed 0-1 axis, in the same
    face-region order and labels as `intensity_chart`; AUs at or above `threshold` are highlighted."""
    rows = []
    for a in facs.sort_by_region(list(probabilities)):
        p = float(probabilities[a])
        au = facs.AUS.get(a)
        rows.append({"au": a, "label": facs.au_label(a), "region": au.region if au else "", "present": p >= threshold,
                     "value": min(1.0, max(0.0, p)), "nominal": False, "text": f"{p:.2f}"})
    heading = f"{title or 'Action Units'} ({sum(r['present'] for r in rows)} at p >= {threshold:g} of {len(rows)})"
    return _bar_chart(rows, 1.0, [0, 0.25, 0.5, 0.75, 1.0], "probability of 'present' read from the model",
                      heading, dpi, threshold=threshold)


def _bar_chart(rows, xmax, xticks, xlabel: str, heading: str, dpi: int, threshold: float | None = None):
    """The chart of `rows`, drawn once per distinct content: matplotlib needs ~0.25 s per chart here, and the
    live mode asks for the same chart frame after frame while the face's answer does not change."""
    key = (tuple(tuple(sorted(r.items())) for r in rows), xmax, tuple(xticks), xlabel, heading, dpi, threshold)
    return _drawn_chart(key).copy()  # a copy: callers may draw on what they get


@functools.lru_cache(maxsize=CACHED_CHARTS)
def _drawn_chart(key) -> Image.Image:
    rows, xmax, xticks, xlabel, heading, dpi, threshold = key
    return _draw_bar_chart([dict(r) for r in rows], xmax, list(xticks), xlabel, heading, dpi, threshold)


def forget_drawn_charts():
    """Drop the charts kept drawn (for a benchmark of the first draw)."""
    _drawn_chart.cache_clear()


def _draw_bar_chart(rows, xmax, xticks, xlabel: str, heading: str, dpi: int, threshold: float | None = None):
    height = 1.2 + 0.27 * len(rows)
    fig = Figure(figsize=(6.4, height), dpi=dpi)
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    colors = [ACTIVE_COLOR if r["present"] else INACTIVE_COLOR for r in rows]
    bars = ax.barh(y, [r["value"] for r in rows], color=colors, height=0.7,
                   edgecolor=[("#7a2410" if r["present"] else "none") for r in rows], linewidth=0.8)
    for bar, r in zip(bars, rows):
        if r["nominal"] and r["present"]:
            bar.set_hatch("///")
        if r["present"] or r["value"] > 0:
            ax.text(r["value"] + 0.012 * xmax, bar.get_y() + bar.get_height() / 2, r["text"], va="center",
                    fontsize=8, color="#222" if r["present"] else "#666")
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=8.5)
    for tick, r in zip(ax.get_yticklabels(), rows):
        tick.set_fontweight("bold" if r["present"] else "normal")
        tick.set_color("#111" if r["present"] else "#777")
    # thin separators and names of the face regions
    previous = None
    for index, r in enumerate(rows):
        if r["region"] != previous:
            if index:
                ax.axhline(index - 0.5, color="#ddd", linewidth=0.8)
            ax.text(xmax * 0.99, index - 0.42, r["region"], ha="right", va="top",
                    fontsize=7, color="#999", style="italic")
            previous = r["region"]
    if threshold is not None:
        ax.axvline(threshold, color="#888", linewidth=0.8, linestyle="--")
    ax.set_ylim(len(rows) - 0.5, -0.5)  # top of the face at the top
    ax.set_xlim(0, xmax)
    ax.set_xticks(xticks)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.grid(axis="x", color="#eee")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.suptitle(heading, x=0.02, y=1 - 0.08 / height, ha="left", va="top", fontsize=9)
    fig.subplots_adjust(left=0.40, right=0.97, top=1 - 0.75 / height, bottom=0.55 / height)
    return _figure_to_image(fig)


# ----- video time series --------------------------------------------------------------------------------
def au_time_series(rows: list[dict], aus, face_id=None, title: str = "", max_aus: int = 12,
                   dpi: int = 80) -> Image.Image:
    """AU curves over a video from batch rows (OpenFace columns): one small panel per AU that is active at
    least once, top of the face first, on the fixed 0-5 intensity scale (or 0/1 presence when the format
    writes no intensity). `face_id` picks one face; by default the face seen in most frames."""
    # rows as batch yields them or as read back from its CSV (every value a string)
    faces = [r for r in rows if str(r.get("success")) == "1" and str(r.get("face_id", "")) != ""]
    if not faces:
        return message_image("No face was analysed in this video.")
    if face_id is None:
        counts: dict = {}
        for r in faces:
            counts[str(r["face_id"])] = counts.get(str(r["face_id"]), 0) + 1
        face_id = max(counts, key=counts.get)
    track = sorted((r for r in faces if str(r["face_id"]) == str(face_id)), key=lambda r: float(r["timestamp"]))
    if not track:
        return message_image(f"face_id {face_id} does not appear in this video.")
    times = np.array([float(r["timestamp"]) for r in track])
    has_intensity = any(r.get(f"{au_code(a)}_r", "") != "" for r in track for a in aus)
    active = [a for a in facs.sort_by_region(aus) if any(str(r.get(f"{au_code(a)}_c")) == "1" for r in track)]
    if not active:
        return message_image(f"face_id {face_id}: no AU active in any of its {len(track)} frames.")
    shown = active[:max_aus]
    fig = Figure(figsize=(7.2, 0.9 + 0.62 * len(shown)), dpi=dpi)
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    for ax, a in zip(axes, shown):
        code = au_code(a)
        if has_intensity:
            values = np.array([float(r.get(f"{code}_r") or 0.0) for r in track])
            ax.set_ylim(0, MAX_INTENSITY)
            ax.set_yticks([0, MAX_INTENSITY])
        else:
            values = np.array([float(r.get(f"{code}_c") or 0) for r in track])
            ax.set_ylim(-0.05, 1.05)
            ax.set_yticks([0, 1])
        ax.fill_between(times, values, step="mid", color=ACTIVE_COLOR, alpha=0.35, linewidth=0)
        ax.step(times, values, where="mid", color=ACTIVE_COLOR, linewidth=1.2)
        ax.set_ylabel(facs.au_label(a), rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1].set_xlabel("time (s)", fontsize=8)
    scale = "intensity 0-5 as written by the model" if has_intensity else "presence as written by the model"
    more = f"; {len(active) - len(shown)} more AUs not shown" if len(active) > len(shown) else ""
    fig.suptitle(f"{title + ' - ' if title else ''}face_id {face_id}, {len(track)} frames, {scale}{more}",
                 x=0.02, ha="left", fontsize=9)
    fig.subplots_adjust(left=0.36, right=0.98, top=1 - 0.5 / fig.get_figheight(), bottom=0.5 / fig.get_figheight(),
                        hspace=0.35)
    return _figure_to_image(fig)


def message_image(text: str, size=(512, 160)) -> Image.Image:
    """A plain picture holding a short message (for an empty chart slot)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.multiline_text((12, 12), text, fill=(90, 90, 90), font=_font(16))
    return image


# ----- face overlay --------------------------------------------------------------------------------------
def _mid(points, a, b):
    return (points[a] + points[b]) / 2


def region_points(region: str, landmarks) -> list[np.ndarray]:
    """Landmark point groups (each an (n, 2) array in image coordinates) outlining a face region, from the
    dlib 68-point scheme: brows 17-26, eyes 36-47, nose 27-35, cheeks between eye and mouth corner, mouth
    48-67, chin 6-10, jaw 4-12; the neck is the band below the chin."""
    p = np.asarray(landmarks, dtype=float)
    if region == "brows":
        return [p[17:22], p[22:27]]
    if region == "eyes":
        return [p[36:42], p[42:48]]
    if region == "nose":
        return [p[27:36]]
    if region == "cheeks":
        left = np.stack([p[41], p[40], _mid(p, 31, 48), p[48], _mid(p, 2, 48), _mid(p, 1, 41)])
        right = np.stack([p[46], p[47], _mid(p, 35, 54), p[54], _mid(p, 14, 54), _mid(p, 15, 46)])
        return [left, right]
    if region == "mouth":
        return [p[48:60]]
    if region == "chin":
        return [np.concatenate([p[6:11], p[56:59]])]
    if region == "jaw":
        return [p[4:13]]
    if region == "neck":
        face_height = np.linalg.norm(p[8] - p[27])
        drop = np.array([0.0, 0.35 * face_height])
        return [np.stack([p[6], p[10], p[10] + drop, p[6] + drop])]
    raise ValueError(f"unknown face region {region!r}")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def display_scale(width: int, height: int, max_side: int = 1024) -> float:
    """The factor that fits an image into max_side pixels (never enlarges)."""
    return min(1.0, max_side / max(width, height, 1))


def _hull(points: np.ndarray) -> list[tuple[float, float]]:
    """Convex hull (monotone chain) of 2-D points, as a polygon."""
    pts = sorted(set(map(tuple, np.round(points, 2))))
    if len(pts) <= 2:
        return pts

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for q in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], q) <= 0:
            lower.pop()
        lower.append(q)
    for q in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], q) <= 0:
            upper.pop()
        upper.append(q)
    return lower[:-1] + upper[:-1]


def _grow(polygon, amount: float):
    """The polygon pushed outwards from its centroid by `amount` pixels (a margin around thin regions)."""
    poly = np.asarray(polygon, dtype=float)
    centre = poly.mean(axis=0)
    offsets = poly - centre
    norms = np.linalg.norm(offsets, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return [tuple(q) for q in poly + offsets / norms * amount]


def face_overlay(image, faces, selected: int | None = 0, active_aus=(), max_side: int = 1024,
                 show_landmarks: bool = True) -> Image.Image:
    """The image with every face's numbered box; for the selected face its 68 landmarks and the regions of
    its active AUs shaded and labelled with their AU codes. `image` is an RGB array or a PIL image; `faces`
    have .index, .box (x0, y0, x1, y1) and .landmarks (68, 2) in image coordinates. Large images are
    downscaled to `max_side` for display."""
    base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    base = base.convert("RGB")
    scale = display_scale(*base.size, max_side=max_side)
    if scale < 1:
        base = base.resize((max(1, round(base.width * scale)), max(1, round(base.height * scale))),
                           Image.BILINEAR)
    line = max(2, round(max(base.size) / 300))
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    shade = ImageDraw.Draw(layer)
    draw = ImageDraw.Draw(base)
    label_font = _font(max(12, round(max(base.size) / 40)))
    small_font = _font(max(10, round(max(base.size) / 60)))

    chosen = None
    for position, face in enumerate(faces):
        x0, y0, x1, y1 = (float(v) * scale for v in face.box)
        is_selected = selected is not None and face.index == selected
        color = BOX_COLORS[0] if is_selected else BOX_COLORS[1 + position % (len(BOX_COLORS) - 1)]
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line + (1 if is_selected else 0))
        tag = str(face.index + 1)
        tag_height = draw.textbbox((0, 0), tag, font=label_font)[3]
        tx, ty = x0, max(0.0, y0 - tag_height - 6)
        text_box = draw.textbbox((tx + 4, ty), tag, font=label_font)
        draw.rectangle((text_box[0] - 4, text_box[1] - 2, text_box[2] + 4, text_box[3] + 2), fill=color)
        draw.text((tx + 4, ty), tag, fill=(0, 0, 0), font=label_font)
        if is_selected:
            chosen = face

    if chosen is not None:
        points = np.asarray(chosen.landmarks, dtype=float) * scale
        face_size = max(chosen.box[2] - chosen.box[0], chosen.box[3] - chosen.box[1]) * scale
        by_region: dict[str, list[int]] = {}
        for a in active_aus:
            au = facs.AUS.get(a)
            if au:
                by_region.setdefault(au.region, []).append(a)
        for region, aus in by_region.items():
            color = REGION_COLORS.get(region, (255, 255, 255))
            groups = region_points(region, points)
            for group in groups:
                polygon = _grow(_hull(group), max(3.0, face_size * 0.03))
                if len(polygon) >= 3:
                    shade.polygon(polygon, fill=color + (80,), outline=color + (230,), width=max(1, line - 1))
            anchor = groups[-1].max(axis=0)  # right/bottom edge of the last group
            top = groups[-1][:, 1].min()
            codes = " ".join(au_code(a) for a in sorted(aus))
            box = shade.textbbox((anchor[0] + 4, top), codes, font=small_font)
            shade.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(255, 255, 255, 200))
            shade.text((anchor[0] + 4, top), codes, fill=color + (255,), font=small_font)
        if show_landmarks:
            radius = max(1.0, face_size / 120)
            for x, y in points:
                shade.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(0, 255, 120, 230))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
