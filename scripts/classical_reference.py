"""The classical reference the model must beat, on the same subject folds: dlib's 68 landmarks,
similarity-aligned to the canonical face (the encoder's alignment), one L2 logistic regression per AU.

It scores the held-out faces of each fold exactly as `evaluate` and `encoder_cv.py` do (peak + neutral frames,
macro F1 over AUs with >= 10 positives), so its figures sit beside theirs: fold 0 is the model card's split.

    python scripts/classical_reference.py --manifest ../shared/data/ckplus48/manifest.csv --folds 5 --out ref.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aullava.data.faces import prepare_faces  # noqa: E402
from aullava.data.manifest import read_manifest, subject_folds  # noqa: E402
from aullava.evaluate import EVAL_KINDS, presence_metrics  # noqa: E402
from aullava.face import align_face  # noqa: E402
from aullava.model import AULlavaConfig  # noqa: E402
from aullava.train import TrainConfig  # noqa: E402


def aligned_landmarks(table, size: int = 64) -> np.ndarray:
    """[N, 136]: each face's landmarks on the canonical chip, flattened."""
    return np.stack([align_face(image, points, size=size)[1].ravel() for image, points in
                     zip(table.images, table.landmarks)]).astype(np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50) -> np.ndarray:
    """Weights (bias last) of an L2-penalised logistic regression (bias unpenalised), by Newton's method."""
    design = np.hstack([x, np.ones((len(x), 1))])
    weights = np.zeros(design.shape[1])
    penalty = np.full(design.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-design @ weights))
        gradient = design.T @ (p - y) + penalty * weights
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(len(weights))
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-8:
            break
    return weights


def run_fold(train_table, test_table, aus, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Truth and predicted presence [faces, AUs] of the test faces, one regression per AU fit on the train faces."""
    x_train, x_test = aligned_landmarks(train_table), aligned_landmarks(test_table)
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / scale, (x_test - mean) / scale
    truth = np.array([[a in s.aus for a in aus] for s in test_table.samples])
    predicted = np.zeros_like(truth)
    for k, au in enumerate(aus):
        known = np.array([s.is_known(au) for s in train_table.samples])
        y = np.array([au in s.aus for s in train_table.samples], dtype=np.float64)[known]
        if y.min() == y.max():  # one class only in training: predict it
            predicted[:, k] = bool(y[0]) if len(y) else False
            continue
        weights = fit_logistic(x_train[known], y, l2)
        predicted[:, k] = x_test @ weights[:-1] + weights[-1] > 0
    return truth, predicted


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the fold deal's seed (encoder_cv.py's default)")
    parser.add_argument("--l2", type=float, default=10.0,
                        help="L2 penalty on the standardised features (10: the best of 0.1, 1, 10, 100 over 5 folds)")
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
        truth, predicted = run_fold(train, test, aus, args.l2)
        metrics = presence_metrics(truth, predicted, aus)
        print(f"fold {index}: {len(truth)} images, macro F1 {metrics['macro_f1']}", flush=True)
        entries.append({"fold": index, "held_out": sorted(held_out), "images": len(truth), **metrics})
    report = {"method": "aligned dlib landmarks + one L2 logistic regression per AU", "l2": args.l2,
              "seed": args.seed, "folds": entries,
              "macro_f1_mean_over_folds": round(float(np.mean([f["macro_f1"] for f in entries])), 4)}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"macro F1 mean over folds {report['macro_f1_mean_over_folds']}; written {args.out}")


if __name__ == "__main__":
    main()
