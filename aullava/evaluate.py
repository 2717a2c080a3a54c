"""Evaluation on any manifest: per-AU precision/recall/F1 for each format, agreement between formats,
intensity errors where intensities are coded, face detection rate and seconds per image."""
from __future__ import annotations

import math
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data.manifest import ManifestError, presence_labels, read_manifests
from .face import FaceError, load_image
from .formats import au_code

MIN_POSITIVES = 10  # AUs with fewer positives are listed but left out of macro F1
EVAL_KINDS = ("peak", "neutral")  # CK+'s coded frames; near_peak frames carry the peak's labels uncoded


def presence_metrics(truth: np.ndarray, predicted: np.ndarray, aus, known: np.ndarray | None = None) -> dict:
    """truth/predicted [N, K] booleans -> per-AU precision, recall, F1, support and macro F1; pairs whose label
    is unknown (`known` False) are left out."""
    counts = {}
    for k, au in enumerate(aus):
        keep = slice(None) if known is None else known[:, k]
        t, p = truth[keep, k], predicted[keep, k]
        counts[f"AU{au}"] = (int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum()))
    return metrics_from_counts(counts)


def metrics_from_counts(counts: dict) -> dict:
    """{AU name: (true positives, false positives, false negatives)} -> the report of `presence_metrics` (so
    counts summed over folds give the pooled report). A ratio without a denominator is None, not 0: precision
    where nothing was predicted, recall where nothing is there, F1 where neither (nothing to score)."""
    per_au = {}
    for name, (tp, fp, fn) in counts.items():
        precision = round(tp / (tp + fp), 4) if tp + fp else None
        recall = round(tp / (tp + fn), 4) if tp + fn else None
        f1 = round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None
        per_au[name] = {"precision": precision, "recall": recall, "f1": f1,
                        "support": tp + fn, "tp": tp, "fp": fp, "fn": fn}
    return {"per_au": per_au, **macro_f1(per_au)}


def macro_f1(per_au: dict, min_positives: int = MIN_POSITIVES) -> dict:
    """Macro F1 over the AUs with at least `min_positives` positives, and which AUs those are."""
    names = [k for k, v in per_au.items() if v["support"] >= min_positives]
    return {"macro_f1": round(float(np.mean([per_au[k]["f1"] for k in names])), 4) if names else None,
            "macro_f1_aus": names}


def checked_min_positives(min_positives: int) -> int:
    if min_positives < 1:
        raise ValueError(f"the positive bar (--min-positives) must be at least 1, got {min_positives}")
    return min_positives


def _with_min_positives(report, min_positives: int):
    """Every macro F1 in a report (formats, diagnostics) taken over the AUs with `min_positives` positives."""
    if isinstance(report, dict):
        if "per_au" in report and "macro_f1" in report:
            report.update(macro_f1(report["per_au"], min_positives))
        for value in report.values():
            _with_min_positives(value, min_positives)


def icc_3_1(ratings) -> float | None:
    """ICC(3,1) of Shrout & Fleiss (two-way mixed, consistency, single rater) for an [n targets, k raters]
    table; None when it is undefined (fewer than 2 targets or no variance)."""
    y = np.asarray(ratings, float)
    n, k = y.shape
    if n < 2 or k < 2:
        return None
    grand = y.mean()
    ss_rows = k * ((y.mean(1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(0) - grand) ** 2).sum()
    ss_error = ((y - grand) ** 2).sum() - ss_rows - ss_cols
    ms_rows, ms_error = ss_rows / (n - 1), ss_error / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error
    return None if denominator <= 0 else float((ms_rows - ms_error) / denominator)


def _agreement(t: np.ndarray, p: np.ndarray) -> dict:
    r = float(np.corrcoef(t, p)[0, 1]) if len(t) > 1 and t.std() > 0 and p.std() > 0 else None
    icc = icc_3_1(np.stack([t, p], axis=1))
    return {"pairs": len(t), "mae": round(float(np.abs(t - p).mean()), 4),
            "pearson_r": None if r is None or math.isnan(r) else round(r, 4),
            "icc3_1": None if icc is None or math.isnan(icc) else round(icc, 4)}


def intensity_metrics(truth: list, predicted: list, aus: list | None = None) -> dict | None:
    """Pairs (coded level, predicted level), optionally each with its AU -> MAE, Pearson r and ICC(3,1) over
    all pairs and per AU; None without coded labels."""
    if not truth:
        return None
    t, p = np.asarray(truth, float), np.asarray(predicted, float)
    out = _agreement(t, p)
    if aus is not None:
        tags = np.asarray(aus)
        out["per_au"] = {f"AU{a}": _agreement(t[tags == a], p[tags == a]) for a in sorted(set(aus))}
    return out


def asked_groups(samples, aus) -> list[tuple[tuple, list[int]]]:
    """The samples' positions grouped by the AUs each is asked about, as in training: those of the model's
    `aus` it has a label for (a DISFA frame of a model trained with BP4D is asked DISFA's AUs), in order."""
    groups: dict = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.asked(aus) or tuple(aus), []).append(i)
    return list(groups.items())


