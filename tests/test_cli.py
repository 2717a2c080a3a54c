"""`python -m aullava analyze` on real photos with the embedded checkpoint."""
import json

import pytest

from aullava.service import DEFAULT_CHECKPOINT
from conftest import SMOKE, needs

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_dir(), reason="no embedded checkpoint")


@needs(SMOKE)
def test_analyze_reports_every_face_and_keeps_going_past_bad_files(capsys, tmp_path):
    from aullava.cli import main

    fake = tmp_path / "notes.jpg"
    fake.write_text("this is a text file")
    code = main(["analyze", str(SMOKE / "single_face.jpg"), str(fake), str(SMOKE / "free-mountain-vector-01.jpg"),
                 "--format", "json", "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [line["image"].split("/")[-1] for line in lines] == ["single_face.jpg", "notes.jpg", "free-mountain-vector-01.jpg"]
    face = lines[0]["faces"][0]
    assert face["face"] == 1  # as the page names it; only the OpenFace-style rows' face_id counts from 0
    assert face["choice_probabilities"] and all(0 < p <= 1 for p in face["choice_probabilities"])
    assert face["parse_error"] is None and face["text"].startswith('{"active": [')
    assert set(face["aus"]) == {f"AU{a:02d}" for a in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27)}
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= 572 and 0 <= y0 < y1 <= 562
    points = face["landmarks"]  # dlib's 68, in the photo's pixels: around the box
    assert len(points) == 68 and all(x0 - 20 <= x <= x1 + 20 and y0 - 20 <= y <= y1 + 20 for x, y in points)
    assert "not an image" in err and "No face was found" in err
    notes = next(line for line in err.splitlines() if "not an image" in line)
    assert notes.count("notes.jpg") == 1, notes  # the file named once, not "path: path is ..."


@needs(SMOKE)
def test_analyze_a_folder_to_openface_style_csv_keeps_every_image(capsys, tmp_path):
    import shutil

    import pandas as pd

    from aullava.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SMOKE / "single_face.jpg", folder / "a_face.jpg")
    shutil.copy(SMOKE / "free-mountain-vector-01.jpg", folder / "b_mountain.jpg")
    (folder / "c_notes.jpg").write_text("this is a text file")
    (folder / "readme.txt").write_text("not an image suffix: skipped")
    out, lines = tmp_path / "aus.csv", tmp_path / "aus.jsonl"
    code = main(["analyze", str(folder), "--format", "intensity", "--csv", str(out), "--jsonl", str(lines)])
    err = capsys.readouterr().err
    assert code == 1  # two images gave no result; the summary says which
    table = pd.read_csv(out)
    assert list(table["file"].map(lambda p: p.split("/")[-1])) == ["a_face.jpg", "b_mountain.jpg", "c_notes.jpg"]
    assert list(table["success"]) == [1, 0, 0] and list(table["frame"]) == [1, 2, 3]
    assert "No face" in table["reason"][1] and "not an image" in table["reason"][2]
    for column in ("face_id", "timestamp", "confidence", "AU01_r", "AU12_r", "AU27_r", "AU01_c", "AU12_c", "AU27_c"):
        assert column in table.columns
    face = table.iloc[0]
    assert face["face_id"] == 0  # OpenFace's count
    assert face["AU12_c"] in (0, 1) and 0 <= face["AU12_r"] <= 5
    assert (face["AU12_c"] == 1) == (face["AU12_r"] > 0)
    assert len(lines.read_text().splitlines()) == 3
    assert "3 image(s), 1 face(s) analysed, 2 without a result" in err
    assert "skipped 1 folder entry" in err and "readme.txt" in err
    assert face["face_width"] > 50 and face["face_height"] > 50 and face["face_x"] >= 0
    xs, ys = face[[f"x_{i}" for i in range(68)]], face[[f"y_{i}" for i in range(68)]]  # OpenFace's 2D landmarks
    assert xs.between(face["face_x"] - 20, face["face_x"] + face["face_width"] + 20).all()
    assert ys.between(face["face_y"] - 20, face["face_y"] + face["face_height"] + 20).all()
    assert ys["y_8"] > ys["y_27"]  # the chin below the top of the nose
    assert table["x_0"][1:].isna().all()  # no face, no landmarks


@needs(SMOKE)
def test_analyze_csv_dash_writes_the_rows_to_standard_output(capsys, tmp_path, monkeypatch):
    import io

    import pandas as pd

    from aullava.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["analyze", str(SMOKE / "single_face.jpg"), "--format", "list", "--csv", "-"])
    out, err = capsys.readouterr()
    assert code == 0 and not (tmp_path / "-").exists()
    table = pd.read_csv(io.StringIO(out))  # nothing but the rows on stdout: it can be piped
    assert len(table) == 1 and table["success"][0] == 1 and "AU12_c" in table.columns
    assert "1 image(s), 1 face(s) analysed" in err
