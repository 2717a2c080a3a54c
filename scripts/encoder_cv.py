"""Subject-exclusive k-fold cross-validation of the AU encoder alone (stage 0 of `python -m aullava train`).

For each fold: train the encoder with its per-AU head on the other subjects exactly as stage 0 does, then
score that head on the fold's peak + neutral frames. It measures what the visual features know about each
AU on new people; the LLM's written answers are scored separately (`evaluate`) and can only lose from this.

    python scripts/encoder_cv.py --manifest ../shared/data/ckplus48/manifest.csv --folds 5 --out cv.json
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
from aullava.data.manifest import read_manifest, subject_folds  # noqa: E402
from aullava.evaluate import EVAL_KINDS, MIN_POSITIVES, presence_metrics  # noqa: E402
from aullava.model import AULlavaConfig  # noqa: E402
from aullava.train import Trainer, TrainConfig  # noqa: E402


def run_fold(manifest, held_out, steps, seed, log, members: int) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Truth and the head's presence on the fold's faces, the AUs, and each ensemble member's presence."""
    encoder_config = {**AULlavaConfig().encoder, "members": members}
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(TrainConfig(manifest=manifest, out=out, held_out_subjects=tuple(sorted(held_out)),
                                      encoder_steps=steps, projector_steps=0, lora_steps=0, seed=seed,
                                      model={"encoder": encoder_config}), log=log)
        trainer.run(resume=False)
        encoder, aus = trainer.model.encoder.eval(), trainer.aus
    test = [s for s in read_manifest(manifest, kinds=EVAL_KINDS) if s.subject in held_out]
    table = prepare_faces(test, progress=False)
    with torch.no_grad():
        chip, landmarks = face_batch(table, range(len(table)), trainer.model.config.chip_size)
        _, per_member = encoder(chip, landmarks, per_member=True)
    truth = np.array([[a in s.aus for a in aus] for s in table.samples])
    return truth, (per_member.mean(0) > 0).numpy(), aus, [(m > 0).numpy() for m in per_member]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--members", type=int, default=AULlavaConfig().encoder.get("members", 1),
                        help="encoders averaged (an ensemble); default: the model's default")
    parser.add_argument("--only", type=int, nargs="+", help="run only these folds (0-based); the others are skipped")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    samples = read_manifest(args.manifest)
    folds = subject_folds(samples, args.folds, seed=args.seed)
    report = {"folds": [], "steps": args.steps, "seed": args.seed, "members": args.members}
    truths, predictions = [], []
    for index, held_out in enumerate(folds):
        if args.only and index not in args.only:
            continue
        truth, predicted, aus, members = run_fold(args.manifest, held_out, args.steps, args.seed, log=print,
                                                  members=args.members)
        metrics = presence_metrics(truth, predicted, aus)
        member_f1 = [presence_metrics(truth, m, aus)["macro_f1"] for m in members]
        print(f"fold {index}: {len(truth)} images, macro F1 {metrics['macro_f1']}"
              + (f" (members alone: {', '.join(map(str, member_f1))})" if len(members) > 1 else ""), flush=True)
        report["folds"].append({"fold": index, "held_out": sorted(held_out), "images": len(truth), **metrics,
                                **({"members_macro_f1": member_f1} if len(members) > 1 else {})})
        truths.append(truth)
        predictions.append(predicted)
    pooled = presence_metrics(np.concatenate(truths), np.concatenate(predictions), aus)
    per_au = {}
    for au in pooled["per_au"]:
        scores = [f["per_au"][au]["f1"] for f in report["folds"] if f["per_au"][au]["support"] >= 1]
        per_au[au] = {"mean_f1": round(float(np.mean(scores)), 4) if scores else None,
                      "pooled_f1": pooled["per_au"][au]["f1"], "support": pooled["per_au"][au]["support"]}
    report["per_au"] = per_au
    report["macro_f1_mean_over_folds"] = round(float(np.mean([f["macro_f1"] for f in report["folds"]])), 4)
    report["macro_f1_pooled"] = pooled["macro_f1"]
    report["min_positives"] = MIN_POSITIVES
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"macro F1: mean over folds {report['macro_f1_mean_over_folds']}, pooled {report['macro_f1_pooled']}; "
          f"written {args.out}")


if __name__ == "__main__":
    main()
