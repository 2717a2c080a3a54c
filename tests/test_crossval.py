"""Cross-validation: ICC(3,1) against its published example, and a tiny end-to-end k-fold run that resumes."""
import json

import numpy as np
import pytest

from aullava.evaluate import icc_3_1, intensity_metrics
from conftest import REPO


def test_icc_3_1_matches_shrout_and_fleiss():
    # Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; ICC(3,1) = 0.71
    ratings = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]
    assert icc_3_1(ratings) == pytest.approx(0.7148, abs=1e-4)
    truth = np.array([0, 1, 2, 3, 4, 5], float)
    assert icc_3_1(np.stack([truth, truth + 1], 1)) == pytest.approx(1.0)  # consistency ignores an offset
    assert icc_3_1([[1, 1], [1, 1]]) is None  # no variance: undefined, not 0 or 1


def test_intensity_metrics_per_au():
    report = intensity_metrics([0, 2, 4, 1, 3], [0, 2, 4, 3, 1], aus=[12, 12, 12, 6, 6])
    assert report["per_au"]["AU12"]["mae"] == 0 and report["per_au"]["AU12"]["icc3_1"] == pytest.approx(1.0)
    assert report["per_au"]["AU6"]["pairs"] == 2 and report["per_au"]["AU6"]["mae"] == 2
    assert report["per_au"]["AU6"]["icc3_1"] < 0  # opposite ratings
    assert intensity_metrics([], []) is None


def test_crossval_command_runs_every_fold_and_resumes(tiny_manifest, tmp_path, capsys):
    from aullava.cli import main

    out = tmp_path / "cv"
    args = ["crossval", "--manifest", str(tiny_manifest), "--out", str(out), "--folds", "3", "--tiny",
            "--encoder-steps", "6", "--projector-steps", "2", "--lora-steps", "2", "--batch-size", "2",
            "--formats", "list", "binary", "intensity"]
    assert main(args) == 0
    summary = json.loads((out / "crossval.json").read_text())
    held_out = [json.loads((out / f"fold{i}" / "metrics.json").read_text())["held_out"] for i in range(3)]
    assert sorted(s for fold in held_out for s in fold) == ["S0", "S1", "S2"]  # each subject tested exactly once
    assert summary["images_per_fold"] == [2, 2, 2]
    trained = json.loads(next((out / "fold0").rglob("checkpoint/aullava_config.json")).read_text())
    assert summary["encoder"] == trained["encoder"]  # the model card names the encoder the folds trained
    for name in ("list", "binary", "intensity"):
        entry = summary["formats"][name]
        assert len(entry["per_au"]["AU12"]["f1_per_fold"]) == 3
        assert sum(v["support"] for v in entry["per_au"].values()) == 13  # every positive label, counted once
    assert "ICC(3,1)" in (out / "crossval.md").read_text() and "| AU12 | lip corner puller" in (out / "crossval.md").read_text()
    first = (out / "crossval.md").read_text()
    # a second run reads every fold back instead of retraining, and writes the same report
    assert main(args) == 0
    assert "already trained and evaluated with these settings" in capsys.readouterr().out
    assert (out / "crossval.md").read_text() == first
    # a format the folds were not scored in: scored now, from their checkpoints, not retrained
    assert main(args + ["json"]) == 0
    logged = capsys.readouterr().out
    assert "already trained with this recipe" in logged and "json" in json.loads((out / "crossval.json").read_text())["formats"]
    # another split in the same folder is refused, not mixed with the folds there
    assert main([a if a != "3" else "2" for a in args]) == 2
    assert "holds a fold of another split" in capsys.readouterr().err


