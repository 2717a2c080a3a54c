"""Dataset readers: tiny fixtures written in each release's own layout, read back into manifest samples and
through a manifest CSV, with unknown labels and missing frames."""
from pathlib import Path

import pytest
from PIL import Image

from aullava import facs
from aullava.data.manifest import read_manifest, write_manifest
from aullava.data.readers import read_bp4d, read_ckplus, read_disfa, read_feafa


def _image(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (4, 4), 128).save(path)


def _write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _round_trip(samples, tmp_path):
    manifest = write_manifest(samples, tmp_path / "out" / "manifest.csv", images_root=tmp_path)
    back = read_manifest(manifest, images_root=tmp_path)
    assert [(s.path.resolve(), s.subject, s.sequence, s.frame, s.kind, s.emotion, s.aus, s.intensities, s.unknown,
             s.coded) for s in back] == [(Path(s.path).resolve(), s.subject, s.sequence, s.frame, s.kind, s.emotion,
                                          s.aus, s.intensities, s.unknown, s.coded) for s in samples]
    return back


def test_bp4d_occurrence_intensity_unknown_and_missing_frames(tmp_path):
    root = tmp_path / "BP4D"
    _write(root / "AUCoding/AU_OCC/F001_T1.csv", "0,1,2,6,12\n10,1,0,1,1\n11,0,9,0,1\n12,0,0,0,0\n")
    _write(root / "AU_INT/AU06/F001_T1_AU06.csv", "10,3\n11,0\n12,0\n")
    _write(root / "AU_INT/AU12/F001_T1_AU12.csv", "10,9\n11,2\n12,0\n")
    for frame in (10, 11):  # frame 12 has no image
        _image(root / f"2DFaces/F001/T1/{frame:04d}.jpg")
    samples, problems = read_bp4d(root)
    assert [s.frame for s in samples] == ["10", "11"] and problems == ["F001_T1.csv frame 12: no image in 2DFaces/F001/T1"]
    first, second = samples
    assert first.aus == {1, 6, 12} and first.intensities == {6: 3} and first.unknown == frozenset()  # AU12 level 9
    assert second.aus == {12} and second.unknown == {2} and second.intensities == {12: 2}
    assert first.coded == {1, 2, 6, 12} and not first.is_known(4)  # BP4D codes its file's AUs, not AU4
    assert (first.subject, first.sequence, first.kind) == ("F001", "T1", "frame")
    _round_trip(samples, tmp_path)


def test_bp4d_headers_with_au_names_empty_cells_and_bad_values(tmp_path):
    root = tmp_path / "BP4D"
    _write(root / "AUCoding/AU_OCC/F001_T1.csv", "frame,AU01,AU12\n10,1,\n11,nan,1\n")
    for frame in (10, 11):
        _image(root / f"2DFaces/F001/T1/{frame:04d}.jpg")
    first, second = read_bp4d(root)[0]
    assert first.aus == {1} and first.unknown == {12} and second.aus == {12} and second.unknown == {1}
    _write(root / "AUCoding/AU_OCC/F001_T1.csv", "frame,1,12\n10,1,yes\n")
    with pytest.raises(ValueError, match="F001_T1.csv:2: 'yes' is not a number"):
        read_bp4d(root)


def test_disfa_intensity_files_threshold_and_missing_frames(tmp_path):
    root = tmp_path / "DISFA"
    _write(root / "ActionUnit_Labels/SN001/SN001_au1.txt", "1,0\n2,3\n3,1\n")
    _write(root / "ActionUnit_Labels/SN001/SN001_au12.txt", "1,2\n2,5\n")  # frame 3 not coded for AU12
    for frame in (1, 2, 3):
        _image(root / f"Frames/SN001/{frame:05d}.png")
    _write(root / "ActionUnit_Labels/SN002/SN002_au1.txt", "1,4\n")  # SN002's frames were never extracted
    samples, problems = read_disfa(root)
    assert [(s.subject, s.frame) for s in samples] == [("SN001", "1"), ("SN001", "2"), ("SN001", "3")]
    assert problems and problems[0].startswith("SN002 frame 1: no image")
    one, two, three = samples
    assert one.aus == {12} and one.intensities == {12: 2}
    assert two.aus == {1, 12} and two.intensities == {1: 3, 12: 5}
    assert three.aus == frozenset() and three.unknown == {12}  # AU1 at 1 is below the occurrence threshold
    _round_trip(samples, tmp_path)


