"""Subject-exclusive k-fold cross-validation of the AU encoder alone (stage 0 of `python -m aullava train`).

For each fold: train the encoder with its per-AU head on the other subjects exactly as stage 0 does, then
score that head on the fold's peak + neutral frames. It measures what the visual features know about each
AU on new people; the LLM's written answers are scored separately (`evaluate`) and can only lose from this.

    python scripts/encoder_cv.py --manifest ../shared/data/ckplus48/manifest.csv --folds 5 --out cv.json
    python scripts/encoder_cv.py --merge fold0.json folds1-4.json --out cv.json   # runs of --only, joined
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aullava.data.faces import face_batch, prepare_faces  # noqa: E402
from aullava.encoders import CNN_KINDS, LANDMARK_L2  # noqa: E402
from aullava.data.manifest import presence_labels, read_manifest, subject_folds  # noqa: E402
from aullava.evaluate import EVAL_KINDS, MIN_POSITIVES, metrics_from_counts, presence_metrics  # noqa: E402
from aullava.model import AULlavaConfig  # noqa: E402
from aullava.train import Trainer, TrainConfig  # noqa: E402

# what reports must share to be merged, and what reports written before a field existed ran
RECIPE = ("steps", "seed", "members", "landmark_logistic", "cnn", "logistic_hog", "landmark_l2", "kinds")
RECIPE_DEFAULTS = {"cnn": "small", "logistic_hog": False, "landmark_l2": LANDMARK_L2,
                   "kinds": ["peak", "neutral", "near_peak"]}  # the default before "frame" joined it


def run_fold(manifest, held_out, steps, seed, log, members: int, landmark_logistic: float = 0.0,
             cnn: str = "small", logistic_hog: bool = False, landmark_l2: float = LANDMARK_L2,
             kinds: tuple = TrainConfig.kinds) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Truth and the head's presence on the fold's faces, the AUs, and each ensemble member's presence."""
    encoder_config = {**AULlavaConfig().encoder, "members": members, "landmark_logistic": landmark_logistic,
                      "cnn": cnn, "logistic_hog": logistic_hog, "landmark_l2": landmark_l2}
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(TrainConfig(manifest=manifest, out=out, held_out_subjects=tuple(sorted(held_out)),
                                      kinds=tuple(kinds), encoder_steps=steps, projector_steps=0, lora_steps=0,
                                      seed=seed, model={"encoder": encoder_config}), log=log)
        trainer.run(resume=False)
        encoder, aus = trainer.model.encoder.eval(), trainer.aus
    test = [s for s in read_manifest(manifest, kinds=EVAL_KINDS) if s.subject in held_out]
    table = prepare_faces(test, progress=False)
    with torch.no_grad():
        chip, landmarks = face_batch(table, range(len(table)), trainer.model.config.chip_size)
        tokens, per_member = encoder(chip, landmarks, per_member=True)
        logits = encoder.read_logits(tokens)
    truth, _ = presence_labels(table.samples, aus)
    return truth, (logits > 0).numpy(), aus, [(m > 0).numpy() for m in per_member]


def summarize(folds: list[dict], recipe: dict) -> dict:
    """The report: the folds' entries, each AU's mean F1 over the folds where it occurs and its F1 over the
    pooled faces (from the folds' summed counts), and both macro F1s."""
    folds = sorted(folds, key=lambda f: f["fold"])
    names = list(folds[0]["per_au"])
    pooled = metrics_from_counts({au: tuple(sum(f["per_au"][au][c] for f in folds) for c in ("tp", "fp", "fn"))
                                  for au in names})
    per_au = {}
    for au in names:
        scores = [f["per_au"][au]["f1"] for f in folds if f["per_au"][au]["support"] >= 1]
        per_au[au] = {"mean_f1": round(float(np.mean(scores)), 4) if scores else None,
                      "pooled_f1": pooled["per_au"][au]["f1"], "support": pooled["per_au"][au]["support"]}
    return {"folds": folds, **recipe, "per_au": per_au,
            "macro_f1_mean_over_folds": round(float(np.mean([f["macro_f1"] for f in folds])), 4),
            "macro_f1_pooled": pooled["macro_f1"], "min_positives": MIN_POSITIVES}


