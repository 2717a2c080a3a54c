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
    assert face["parse_error"] is None and face["text"].startswith('{"active": [')
    assert set(face["aus"]) == {f"AU{a:02d}" for a in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27)}
    x0, y0, x1, y1 = face["box"]
    assert 0 <= x0 < x1 <= 572 and 0 <= y0 < y1 <= 562
    assert "not an image" in err and "No face was found" in err
