"""scripts/model_card.py: the shipped card is what its sources build, and the card follows its inputs."""
import json
import shutil
import subprocess
import sys

from conftest import REPO

CARD_SOURCES = ("aullava_config.json", "metrics.json", "cv.json", "CARD_NOTES.md")  # and metrics_fold*.json
SHIPPED = REPO / "assets" / "aullava-ckplus"


def build_card(folder, *inputs):
    subprocess.run([sys.executable, str(REPO / "scripts" / "model_card.py"), str(folder), *map(str, inputs)],
                   check=True, capture_output=True, text=True)
    return (folder / "README.md").read_text()


def copy_sources(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in CARD_SOURCES:
        shutil.copy(SHIPPED / name, folder / name)
    for other_fold in SHIPPED.glob("metrics_fold*.json"):
        shutil.copy(other_fold, folder / other_fold.name)
    return folder


def test_the_shipped_card_is_what_its_sources_build(tmp_path):
    folder = copy_sources(tmp_path)
    card = build_card(folder, SHIPPED / "metrics.json", SHIPPED / "cv.json")
    assert card == (SHIPPED / "README.md").read_text(), (
        "assets/aullava-ckplus/README.md is out of date: rebuild it with the command in scripts/model_card.py")


def test_the_card_reports_its_inputs(tmp_path):
    folder = copy_sources(tmp_path)
    (folder / "CARD_NOTES.md").unlink()
    for other_fold in folder.glob("metrics_fold*.json"):
        other_fold.unlink()
    report = json.loads((SHIPPED / "metrics.json").read_text())
    report["formats"]["list"]["macro_f1"] = 0.9123
    report["formats"]["binary"]["per_au"]["AU4"]["f1"] = 0.555
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(report))
    card = build_card(folder, metrics)
    assert "| list | 0.9123 | 0 |" in card
    assert "| AU4 (24) | 0.68 | 0.56 |" in card  # list's own F1, then binary's altered one
    assert "cross-validation (encoder)" not in card  # no cv.json given
    assert "## Status against" not in card  # no hand-written notes
    assert f"--hold-out {','.join(report['subjects'])}" in card  # the generated retrain command of the scored run
    assert json.loads((folder / "metrics.json").read_text()) == report  # the report is kept beside the card


def test_the_card_names_a_regression_that_reads_gradient_histograms(tmp_path):
    folder = copy_sources(tmp_path)
    cv = json.loads((SHIPPED / "cv.json").read_text()) | {"logistic_hog": True, "landmark_l2": 30.0}
    (tmp_path / "cv.json").write_text(json.dumps(cv))
    card = build_card(folder, SHIPPED / "metrics.json", tmp_path / "cv.json")
    assert "--logistic-hog --landmark-l2 30 --out cv.json" in card  # the reproduce line runs that recipe
    assert "unlike this checkpoint's" in card  # the shipped regression reads the landmarks alone
    config = json.loads((folder / "aullava_config.json").read_text())
    config["encoder"] |= {"logistic_hog": True, "landmark_l2": 30.0}
    (folder / "aullava_config.json").write_text(json.dumps(config))
    card = build_card(folder, SHIPPED / "metrics.json", tmp_path / "cv.json")
    assert "on the aligned landmarks and the chip's gradient histograms" in card
    assert "unlike this checkpoint's" not in card


def test_a_checkpoint_trained_on_every_subject_is_scored_through_its_held_out_run(tmp_path):
    folder = copy_sources(tmp_path)
    config = json.loads((folder / "aullava_config.json").read_text())
    config["training"]["train_config"]["held_out_subjects"] = []
    (folder / "aullava_config.json").write_text(json.dumps(config))
    report = json.loads((SHIPPED / "metrics.json").read_text())
    card = build_card(folder, SHIPPED / "metrics.json", SHIPPED / "cv.json")
    assert "No subject is held out" in card and "## The same recipe on held-out subjects" in card
    assert f"trained with these {len(report['subjects'])} subjects held out ({', '.join(report['subjects'])})" in card
    retrain = card[card.index("## Retrain"):]
    # the checkpoint's own command holds out nothing; the scored run's holds out the subjects it is scored on
    assert retrain.count("--hold-out") == 1 and f"--hold-out {','.join(report['subjects'])}" in retrain
    assert "--out runs/ckplus \\" in retrain and "--checkpoint runs/ckplus-heldout/checkpoint" in retrain


def test_the_retrain_command_carries_a_non_default_end_weight(tmp_path):
    folder = copy_sources(tmp_path)
    config = json.loads((folder / "aullava_config.json").read_text())
    card = build_card(folder, SHIPPED / "metrics.json", SHIPPED / "cv.json")
    weight = config["training"]["train_config"].get("end_weight", 1.0)
    assert ("--end-weight" in card[card.index("## Retrain"):]) == (weight != 1.0)
    config["training"]["train_config"]["end_weight"] = 2.5
    (folder / "aullava_config.json").write_text(json.dumps(config))
    retrain = build_card(folder, SHIPPED / "metrics.json", SHIPPED / "cv.json").split("## Retrain")[1]
    assert retrain.count("--end-weight 2.5") == 2  # the checkpoint's command and its held-out run's
