"""Video input: sampling, a broken frame, a file that is not a video, face ids across frames, CSV + plot."""
import csv

import numpy as np
import pytest
from PIL import Image

from aullava.video import FaceTracker, VideoReadError, read_frames, video_info
from conftest import write_video

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def face_video(tmp_path_factory, grace_hopper):
    return write_video(tmp_path_factory.mktemp("video") / "face.mp4", Image.open(grace_hopper))


@pytest.fixture(scope="module")
def broken_video(face_video, tmp_path_factory):
    """The same video with one packet's bytes overwritten: that frame cannot be decoded."""
    with av.open(str(face_video)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    data = bytearray(face_video.read_bytes())
    position, size = packets[12]
    data[position:position + size] = bytes(size)
    path = tmp_path_factory.mktemp("broken") / "broken.mp4"
    path.write_bytes(bytes(data))
    return path


def test_frames_are_sampled_at_the_asked_rate(face_video):
    assert video_info(face_video).duration == pytest.approx(3.0)
    every = list(read_frames(face_video, fps=None))
    assert len(every) == 30 and [f.number for f in every] == list(range(1, 31))
    sampled = list(read_frames(face_video, fps=2))
    assert [f.timestamp for f in sampled] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [f.number for f in sampled] == [1, 6, 11, 16, 21, 26]
    assert sampled[0].rgb.shape == (320, 256, 3) and sampled[0].rgb.dtype == np.uint8
    assert video_info(face_video).sampled_frames(2) == 6
    with pytest.raises(ValueError, match="positive"):
        list(read_frames(face_video, fps=0))


def test_a_broken_frame_is_reported_and_the_rest_decoded(broken_video):
    frames = list(read_frames(broken_video, fps=None))
    failed = [f for f in frames if f.error]
    assert len(failed) == 1 and failed[0].number == 13 and failed[0].rgb is None
    assert "could not be decoded" in failed[0].error
    assert sum(f.rgb is not None for f in frames) == 29  # every other frame, including those after it


def test_files_that_are_not_videos_give_a_clear_error(tmp_path, face_video):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(face_video.read_bytes()[:2000])
    for path in (text, truncated, tmp_path / "missing.mp4"):
        with pytest.raises(VideoReadError, match=path.name) as caught:
            list(read_frames(path))
        assert "Errno" not in str(caught.value) and str(tmp_path) not in str(caught.value)  # FFmpeg's words only


def test_a_file_that_is_not_a_video_is_named_once_and_gets_no_empty_plot(tmp_path, capsys):
    from aullava.cli import main

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    plot = tmp_path / "series.png"
    assert main(["analyze", str(text), "--csv", str(tmp_path / "aus.csv"), "--plot", str(plot)]) == 1
    err = capsys.readouterr().err
    failure = next(line for line in err.splitlines() if "not a video" in line)
    assert failure.strip() == f"{text}: not a video that can be decoded (Invalid data found when processing input)"
    assert "frame :" not in err and "no time series of" in err and not plot.exists()


def test_tracker_keeps_ids_across_frames():
    tracker = FaceTracker(max_gap=1.0)
    assert tracker.assign([(0, 0, 100, 100), (200, 0, 300, 100)], 0.0) == [0, 1]
    # order in the list changes (largest first), boxes drift: the ids follow the boxes
    assert tracker.assign([(205, 5, 305, 105), (4, 2, 104, 102)], 0.2) == [1, 0]
    assert tracker.assign([(400, 400, 500, 500), (0, 0, 100, 100)], 0.4) == [2, 0]  # a newcomer
    assert tracker.assign([(0, 0, 100, 100)], 3.0) == [3]  # gone for longer than max_gap: a new face


def test_analyze_a_video_to_openface_csv_and_time_series(face_video, broken_video, tmp_path):
    pandas = pytest.importorskip("pandas")
    from aullava.cli import main

    out, plot = tmp_path / "aus.csv", tmp_path / "series.png"
    code = main(["analyze", str(face_video), str(broken_video), "--fps", "2", "--format", "intensity",
                 "--csv", str(out), "--plot", str(plot)])
    table = pandas.read_csv(out)
    good = table[table.file == str(face_video)]
    assert list(good.frame) == [1, 6, 11, 16, 21, 26] and list(good.timestamp) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert set(good.success) == {1} and set(good.face_id) == {0}  # one face, one id throughout
    assert {"AU12_r", "AU12_c", "confidence"} <= set(table.columns) and good["AU12_r"].notna().all()
    broken = table[table.file == str(broken_video)]
    assert (broken.success == 0).sum() == 1 and "could not be decoded" in broken[broken.success == 0].reason.iloc[0]
    assert (broken.success == 1).sum() == 6  # the sampled frames all still analysed
    assert code == 1  # a frame without a result makes the exit code non-zero
    for video in ("face", "broken"):
        image = Image.open(tmp_path / f"series-{video}.png")
        assert image.width > 300 and image.height > 100


def test_videos_of_the_same_name_get_a_plot_each(face_video, tmp_path):
    import shutil

    from aullava.cli import main

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(face_video, tmp_path / folder / "clip.mp4")
    plot = tmp_path / "series.png"
    assert main(["analyze", str(tmp_path / "a" / "clip.mp4"), str(tmp_path / "b" / "clip.mp4"), "--fps", "1",
                 "--csv", str(tmp_path / "aus.csv"), "--plot", str(plot)]) == 0
    assert sorted(p.name for p in tmp_path.glob("series-*.png")) == ["series-clip-1.png", "series-clip-2.png"]


def test_time_series_plot_reads_csv_rows(tmp_path):
    from aullava.plots import au_time_series

    rows = [{"file": "v.mp4", "frame": str(i + 1), "timestamp": str(i / 5), "face_id": "0", "success": "1",
             "AU12_c": "1" if i > 3 else "0", "AU12_r": str(2.0 if i > 3 else 0.0), "AU4_c": "0", "AU4_r": "0"}
            for i in range(10)]
    drawn = np.asarray(au_time_series(rows, (4, 12)))
    blank = np.asarray(au_time_series([{**r, "success": "0"} for r in rows], (4, 12)))
    assert drawn.shape[0] > 100 and drawn.shape != blank.shape  # one AU panel vs a "no face" message


def test_batch_throughput_benchmark_counts_every_item(tmp_path, grace_hopper):
    pandas = pytest.importorskip("pandas")
    from aullava.bench import batch_throughput
    from aullava.service import get_analyzer

    report = batch_throughput(get_analyzer(), Image.open(grace_hopper).convert("RGB"), tmp_path, images=3,
                              video_seconds=1, fps=2, log=lambda *_: None)
    assert report["images"]["count"] == 3 and report["images"]["failed"] == 0 and report["images"]["per_second"] > 0
    assert report["video"]["frames"] == 2 and report["video"]["faces"] == 2
    table = pandas.read_csv(tmp_path / "video.csv")  # 25 frames/s: the frame at or after 0.5 s is at 0.52 s
    assert list(table.timestamp) == [0.0, 0.52] and {"AU12_c", "AU12_r", "face_id"} <= set(table.columns)