def level_pairs(sample, result, aus) -> list[tuple]:
    """(coded level, written level, AU) for the AUs whose level the labels give: a present AU's coded level,
    or 0 for an AU labelled absent. Nothing for an image without coded levels or an answer without levels; an AU
    without a label (unknown, or not coded by its dataset) or present without a coded level is left out."""
    if not sample.intensities or all(v is None for v in result.intensity.values()):
        return []
    return [(sample.intensities.get(a, 0), result.intensity.get(a) or 0.0, a) for a in aus
            if sample.is_known(a) and (a not in sample.aus or a in sample.intensities)]


def scored_samples(manifest, images_root=None, kinds=None, subjects=None) -> tuple[list, list]:
    """The manifest rows `evaluate` scores (without `kinds`, all but near_peak; only `subjects` if given), and
    those of them whose image file is missing (scored as undetected, like an unreadable image). A subject without
    rows, or not one image found (a wrong --images-root), is a ManifestError."""
    samples = read_manifests(manifest, images_root, kinds=kinds)
    if kinds is None:
        samples = [s for s in samples if s.kind != "near_peak"]
    if subjects:
        absent = sorted(set(subjects) - {s.subject for s in samples})
        if absent:
            raise ManifestError(f"subject(s) {', '.join(absent)} have no rows to score in the manifest"
                                + (f" (kinds {', '.join(kinds)})" if kinds else " (peak and neutral rows)"))
        samples = [s for s in samples if s.subject in set(subjects)]
    if not samples:
        raise ManifestError("the manifest has no rows to score: without --kinds, near_peak rows are left out")
    missing = [s for s in samples if not Path(s.path).is_file()]
    if len(missing) == len(samples):
        raise ManifestError(f"none of the manifest's {len(samples)} images exist (the first is looked for at "
                            f"{missing[0].path}); give the folder its paths are relative to with --images-root")
    return samples, missing


