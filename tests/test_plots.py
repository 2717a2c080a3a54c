"""The AU chart and the face overlay (aullava.plots): pure, no model."""
import matplotlib
import numpy as np
import pytest
from PIL import Image

from aullava import facs, plots
from aullava.formats import AUResult

AUS = (1, 2, 4, 6, 12, 15, 25, 26)


class FakeFace:
    def __init__(self, index, box, landmarks):
        self.index, self.box, self.landmarks = index, box, landmarks


def mean_face(x0=100.0, y0=80.0, side=200.0):
    """A face: dlib's mean 68-point shape placed in a box."""
    from aullava.face import DLIB_MEAN_SHAPE

    return FakeFace(0, (x0, y0, x0 + side, y0 + side), DLIB_MEAN_SHAPE * side + (x0, y0))


def test_rows_follow_face_regions_and_label_every_au():
    result = AUResult.from_active(AUS, [12, 1], {12: 3.4, 1: 1.0})
    rows = plots.chart_rows(result, carries_intensity=True)
    assert [r["au"] for r in rows] == facs.sort_by_region(AUS)
    assert [r["label"] for r in rows][:2] == ["AU01 inner brow raiser", "AU02 outer brow raiser"]
    regions = [facs.REGIONS.index(r["region"]) for r in rows]
    assert regions == sorted(regions)
    by_au = {r["au"]: r for r in rows}
    assert by_au[12]["value"] == pytest.approx(3.4) and by_au[12]["present"] and not by_au[12]["nominal"]
    assert by_au[4]["value"] == 0 and not by_au[4]["present"]


def test_presence_only_results_use_the_nominal_height():
    result = AUResult.from_active(AUS, [6, 12])  # no intensity: list / binary formats
    rows = {r["au"]: r for r in plots.chart_rows(result)}
    assert rows[6]["value"] == plots.NOMINAL_PRESENT and rows[6]["nominal"] and rows[6]["intensity"] is None
    assert rows[1]["value"] == 0


def test_intensity_beyond_the_scale_is_clipped_to_the_fixed_axis():
    result = AUResult(AUS, {a: a == 12 for a in AUS}, {a: (5.0 if a == 12 else 0.0) for a in AUS})
    assert max(r["value"] for r in plots.chart_rows(result)) == 5.0


def test_chart_is_an_image_of_fixed_size_and_leaves_no_figure_open():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    one = plots.intensity_chart(AUResult.from_active(AUS, [12], {12: 2.0}), title="Face 1")
    two = plots.intensity_chart(AUResult.from_active(AUS, [1, 2, 26]), title="Face 1")
    assert isinstance(one, Image.Image) and one.mode == "RGB"
    assert one.size == two.size  # same AU set -> same picture size, so two images compare
    assert plt.get_fignums() == before
    assert matplotlib.get_backend()  # never switched to a GUI backend by plots
    pixels = np.asarray(one)
    red = (abs(pixels[..., 0].astype(int) - 0xE4) < 20) & (pixels[..., 1] < 120) & (pixels[..., 2] < 90)
    assert red.sum() > 100  # the active bar is drawn in the highlight colour


def test_region_points_cover_every_region():
    face = mean_face()
    for region in facs.REGIONS:
        groups = plots.region_points(region, face.landmarks)
        assert groups and all(g.shape[1] == 2 and len(g) >= 3 for g in groups)
    with pytest.raises(ValueError):
        plots.region_points("ears", face.landmarks)


def test_overlay_marks_boxes_landmarks_and_active_regions():
    image = np.full((400, 500, 3), 128, dtype=np.uint8)
    face = mean_face()
    second = FakeFace(1, (350.0, 100.0, 450.0, 200.0), np.asarray(face.landmarks) * 0.5 + (300, 60))
    plain = np.asarray(plots.face_overlay(image, [face, second], selected=0, active_aus=(), show_landmarks=False))
    marked = np.asarray(plots.face_overlay(image, [face, second], selected=0, active_aus=(12, 1)))
    assert plain.shape == marked.shape == image.shape
    x0, y0, x1, y1 = (int(v) for v in face.box)
    assert (plain[y0, x0 + 20] != 128).any()  # the box outline
    mouth = np.asarray(face.landmarks)[48:60].mean(axis=0).astype(int)
    assert (marked[mouth[1], mouth[0]] != plain[mouth[1], mouth[0]]).any()  # the mouth region is shaded


def test_overlay_downscales_large_images():
    image = Image.new("RGB", (4000, 3000), "gray")
    face = mean_face(1000, 800, 1200)
    out = plots.face_overlay(image, [face], selected=0, active_aus=(6,), max_side=800)
    assert max(out.size) == 800


def test_the_same_chart_is_drawn_once_and_handed_out_as_a_copy():
    aus = (1, 2, 6, 12)
    smile = AUResult.from_active(aus, [6, 12], {6: 2.0, 12: 3.0})
    plots._drawn_chart.cache_clear()
    first = plots.intensity_chart(smile, title="t")
    first.paste((0, 0, 0), (0, 0, 50, 50))  # a caller drawing on its picture changes no later one
    second = plots.intensity_chart(smile, title="t")
    assert plots._drawn_chart.cache_info().hits == 1 and plots._drawn_chart.cache_info().misses == 1
    assert np.asarray(second)[:50, :50].max() > 0
    stronger = plots.intensity_chart(AUResult.from_active(aus, [6, 12], {6: 2.0, 12: 4.0}), title="t")
    assert plots._drawn_chart.cache_info().misses == 2
    assert not np.array_equal(np.asarray(stronger), np.asarray(second))