def test_encoder_cv_reports_of_single_folds_merge_into_the_pooled_report(tmp_path):
    import importlib.util

    from aullava.evaluate import presence_metrics

    spec = importlib.util.spec_from_file_location("encoder_cv", REPO / "scripts" / "encoder_cv.py")
    encoder_cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(encoder_cv)
    rng = np.random.default_rng(0)
    truths = [rng.random((30, 3)) < 0.4 for _ in range(2)]
    predictions = [t ^ (rng.random(t.shape) < 0.2) for t in truths]
    recipe = {"steps": 10, "seed": 0, "members": 3}
    paths = []
    for index, (truth, predicted) in enumerate(zip(truths, predictions)):
        fold = {"fold": index, "held_out": [f"S{index}"], "images": 30, **presence_metrics(truth, predicted, [1, 2, 4])}
        paths.append(tmp_path / f"fold{index}.json")
        paths[-1].write_text(json.dumps(encoder_cv.summarize([fold], recipe)))
    report = encoder_cv.merged(paths)
    pooled = presence_metrics(np.concatenate(truths), np.concatenate(predictions), [1, 2, 4])
    assert [f["fold"] for f in report["folds"]] == [0, 1]
    assert report["macro_f1_pooled"] == pooled["macro_f1"]
    assert {au: v["pooled_f1"] for au, v in report["per_au"].items()} == {au: v["f1"] for au, v in pooled["per_au"].items()}
    with pytest.raises(SystemExit, match="more than one fold"):
        encoder_cv.merged([paths[0], paths[0]])
    second = json.loads(paths[1].read_text())
    # reports from before `cnn`, `logistic_hog` and `kinds` ran the small CNN, a regression on the landmarks alone
    # and the recipe's kinds
    paths[1].write_text(json.dumps(second | {"cnn": "small", "logistic_hog": False, "landmark_l2": 10.0}))
    assert encoder_cv.merged(paths)["cnn"] == "small" and encoder_cv.merged(paths)["logistic_hog"] is False
    for changed in ({"cnn": "mini_xception"}, {"members": 1}, {"logistic_hog": True}, {"landmark_l2": 30.0},
                    {"kinds": ["peak", "neutral"]}):
        paths[1].write_text(json.dumps(second | changed))
        with pytest.raises(SystemExit, match="different recipes"):
            encoder_cv.merged(paths)


def test_per_au_ratios_without_a_denominator_are_none_not_zero():
    from aullava.evaluate import metrics_from_counts

    per_au = metrics_from_counts({"AU1": (0, 0, 0), "AU2": (0, 3, 0), "AU4": (0, 0, 5), "AU6": (4, 1, 1)})["per_au"]
    assert (per_au["AU1"]["precision"], per_au["AU1"]["recall"], per_au["AU1"]["f1"]) == (None, None, None)
    assert (per_au["AU2"]["precision"], per_au["AU2"]["recall"], per_au["AU2"]["f1"]) == (0.0, None, 0.0)
    assert (per_au["AU4"]["precision"], per_au["AU4"]["recall"], per_au["AU4"]["f1"]) == (None, 0.0, 0.0)
    assert per_au["AU6"]["f1"] == 0.8


def test_the_markdown_keeps_each_folds_macro_f1_apart_from_the_per_au_average():
    from aullava.crossval import markdown, summarize

    def fold(macro, tp12):
        per_au = {"AU1": {"tp": 2, "fp": 1, "fn": 1, "f1": 0.667, "support": 3},
                  "AU12": {"tp": tp12, "fp": 0, "fn": 10 - tp12, "f1": round(2 * tp12 / (tp12 + 10), 4), "support": 10}}
        return {"aus": [1, 12], "images": 20, "detection_rate": 1.0, "agreement": {"all": 0.99},
                "formats": {"list": {"per_au": per_au, "macro_f1": macro, "parse_failures": 0}}}

    text = markdown(summarize([fold(0.9, 9), fold(0.8, 7)], ["list"]))
    assert "| **macro F1** | | 0.900 | 0.800 | 0.850 | | |" in text  # the folds' own, and their mean
    # only AU12 has >= 10 positives over the folds: its mean F1 (0.947 + 0.824) / 2
    assert "Average over the AUs with >= 10 positives in all folds: mean F1 **0.885**, pooled F1 0.889" in text


def test_a_lower_positive_bar_scores_the_rarer_aus_in_every_macro_f1_of_a_report():
    from aullava.evaluate import _with_min_positives, metrics_from_counts

    counts = {"AU1": (9, 1, 1), "AU2": (2, 0, 1), "AU4": (0, 1, 0)}  # supports 10, 3, 0
    assert metrics_from_counts(counts)["macro_f1_aus"] == ["AU1"]  # the card's bar: 10 positives
    report = {"formats": {"list": metrics_from_counts(counts)},
              "diagnostics": {"encoder_head": metrics_from_counts(counts)}}
    _with_min_positives(report, 3)
    for metrics in (report["formats"]["list"], report["diagnostics"]["encoder_head"]):
        assert metrics["macro_f1_aus"] == ["AU1", "AU2"]  # an AU without positives is never averaged in
        assert metrics["macro_f1"] == round((0.9 + 0.8) / 2, 4)