def evaluate(analyzer, manifest, images_root=None, formats=("list", "binary"), kinds=None,
             subjects=None, batch_size: int = 16, progress: bool = True, diagnostics: bool = True,
             predictions: list | None = None, scored: tuple | None = None,
             min_positives: int = MIN_POSITIVES) -> dict:
    """Metrics of the model's written answers per format. With `diagnostics`, also (labelled apart, never as
    the model's answer) its encoder's own per-AU head and the fast read-out of the live mode: what the
    features know, and how much of it the writing keeps; and the read-out on chimeric faces: whether the LLM
    reads each AU's token or the face as a whole. `predictions`, a list, receives one row per image and format
    (see prediction_row): what the model wrote for each face, parsed, beside its labels. `scored`: what
    `scored_samples` gave for these arguments, where the caller has it already. Macro F1 is taken over the AUs
    with at least `min_positives` positives (10, the bar the model card reports at; fewer for a small set)."""
    checked_min_positives(min_positives)
    samples, missing = scored if scored is not None else scored_samples(manifest, images_root, kinds, subjects)
    aus = analyzer.aus
    detected, faces, detect_seconds, undetected = [], [], 0.0, []  # undetected: (sample, reason)
    for sample in tqdm(samples, desc="detect", disable=not progress, unit="img"):
        started = time.perf_counter()
        try:
            found = analyzer.detector.detect(load_image(sample.path))
            detected.append(sample)
            faces.append(found[0])
        except FaceError as error:
            undetected.append((sample, str(error)))
        detect_seconds += time.perf_counter() - started
    # Undetected images count as "no AU" predictions in the metrics: the tool gave no answer for them.
    truth, known = presence_labels(samples, aus)
    index_of = {id(s): i for i, s in enumerate(samples)}
    report = {"images": len(samples), "faces_detected": len(detected),
              "detection_rate": round(len(detected) / len(samples), 4),
              "undetected": [{"path": str(s.path), "reason": reason} for s, reason in undetected[:50]],
              "missing_images": len(missing), "missing_examples": [str(s.path) for s in missing[:20]],
              "aus": list(aus), "subjects": sorted({s.subject for s in samples}), "formats": {}}
    presence_by_format, answered = {}, {}
    for format_name in formats:
        predicted = np.zeros_like(truth)
        answered[format_name] = parsed = np.zeros(len(samples), bool)
        parse_failures, gen_seconds, levels_true, levels_pred, level_aus = [], 0.0, [], [], []
        bar = tqdm(total=len(detected), desc=format_name, disable=not progress, unit="img")
        # speculating, the model writes one face at a time anyway: the bar can move per image
        step = 1 if getattr(analyzer, "speculate", False) else batch_size
        for asked, members in asked_groups(detected, aus):
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                began = time.perf_counter()
                results = analyzer.describe([faces[i] for i in chunk], format_name, aus=asked)
                gen_seconds += time.perf_counter() - began
                bar.update(len(chunk))
                for i, outcome in zip(chunk, results):
                    sample = detected[i]
                    row = index_of[id(sample)]
                    if predictions is not None:
                        predictions.append(prediction_row(sample, format_name, aus, outcome.text, outcome.error,
                                                          outcome.result))
                    if outcome.result is None:
                        parse_failures.append({"path": str(sample.path), "text": outcome.text,
                                               "error": outcome.error})
                        continue
                    predicted[row] = [outcome.result.present.get(a, False) for a in aus]  # unasked: no label
                    parsed[row] = True
                    for coded, written, a in level_pairs(sample, outcome.result, asked):
                        levels_true.append(coded)
                        levels_pred.append(written)
                        level_aus.append(a)
        bar.close()
        if predictions is not None:
            predictions += [prediction_row(sample, format_name, aus, "", reason, None) for sample, reason in undetected]
        metrics = presence_metrics(truth, predicted, aus, known)
        metrics.update({"parse_failures": len(parse_failures), "parse_failure_examples": parse_failures[:5],
                        "seconds_per_image": round((detect_seconds + gen_seconds) / max(1, len(samples)), 4),
                        "generate_seconds_per_face": round(gen_seconds / max(1, len(detected)), 4),
                        "intensity": intensity_metrics(levels_true, levels_pred, level_aus)})
        report["formats"][format_name] = metrics
        presence_by_format[format_name] = predicted
    # over the labelled pairs of images every format answered: an unanswered image "agrees" on nothing
    compared = known & np.logical_and.reduce(list(answered.values()))[:, None]
    report["agreement"] = format_agreement(presence_by_format, compared)
    report["agreement_pairs"] = int(compared.sum())
    if not known.all():
        report["unknown_labels"] = int((~known).sum())
    if diagnostics and detected:
        report["diagnostics"] = _diagnostics(analyzer, faces, [index_of[id(s)] for s in detected], truth, known,
                                             batch_size, presence_by_format.get("binary"), answered.get("binary"),
                                             progress)
    _with_min_positives(report, min_positives)
    report["min_positives"] = min_positives
    return report


def prediction_row(sample, format_name, aus, text, error, result) -> dict:
    """One image's answer in one format beside its labels: `AUn_true` (1, 0, or empty where the label is not
    known), `AUn_pred` (1 or 0 as the parsed answer implies) and `AUn_intensity` (where the format writes one),
    n in two digits as the model writes it and OpenFace names its columns (AU01_true); empty where nothing was
    parsed, or the AU was not asked (an image is asked the AUs it has labels for)."""
    row = {"path": str(sample.path), "subject": sample.subject, "sequence": sample.sequence, "frame": sample.frame,
           "kind": sample.kind, "emotion": sample.emotion, "format": format_name, "text": text, "error": error or ""}
    for a in aus:
        code = au_code(a)
        row[f"{code}_true"] = int(a in sample.aus) if sample.is_known(a) else ""
        row[f"{code}_true_intensity"] = sample.intensities.get(a, "")  # the coded level, where there is one
        asked = result is not None and a in result.present  # an image is asked only the AUs it has labels for
        row[f"{code}_pred"] = int(bool(result.present[a])) if asked else ""
        level = result.intensity[a] if asked else None
        row[f"{code}_intensity"] = "" if level is None else level
    return row