def test_feafa_unit_values_beside_each_image(tmp_path):
    root = tmp_path / "FEAFA"
    values = {unit: 0.0 for unit in facs.FEAFA_UNITS}
    values.update({"AU12L": 0.62, "AU12R": 0.35, "AU1": 0.05, "AU26": 0.21, "AD19": 0.9})
    _image(root / "P01/seq1/0001.png")
    _write(root / "P01/seq1/0001.auw", " ".join(str(values[u]) for u in facs.FEAFA_UNITS))
    _write(root / "P01/seq1/0002.auw", "0.1 0.2")  # malformed
    _write(root / "P01/seq1/0003.auw", " ".join("0" for _ in facs.FEAFA_UNITS))  # no image
    samples, problems = read_feafa(root)
    assert len(samples) == 1 and len(problems) == 2
    sample = samples[0]
    assert sample.aus == {12, 26} and sample.intensities == {12: 3, 26: 1}  # AU1 0.05 rounds to 0; AD19 is no AU
    assert (sample.subject, sample.sequence) == ("P01", "seq1")
    _round_trip(samples, tmp_path)


def test_ckplus_peak_neutral_near_peak_and_emotion(tmp_path):
    root = tmp_path / "CK+"
    _write(root / "FACS/S005/001/S005_001_00000004_facs.txt",
           "   1.0000000e+00   3.0000000e+00\n   2.0000000e+00   0.0000000e+00\n   2.5000000e+01   2.0000000e+00\n")
    _write(root / "Emotion/S005/001/S005_001_00000004_emotion.txt", "   7.0000000e+00\n")
    for frame in range(1, 5):
        _image(root / f"cohn-kanade-images/S005/001/S005_001_{frame:08d}.png")
    _write(root / "FACS/S010/002/S010_002_00000009_facs.txt", "   1.2000000e+01   0.0000000e+00\n")
    samples, problems = read_ckplus(root, near_peak=1)
    assert problems and "peak frame 9" in problems[0]
    assert [(s.kind, s.frame) for s in samples] == [("neutral", "1"), ("near_peak", "3"), ("peak", "4")]
    neutral, near, peak = samples
    assert neutral.aus == frozenset() and peak.aus == {1, 2, 25} and peak.intensities == {1: 3, 25: 2}
    assert near.aus == peak.aus and near.intensities == {} and peak.emotion == "surprise"
    _round_trip(samples, tmp_path)


def test_manifest_command_lists_ckplus_near_peak_frames_as_the_checkpoint_learned(tmp_path, capsys):
    from aullava.cli import main

    root = tmp_path / "CK+"
    _write(root / "FACS/S005/001/S005_001_00000005_facs.txt", "   1.2000000e+01   3.0000000e+00\n")
    for frame in range(1, 6):
        _image(root / f"cohn-kanade-images/S005/001/S005_001_{frame:08d}.png")
    out = tmp_path / "ck.csv"
    for given, kinds in (([], ["neutral", "near_peak", "near_peak", "peak"]), (["--near-peak", "0"], ["neutral", "peak"])):
        assert main(["manifest", "--dataset", "ckplus", "--root", str(root), "--out", str(out)] + given) == 0
        assert [s.kind for s in read_manifest(out)] == kinds
    assert main(["manifest", "--dataset", "bp4d", "--root", str(root), "--out", str(out), "--near-peak", "2"]) == 2
    assert "--near-peak applies to CK+ only" in capsys.readouterr().err


def test_a_reader_refuses_a_folder_of_another_layout(tmp_path):
    for reader in (read_bp4d, read_disfa, read_ckplus):
        with pytest.raises(FileNotFoundError, match="not found"):
            reader(tmp_path)


def test_manifest_command_writes_a_readable_csv_and_reports_problems(tmp_path, capsys):
    from aullava.cli import main

    root = tmp_path / "BP4D"
    _write(root / "AUCoding/AU_OCC/M002_T8.csv", "frame,1,12\n1,1,9\n2,0,1\n")
    _image(root / "2DFaces/M002/T8/1.jpg")
    out = tmp_path / "bp4d.csv"
    assert main(["manifest", "--dataset", "bp4d", "--root", str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 images of 1 subjects" in captured.out and "(1 unknown labels); 1 label rows" in captured.out
    assert "M002_T8.csv frame 2" in captured.err
    (sample,) = read_manifest(out)
    assert sample.aus == {1} and sample.unknown == {12} and sample.path == out.parent / "BP4D/2DFaces/M002/T8/1.jpg"
    assert main(["manifest", "--dataset", "disfa", "--root", str(root), "--out", str(out)]) == 2


def test_manifest_command_names_a_missing_root_or_output_folder(tmp_path, capsys):
    from aullava.cli import main

    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    for root, out, words in ((tmp_path / "nowhere", tmp_path / "m.csv", "--root {} does not exist"),
                             (afile, tmp_path / "m.csv", "--root {} is a file"),
                             (tmp_path, tmp_path / "no" / "m.csv", "--out {}: the folder")):
        assert main(["manifest", "--dataset", "ckplus", "--root", str(root), "--out", str(out)]) == 2
        named = out if words.startswith("--out") else root
        assert words.format(named) in capsys.readouterr().err
