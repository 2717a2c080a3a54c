"""The classical reference the model must beat, on the same subject folds: dlib's 68 landmarks,
similarity-aligned to the canonical face (the encoder's alignment), one L2 logistic regression per AU (the
encoder's `LandmarkLogistic`, which the shipped encoder also holds beside its CNNs). With --hog, histograms of
oriented gradients of the aligned chip are features beside the landmarks (a stronger classical reference).

It scores the held-out faces of each fold exactly as `evaluate` and `encoder_cv.py` do (peak + neutral frames,
macro F1 over AUs with >= 10 positives), so its figures sit beside theirs: fold 0 is the model card's split.

    python scripts/classical_reference.py --manifest ../shared/data/ckplus48/manifest.csv --folds 5 --out ref.json
    python scripts/classical_reference.py --manifest ../shared/data/ckplus48/manifest.csv --hog --l2 30 --out ref_hog.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aullava.data.faces import face_batch, prepare_faces  # noqa: E402
from aullava.data.manifest import presence_labels, read_manifest, subject_folds  # noqa: E402
from aullava.encoders import LANDMARK_L2, LandmarkLogistic  # noqa: E402
from aullava.evaluate import EVAL_KINDS, presence_metrics  # noqa: E402
from aullava.model import AULlavaConfig  # noqa: E402
from aullava.train import TrainConfig  # noqa: E402


def run_fold(train_table, test_table, aus, l2: float, hog: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Truth and predicted presence [faces, AUs] of the test faces, one regression per AU fit on the train faces
    (the encoder's `LandmarkLogistic`, alone)."""
    chip_size = AULlavaConfig().chip_size
    train_chip, train_landmarks = face_batch(train_table, range(len(train_table)), chip_size)
    test_chip, test_landmarks = face_batch(test_table, range(len(test_table)), chip_size)
    labels, known = presence_labels(train_table.samples, aus)
    regression = LandmarkLogistic(len(aus), l2=l2, hog_chip_size=chip_size if hog else None)
    regression.fit(train_landmarks, torch.from_numpy(labels).float(), torch.from_numpy(known).float(), train_chip)
    truth, _ = presence_labels(test_table.samples, aus)
    return truth, (regression(test_landmarks, test_chip) > 0).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the fold deal's seed (encoder_cv.py's default)")
    parser.add_argument("--l2", type=float, default=LANDMARK_L2,
                        help="L2 penalty on the standardised features (10: the best of 0.1, 1, 10, 100 over 5 folds; "
                        "with --hog 30, the best of 10, 30, 100, 300, 1000)")
    parser.add_argument("--hog", action="store_true", help="the chip's gradient histograms beside the landmarks")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    aus = list(AULlavaConfig().aus)
    training_kinds = TrainConfig(manifest="", out="").kinds  # the frames `train` learns from
    samples = read_manifest(args.manifest)
    entries = []
    for index, held_out in enumerate(subject_folds(samples, args.folds, seed=args.seed)):
        train = prepare_faces([s for s in samples if s.subject not in held_out and s.kind in training_kinds],
                              progress=False)
        test = prepare_faces([s for s in samples if s.subject in held_out and s.kind in EVAL_KINDS], progress=False)
        truth, predicted = run_fold(train, test, aus, args.l2, args.hog)
        metrics = presence_metrics(truth, predicted, aus)
        print(f"fold {index}: {len(truth)} images, macro F1 {metrics['macro_f1']}", flush=True)
        entries.append({"fold": index, "held_out": sorted(held_out), "images": len(truth), **metrics})
    features = "aligned dlib landmarks" + (" and the aligned chip's gradient histograms (8 px cells, 9 bins)"
                                           if args.hog else "")
    report = {"method": f"{features} + one L2 logistic regression per AU", "l2": args.l2, "hog": args.hog,
              "seed": args.seed, "folds": entries,
              "macro_f1_mean_over_folds": round(float(np.mean([f["macro_f1"] for f in entries])), 4)}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"macro F1 mean over folds {report['macro_f1_mean_over_folds']}; written {args.out}")


if __name__ == "__main__":
    main()