def _diagnostics(analyzer, faces, rows, truth, known, batch_size, binary=None, binary_answered=None,
                 progress: bool = False) -> dict:
    import torch

    aus = analyzer.aus
    model = analyzer.model
    head, readout, converged = np.zeros_like(truth), np.zeros_like(truth), 0
    encoded = []
    for start in tqdm(range(0, len(faces), batch_size), desc="head + read-out", disable=not progress, unit="batch"):
        batch = faces[start:start + batch_size]
        chip, landmarks = analyzer._tensors(batch)
        with torch.no_grad(), analyzer.lock:
            tokens, logits = model.on_model_thread(model.encoder, chip, landmarks)
        encoded.append((chip, landmarks, tokens, logits))
        with analyzer.lock:
            p_one, done = model.read_presence(chip, landmarks, encoded=(tokens, logits))
        batch_rows = rows[start:start + batch_size]
        head[batch_rows] = (logits > 0).numpy()
        readout[batch_rows] = p_one.float().cpu().numpy() >= 0.5
        converged += int(done.sum())
    out = {"encoder_head": presence_metrics(truth, head, aus, known),
           "readout": presence_metrics(truth, readout, aus, known),
           "readout_converged": round(converged / max(1, len(faces)), 4),
           "readout_agrees_with_head": round(float((readout[rows] == head[rows]).mean()), 4),
           "chimeras": _chimeric_readout(analyzer, rows, truth, known, batch_size, encoded, progress)}
    if binary is not None and binary_answered.any():  # on the images whose binary answer was read
        out["readout_agrees_with_binary"] = round(float((readout == binary)[binary_answered].mean()), 4)
    return out


def _chimeric_readout(analyzer, rows, truth, known, batch_size, encoded, progress: bool = False) -> dict:
    """The read-out on chimeric faces: each AU's token taken from another evaluated face (seeded), its truth that
    face's label. The head reads each token alone; an LLM that reads each token too keeps its F1 here, one that
    reads the face as a whole (e.g. as a posed-emotion prototype) loses it. `encoded`: per batch of `batch_size`
    faces, (chip, landmarks, AU tokens, logits)."""
    import torch

    tokens = torch.cat([t for _, _, t, _ in encoded])
    logits = torch.cat([l for _, _, _, l in encoded])
    n, k = logits.shape
    lender = np.random.default_rng(0).integers(n, size=(n, k))
    column = np.arange(k)[None, :]
    tokens, logits = tokens[lender, column], logits[lender, column]
    truth, known = truth[rows][lender, column], known[rows][lender, column]
    read = []
    batches = zip(range(0, n, batch_size), encoded)
    for start, (chip, landmarks, _, _) in tqdm(batches, desc="chimeric read-out", total=len(encoded),
                                               disable=not progress, unit="batch"):
        part = slice(start, start + batch_size)  # the batch's chips only give its size: the tokens are given
        with analyzer.lock:
            p_one, _ = analyzer.model.read_presence(chip, landmarks, encoded=(tokens[part], logits[part]))
        read.append(p_one.float().cpu().numpy() >= 0.5)
    read, head = np.concatenate(read), (logits > 0).cpu().numpy()
    return {"encoder_head": presence_metrics(truth, head, analyzer.aus, known),
            "readout": presence_metrics(truth, read, analyzer.aus, known),
            "readout_agrees_with_head": round(float((read == head).mean()), 4)}


def format_agreement(presence_by_format: dict, compared=None) -> dict:
    """Share of (image, AU) pairs on which each pair of formats, and all formats, imply the same presence;
    only the pairs `compared` marks (a bool array of the same shape), when given."""
    names = list(presence_by_format)
    if len(names) < 2:
        return {}
    stacked = np.stack([presence_by_format[n] for n in names])
    compared = np.ones(stacked.shape[1:], bool) if compared is None else np.asarray(compared, bool)
    if not compared.any():
        return {}
    pairs = {f"{a}~{b}": round(float((stacked[i] == stacked[j])[compared].mean()), 4)
             for (i, a), (j, b) in combinations(enumerate(names), 2)}
    pairs["all"] = round(float((stacked == stacked[0]).all(axis=0)[compared].mean()), 4)
    return pairs
