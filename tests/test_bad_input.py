"""The bad-input battery (bad_inputs.py) through the Python API, the CLI, the page functions and the running
app; plus broken manifests and checkpoints. Every case gives a plain message and a result, never a crash, and
a batch keeps every good item."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aullava.face import FaceDetector, FaceError
from aullava.service import DEFAULT_CHECKPOINT
from bad_inputs import EXPECTED, make_battery
from conftest import REPO

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_dir(), reason="no embedded checkpoint")
GOOD = [name for name, expect in EXPECTED.items() if expect.good]
BAD = [name for name, expect in EXPECTED.items() if not expect.good]


@pytest.fixture(scope="module")
def battery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("battery")
    return folder, make_battery(folder)


@pytest.fixture(scope="module")
def analyzer():
    from aullava.service import get_analyzer

    return get_analyzer()  # the one cli.main uses too


def case(battery, name):
    folder, cases = battery
    if name not in cases:
        pytest.skip(f"{name} needs the shared smoke data")
    return folder / name, cases[name]


# ----- Python API ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BAD)
def test_api_refuses_a_bad_input_with_a_sentence(battery, analyzer, name):
    path, expect = case(battery, name)
    with pytest.raises(FaceError) as caught:
        analyzer.analyze(path, "list")
    message = str(caught.value)
    assert expect.words in message and "Traceback" not in message and len(message) < 300
    with pytest.raises(FaceError, match=expect.words.split("(")[0].strip()):
        FaceDetector().detect(path)


@pytest.mark.parametrize("name", GOOD)
def test_api_reads_every_face_of_an_odd_but_good_input(battery, analyzer, name):
    path, expect = case(battery, name)
    outcome = analyzer.analyze(path, "list")
    assert len(outcome.faces) >= expect.faces
    for face in outcome.faces:
        assert face.error is None and face.result is not None and face.text


# ----- the page's functions (app.analyse with this process's analyser) -----------------------------------
@pytest.fixture
def page(analyzer, monkeypatch):
    import app
    from aullava import demo

    monkeypatch.setattr(demo, "_analyzer", analyzer)
    return app


@pytest.mark.parametrize("name", BAD)
def test_page_shows_a_plain_sentence_and_empty_outputs(battery, page, name):
    path, expect = case(battery, name)
    status, text, chart, overlay, _, hint, result, downloads, session = page.analyse(str(path), "list")
    assert expect.words.split("(")[0].strip() in status
    assert str(path.parent) not in status  # the server-side folder is not shown
    assert (text, chart, overlay, result, downloads, session) == ("", None, None, None, None, None)


def test_page_describes_at_most_ten_of_thirty_faces(battery, page):
    path, _ = case(battery, "thirty_faces.jpg")
    status, text, chart, overlay, choice, hint, result, downloads, session = page.analyse(str(path), "list")
    assert status.startswith("Found 30 faces; the model answered for the 10 largest in")
    assert len(result["faces"]) == 10 and len(session.faces) == 30
    assert choice["choices"][-1] == "Face 10" and overlay.size[0] > 200


def test_page_reads_an_exif_rotated_photo(battery, page):
    path, _ = case(battery, "exif_rotated.jpg")
    status, *_, result, downloads, session = page.analyse(str(path), "list")
    assert status.startswith("Found 1 face") and result["image_size"] == [512, 600]


# ----- CLI -----------------------------------------------------------------------------------------------
def run_cli(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               AULLAVA_THREADS=os.environ.get("AULLAVA_THREADS", "1"))
    return subprocess.run([sys.executable, "-m", "aullava", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_batch_to_csv_keeps_every_good_item(battery, tmp_path):
    folder, cases = battery
    out = tmp_path / "aus.csv"
    done = run_cli("analyze", folder, "--format", "list", "--csv", out)
    assert done.returncode == 1, done.stderr[-2000:]  # some images gave no result, and the summary says so
    assert "Traceback" not in done.stderr
    rows = list(csv.DictReader(out.open()))
    by_file = {}
    for row in rows:
        by_file.setdefault(Path(row["file"]).name, []).append(row)
    images = [name for name in cases if Path(name).suffix != ".eps"]  # not an image suffix: not listed
    assert sorted(by_file) == sorted(images)
    for name in images:
        expect, found = cases[name], by_file[name]
        if expect.good:
            assert len(found) >= expect.faces and all(r["success"] == "1" and r["text"] for r in found), name
        else:
            assert len(found) == 1 and found[0]["success"] == "0", name
            assert expect.words.split("(")[0].strip() in found[0]["reason"], (name, found[0]["reason"])
    bad = sum(1 for name in images if not cases[name].good)
    assert f"{len(images)} image(s)" in done.stderr and f"{bad} without a result" in done.stderr


def test_cli_text_mode_keeps_going_past_bad_files(battery, analyzer, capsys):
    from aullava.cli import main

    folder, _ = battery
    names = ["empty.jpg", "plain.jpg", "truncated.jpg", "bomb.png", "cmyk.jpg"]
    code = main(["analyze", *(str(folder / n) for n in names), "--json"])
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and [Path(line["image"]).name for line in lines] == names
    assert [bool(line.get("faces")) for line in lines] == [False, True, False, False, True]
    assert "empty file" in err and "truncated or corrupt" in err and "megapixel" in err


# ----- manifests for evaluate and train --------------------------------------------------------------------
def write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_without_columns_is_refused_before_any_model_loads(battery, tmp_path, capsys):
    from aullava.cli import main

    folder, _ = battery
    manifest = write_manifest(tmp_path / "m.csv", [{"path": str(folder / "plain.jpg"), "subject": "S1"}])
    for command in (["evaluate", "--manifest", manifest, "--out", tmp_path / "r.json"],
                    ["train", "--manifest", manifest, "--out", tmp_path / "run", "--tiny"]):
        assert main(list(map(str, command))) == 2
        err = capsys.readouterr().err
        assert "lacks column(s) aus" in err and "Traceback" not in err


def test_train_with_only_missing_images_says_so(tmp_path, capsys):
    from aullava.cli import main

    manifest = write_manifest(tmp_path / "m.csv", [{"path": f"gone{i}.jpg", "subject": "S1", "aus": "12", "kind": "peak"}
                                                   for i in range(3)])
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--tiny"]) == 2
    out, err = capsys.readouterr()
    assert "none of the 3 training images" in err and "gone0.jpg" in err and "--images-root" in err


def test_evaluate_counts_missing_images_and_keeps_the_others(battery, analyzer, tmp_path):
    from aullava.evaluate import evaluate

    folder, _ = battery
    rows = [{"path": str(folder / name), "subject": "S1", "aus": "6;12", "kind": "peak"}
            for name in ("plain.jpg", "missing.jpg", "notes.jpg", "cmyk.jpg")]
    predictions = []
    report = evaluate(analyzer, write_manifest(tmp_path / "m.csv", rows), formats=("list",), progress=False,
                      predictions=predictions)
    assert report["images"] == 4 and report["faces_detected"] == 2
    reasons = {Path(item["path"]).name: item["reason"] for item in report["undetected"]}
    assert "does not exist" in reasons["missing.jpg"] and "not an image" in reasons["notes.jpg"]
    assert report["formats"]["list"]["parse_failures"] == 0
    # every image keeps its prediction row; the unreadable ones say why and predict nothing
    by_name = {Path(row["path"]).name: row for row in predictions}
    assert sorted(by_name) == ["cmyk.jpg", "missing.jpg", "notes.jpg", "plain.jpg"]
    assert by_name["missing.jpg"]["error"] == reasons["missing.jpg"] and by_name["missing.jpg"]["AU12_pred"] == ""
    assert by_name["plain.jpg"]["text"] and by_name["plain.jpg"]["AU12_pred"] in (0, 1)


# ----- checkpoints -----------------------------------------------------------------------------------------
def broken_checkpoint(tmp_path: Path, damage) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    damage(folder)
    return folder


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:1000])


DAMAGES = {
    "no config": (lambda f: (f / "aullava_config.json").unlink(), "aullava_config.json is missing"),
    "corrupt config": (lambda f: (f / "aullava_config.json").write_text("{not json"), "not readable JSON"),
    "config not an object": (lambda f: (f / "aullava_config.json").write_text("[1, 2]"), "holds no JSON object"),
    "no weights": (lambda f: (f / "aullava.safetensors").unlink(), "aullava.safetensors is missing"),
    "truncated weights": (lambda f: _truncate(f / "aullava.safetensors"), "not a readable safetensors file"),
    "corrupt adapter config": (lambda f: (f / "adapter" / "adapter_config.json").write_text(""), "not readable JSON"),
    "truncated adapter": (lambda f: _truncate(f / "adapter" / "adapter_model.safetensors"),
                          "not a readable safetensors file"),
    "adapter as a pickle": (lambda f: (f / "adapter" / "adapter_model.safetensors").rename(
        f / "adapter" / "adapter_model.bin"), "adapter_model.safetensors is missing"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_broken_checkpoint_is_named_plainly(tmp_path, damage):
    from aullava.model import from_pretrained

    harm, words = DAMAGES[damage]
    folder = broken_checkpoint(tmp_path, harm)
    with pytest.raises((ValueError, FileNotFoundError), match=words):
        from_pretrained(folder)


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    from aullava.model import from_pretrained

    def shrink(folder):
        config = json.loads((folder / "aullava_config.json").read_text())
        config["encoder"]["dim"] = 64
        (folder / "aullava_config.json").write_text(json.dumps(config))

    with pytest.raises(ValueError, match="does not fit the model its config describes"):
        from_pretrained(broken_checkpoint(tmp_path, shrink))


def test_cli_with_a_broken_checkpoint_exits_with_a_sentence(battery, tmp_path, capsys):
    from aullava.cli import main

    folder, _ = battery
    checkpoint = broken_checkpoint(tmp_path, DAMAGES["truncated weights"][0])
    assert main(["analyze", str(folder / "plain.jpg"), "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "not a readable safetensors file" in err and "Traceback" not in err


# ----- the running app (gradio_client) ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["empty.jpg", "truncated.jpg", "bomb.png", "drawing.eps", "animated.gif"])
def test_running_app_answers_bad_uploads_plainly(battery, app_server, name):
    from gradio_client import Client, handle_file

    path, expect = case(battery, name)
    client = Client(app_server["url"], verbose=False)
    status, text, *_ = client.predict(handle_file(str(path)), "list", None, api_name="/analyse")
    if expect.good:
        assert status.startswith("Found 1 face") and text
    else:
        assert expect.words.split("(")[0].strip() in status and "/tmp" not in status and text == ""


def test_evaluate_refuses_what_it_cannot_score_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from aullava import cli, service

    monkeypatch.setattr(service, "Analyzer", lambda *a, **k: pytest.fail("the model was loaded"))
    rows = [{"path": f"img{i}.png", "subject": "S1", "aus": "12", "kind": "peak"} for i in range(3)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    (tmp_path / "img0.png").write_bytes(b"")
    bom = tmp_path / "excel.csv"
    bom.write_text(manifest.read_text(), encoding="utf-8-sig")  # saved by Excel: starts with a byte-order mark
    cases = [
        (["--manifest", str(manifest), "--images-root", str(tmp_path / "elsewhere")], "none of the manifest's 3 images"),
        (["--manifest", str(manifest), "--subjects", "S1,S123"], "subject(s) S123 have no rows"),
        (["--manifest", str(tmp_path)], "is a folder"),
        (["--manifest", str(bom), "--out", str(tmp_path)], "--out"),
        (["--manifest", str(manifest), "--predictions", str(tmp_path / "no" / "p.csv")], "the folder"),
        (["--manifest", str(manifest), "--min-positives", "0"], "(--min-positives) must be at least 1"),
    ]
    for flags, words in cases:
        out = ["--out", str(tmp_path / "metrics.json")] if "--out" not in flags else []
        assert cli.main(["evaluate", *flags, *out]) == 2, flags
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (flags, err)
    assert not (tmp_path / "metrics.json").exists()


def test_analyze_refuses_an_unwritable_output_before_any_work(tmp_path, capsys, monkeypatch):
    from aullava import cli, service

    monkeypatch.setattr(service, "get_analyzer", lambda *a, **k: pytest.fail("the model was loaded"))
    image = tmp_path / "face.jpg"
    image.write_bytes(b"")
    rows = tmp_path / "rows.csv"
    assert cli.main(["analyze", str(image), "--csv", str(rows), "--jsonl", str(tmp_path / "no" / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--jsonl" in err and "does not exist" in err and not rows.exists()


def test_analyze_refuses_a_dash_where_standard_output_cannot_serve(tmp_path, capsys, monkeypatch):
    from aullava import cli, service

    monkeypatch.setattr(service, "get_analyzer", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "face.jpg"
    image.write_bytes(b"")
    for flags, words in ((["--csv", "-", "--jsonl", "-"], "both write to standard output"),
                         (["--plot", "-"], "--plot cannot write to standard output"),
                         (["--plot", "aus.png"], "no video was given"),  # before every row is written
                         (["--json", "--csv", "rows.csv"], "--json prints results instead of writing rows"),
                         (["--json", "--plot", "aus.png"], "--json prints results instead of writing rows")):
        assert cli.main(["analyze", str(image), *flags]) == 2, flags
        assert words in capsys.readouterr().err, flags
    assert not (tmp_path / "-").exists()


def test_train_refuses_held_out_names_the_manifest_lacks_and_holding_out_everyone(tmp_path, capsys):
    from aullava.cli import main

    rows = [{"path": f"x{i}.jpg", "subject": f"S{i}", "aus": "12", "kind": "peak"} for i in range(2)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    for hold_out, words in (("S0, s1", "held-out subject(s) s1 are not in the manifest"),
                            ("S0,S1", "every subject of the manifest is held out")):
        assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--tiny",
                     "--hold-out", hold_out]) == 2
        assert words in capsys.readouterr().err, hold_out


def test_train_refuses_a_loss_weight_that_is_not_positive(tmp_path, capsys):
    from aullava.cli import main

    manifest = write_manifest(tmp_path / "m.csv", [{"path": "x.jpg", "subject": "S0", "aus": "12", "kind": "peak"}])
    assert main(["train", "--manifest", str(manifest), "--out", str(tmp_path / "run"), "--tiny",
                 "--end-weight", "0"]) == 2
    assert "end_weight must be positive, not 0.0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_manifest_rows_with_impossible_intensities_are_refused_with_their_row(tmp_path):
    from aullava.data.manifest import ManifestError, read_manifest

    for aus, intensities, words in (("4;17", "4:9", "row 2: intensity '4:9' is outside 0-5"),
                                    ("4", "12:3", "row 2: an intensity is given for AU12")):
        manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.jpg", "subject": "S1", "aus": aus,
                                                        "intensities": intensities, "kind": "peak"}])
        with pytest.raises(ManifestError, match=words):
            read_manifest(manifest)


def test_label_warnings_name_what_the_model_will_not_learn():
    from pathlib import Path

    from aullava.data.manifest import Sample, label_warnings

    samples = [Sample(Path("a.jpg"), "S1", aus=frozenset({3, 12})), Sample(Path("a.jpg"), "S1", aus=frozenset({12})),
               Sample(Path("b.jpg"), "S2", aus=frozenset({43}))]
    outside, repeated, unseen = label_warnings(samples, (1, 12))
    assert "AU03 (1 row), AU43 (1 row) labelled in the manifest but not among the model's 2 AUs" in outside
    assert "1 image(s) are listed more than once (e.g. a.jpg)" in repeated
    assert unseen.startswith("no training face shows AU01:")
    assert len(label_warnings(samples, (1, 12), training=False)) == 2


def test_a_face_whose_answer_cannot_be_read_fails_the_run_in_every_output_mode(analyzer, tmp_path, capsys,
                                                                               monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from aullava import service
    from aullava.cli import main
    from conftest import grace_hopper_path

    def unreadable(image, format_name="list", max_faces=None):
        outcome = analyzer.analyze(image, format_name, max_faces)
        outcome.faces = [dataclasses.replace(f, result=None, error="the answer is not a list of AU codes")
                         for f in outcome.faces]
        return outcome

    monkeypatch.setattr(service, "get_analyzer", lambda checkpoint=None: SimpleNamespace(aus=analyzer.aus,
                                                                                           analyze=unreadable))
    photo = grace_hopper_path()
    assert main(["analyze", photo, "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["faces"][0]["parse_error"] and f"{photo} face 1: the answer is not" in err
    rows = tmp_path / "rows.csv"
    assert main(["analyze", photo, "--csv", str(rows)]) == 1
    err = capsys.readouterr().err
    assert "1 face(s) analysed (1 answer(s) unreadable), 0 without a result" in err
    assert f"{photo} face_id 0: the answer is not a list of AU codes" in err
    assert next(csv.DictReader(open(rows)))["success"] == "0"