def merged(paths) -> dict:
    """One report from runs of single folds (`--only`), which must share their recipe and not repeat a fold."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    recipes = {json.dumps({k: r.get(k, RECIPE_DEFAULTS.get(k)) for k in RECIPE}, sort_keys=True) for r in reports}
    if len(recipes) > 1:
        raise SystemExit(f"these reports come from different recipes ({' vs '.join(sorted(recipes))}): not merged")
    folds = [f for r in reports for f in r["folds"]]
    subjects = [s for f in folds for s in f["held_out"]]
    repeated = sorted({s for s in subjects if subjects.count(s) > 1})
    if repeated:  # the same fold twice, or folds of different splits
        raise SystemExit(f"subjects {repeated} are held out in more than one fold: not merged")
    return summarize(folds, {k: reports[0].get(k, RECIPE_DEFAULTS.get(k)) for k in RECIPE})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", help="required unless --merge")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", type=int, default=AULlavaConfig().encoder.get("members", 1),
                        help="encoders averaged (an ensemble); default: the model's default")
    parser.add_argument("--landmark-logistic", type=float,
                        default=AULlavaConfig().encoder.get("landmark_logistic", 0.0),
                        help="weight of the landmark regression's logit in the head (0: none); default: the model's")
    parser.add_argument("--cnn", choices=CNN_KINDS, default=AULlavaConfig().encoder.get("cnn", "small"),
                        help="the members' CNN (mini_xception starts from FER2013 weights); default: the model's")
    parser.add_argument("--logistic-hog", action="store_true",
                        help="the landmark regression also reads the chip's gradient histograms")
    parser.add_argument("--landmark-l2", type=float, default=AULlavaConfig().encoder.get("landmark_l2", LANDMARK_L2),
                        help="the landmark regression's L2 penalty (default: the model's, 10)")
    parser.add_argument("--kinds", nargs="+", default=list(TrainConfig.kinds),
                        help="manifest kinds the encoder trains on (default: the recipe's)")
    parser.add_argument("--only", type=int, nargs="+", help="run only these folds (0-based); the others are skipped")
    parser.add_argument("--merge", nargs="+", metavar="REPORT",
                        help="train nothing: join reports of runs of other folds (--only) into one")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.merge:
        report = merged(args.merge)
    elif not args.manifest:
        parser.error("--manifest is required (or --merge)")
    else:
        report = run(args)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"macro F1: mean over folds {report['macro_f1_mean_over_folds']}, pooled {report['macro_f1_pooled']}; "
          f"written {args.out}")


def run(args) -> dict:
    samples = read_manifest(args.manifest)
    folds = subject_folds(samples, args.folds, seed=args.seed)
    entries = []
    for index, held_out in enumerate(folds):
        if args.only and index not in args.only:
            continue
        truth, predicted, aus, members = run_fold(args.manifest, held_out, args.steps, args.seed, log=print,
                                                  members=args.members, landmark_logistic=args.landmark_logistic,
                                                  cnn=args.cnn, logistic_hog=args.logistic_hog,
                                                  landmark_l2=args.landmark_l2, kinds=args.kinds)
        metrics = presence_metrics(truth, predicted, aus)
        member_f1 = [presence_metrics(truth, m, aus)["macro_f1"] for m in members]
        print(f"fold {index}: {len(truth)} images, macro F1 {metrics['macro_f1']}"
              + (f" (members alone: {', '.join(map(str, member_f1))})" if len(members) > 1 else ""), flush=True)
        entries.append({"fold": index, "held_out": sorted(held_out), "images": len(truth), **metrics,
                        **({"members_macro_f1": member_f1} if len(members) > 1 else {})})
    return summarize(entries, {key: getattr(args, key) for key in RECIPE})  # the flags are named as the fields


if __name__ == "__main__":
    main()
