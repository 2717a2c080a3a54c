"""Subject-exclusive k-fold cross-validation of the whole model, as the AU literature reports it.

For each fold: train encoder, projector and LoRA on the other folds' subjects (`train.Trainer`), then score the
written answers on the fold's subjects (`evaluate.evaluate`). The report holds, per format, each AU's F1 per
fold, its mean over folds (the usual BP4D / DISFA table) and its F1 on the pooled predictions, the average over
AUs, and intensity MAE / Pearson r / ICC(3,1) per AU where intensities are coded. Resumable: a fold whose
`metrics.json` exists is read back, a fold whose training stopped resumes from its saved state.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from accelerate import PartialState

from . import facs
from .data.manifest import read_manifests, subject_folds
from .distributed import use_cpu
from .evaluate import MIN_POSITIVES, evaluate
from .model import AULlavaConfig
from .train import Trainer, TrainConfig, finished_recipe, recipe_changes, run_recipe


def crossval(config: TrainConfig, folds: int = 3, formats=("list", "binary"), diagnostics: bool = False,
             log=print) -> dict:
    """Train and evaluate `folds` times; `config.out` receives fold<i>/ (run + metrics.json), crossval.json and
    crossval.md. `config` is the training recipe; its held-out subjects are set per fold."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    state = PartialState(cpu=use_cpu(config.cpu))  # one process, or those of `accelerate launch`
    log = log if state.is_main_process else (lambda *args, **kwargs: None)
    samples = read_manifests(config.manifest, config.images_root)
    groups = subject_folds(samples, folds, seed=config.seed)
    reports, started = [], time.perf_counter()  # `seconds` in the report: this invocation's wall time
    for index, held_out in enumerate(groups):
        fold_dir = out / f"fold{index}"
        metrics_path = fold_dir / "metrics.json"
        fold_config = replace(config, out=str(fold_dir), held_out_subjects=tuple(sorted(held_out)))
        saved = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        if saved is not None and saved.get("held_out") != sorted(held_out):
            raise ValueError(f"{fold_dir} holds a fold of another split (other held-out subjects: another --folds, "
                             "--seed or manifest): give another --out")
        finished = finished_recipe(fold_dir)
        if (saved is not None and set(formats) <= set(saved["formats"]) and finished is not None
                and not recipe_changes(finished, run_recipe(fold_config), budget=True)):
            log(f"fold{index} ({index + 1} of {folds}): already trained and evaluated with these settings, read from {metrics_path}")
            reports.append(saved)
            continue
        log(f"fold{index} ({index + 1} of {folds}): training without {len(held_out)} held-out subjects")
        fold_started = time.perf_counter()
        checkpoint = Trainer(fold_config, log=log).run(resume=True)
        gc.collect()
        # Under `accelerate launch` training is shared; the held-out fold is evaluated once, by the main process.
        if state.is_main_process:
            report = _evaluate_fold(checkpoint, config, held_out, formats, diagnostics)
            report["held_out"] = sorted(held_out)
            report["fold_seconds"] = round(time.perf_counter() - fold_started, 1)  # this run's training + evaluation
            metrics_path.write_text(json.dumps(report, indent=2))
        state.wait_for_everyone()
        report = json.loads(metrics_path.read_text())
        reports.append(report)
        log(f"fold{index} ({index + 1} of {folds}): " + ", ".join(f"{name} macro F1 {m['macro_f1']}"
                                                      for name, m in report["formats"].items()))
    summary = summarize(reports, formats)
    if not state.is_main_process:
        return summary
    summary.update({"folds": folds, "seed": config.seed, "manifest": str(config.manifest),
                    "budget": {k: getattr(config, k) for k in ("encoder_steps", "projector_steps", "lora_steps",
                                                               "encoder_batch", "batch_size")},
                    "encoder": AULlavaConfig.from_dict(config.model).encoder,
                    "seconds": round(time.perf_counter() - started, 1),
                    "fold_seconds": [r.get("fold_seconds") for r in reports]})
    (out / "crossval.json").write_text(json.dumps(summary, indent=2))
    (out / "crossval.md").write_text(markdown(summary))
    return summary


def _evaluate_fold(checkpoint, config: TrainConfig, held_out, formats, diagnostics) -> dict:
    from .service import Analyzer

    analyzer = Analyzer(str(checkpoint), own_thread=False)  # this thread just trained: one OpenMP team
    try:
        return evaluate(analyzer, config.manifest, config.images_root, tuple(formats), subjects=held_out,
                        diagnostics=diagnostics)
    finally:
        del analyzer
        gc.collect()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def summarize(reports: list[dict], formats) -> dict:
    """Per format and AU: F1 per fold, mean over folds (folds where the AU occurs), pooled F1, support; the
    average over AUs with >= MIN_POSITIVES positives in all; intensity agreement per AU averaged over folds."""
    aus = reports[0]["aus"]
    table = {}
    for name in formats:
        per_fold = [r["formats"][name]["per_au"] for r in reports]
        per_au = {}
        for au in (f"AU{a}" for a in aus):
            folds = [fold[au] for fold in per_fold]
            tp, fp, fn = (sum(f[k] for f in folds) for k in ("tp", "fp", "fn"))
            pooled = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            per_au[au] = {"f1_per_fold": [f["f1"] if f["support"] else None for f in folds],
                          "mean_f1": _mean(f["f1"] for f in folds if f["support"]),
                          "pooled_f1": round(pooled, 4), "support": sum(f["support"] for f in folds)}
        scored = [v for v in per_au.values() if v["support"] >= MIN_POSITIVES and v["mean_f1"] is not None]
        entry = {"per_au": per_au, "average_f1": _mean(v["mean_f1"] for v in scored),
                 "average_pooled_f1": _mean(v["pooled_f1"] for v in scored),
                 "average_aus": [au for au, v in per_au.items() if v in scored],
                 "macro_f1_per_fold": [r["formats"][name]["macro_f1"] for r in reports],
                 "parse_failures": sum(r["formats"][name]["parse_failures"] for r in reports)}
        intensity = _intensity_summary([r["formats"][name].get("intensity") for r in reports])
        if intensity:
            entry["intensity"] = intensity
        table[name] = entry
    return {"aus": aus, "min_positives": MIN_POSITIVES, "formats": table,
            "images_per_fold": [r["images"] for r in reports],
            "detection_rate_per_fold": [r["detection_rate"] for r in reports],
            "agreement_per_fold": [r.get("agreement", {}).get("all") for r in reports]}


def _intensity_summary(fold_metrics: list) -> dict | None:
    fold_metrics = [m for m in fold_metrics if m]
    if not fold_metrics:
        return None
    per_au = {}
    for au in sorted({au for m in fold_metrics for au in m.get("per_au", {})}, key=lambda code: int(code[2:])):
        folds = [m["per_au"][au] for m in fold_metrics if au in m.get("per_au", {})]
        per_au[au] = {"pairs": sum(f["pairs"] for f in folds),
                      **{k: _mean(f[k] for f in folds) for k in ("mae", "pearson_r", "icc3_1")}}
    return {"per_au": per_au, **{k: _mean(m[k] for m in fold_metrics) for k in ("mae", "pearson_r", "icc3_1")}}


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(summary: dict) -> str:
    """The report as markdown tables (one per format), columns like a published per-AU F1 table."""
    folds = summary.get("folds", len(summary["images_per_fold"]))
    lines = [f"Subject-exclusive {folds}-fold cross-validation: F1 of the model's written answers per AU, each "
             f"fold's held-out subjects never seen in its training. `mean` = mean over folds where the AU occurs, "
             f"`pooled` = F1 over all folds' predictions. Images per fold: {summary['images_per_fold']}.", ""]
    for name, entry in summary["formats"].items():
        header = ["AU", "name"] + [f"fold {i}" for i in range(folds)] + ["mean", "pooled", "positives"]
        lines += [f"### {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for au, v in entry["per_au"].items():
            lines.append("| " + " | ".join([au, facs.AUS[int(au[2:])].name] + [_cell(f) for f in v["f1_per_fold"]]
                                            + [_cell(v["mean_f1"]), _cell(v["pooled_f1"]), str(v["support"])]) + " |")
        lines.append("| **macro F1** | | " + " | ".join(_cell(f) for f in entry["macro_f1_per_fold"])
                     + f" | {_cell(_mean(entry['macro_f1_per_fold']))} | | |")
        lines += ["", f"Average over the AUs with >= {summary['min_positives']} positives in all folds: mean F1 "
                      f"**{_cell(entry['average_f1'])}**, pooled F1 {_cell(entry['average_pooled_f1'])}. "
                      f"The macro F1 row: each fold's own (AUs with >= {summary['min_positives']} positives in that "
                      f"fold), and their mean. Parse failures: {entry['parse_failures']}.", ""]
        if entry.get("intensity"):
            lines += [f"Intensity of `{name}` on coded labels (mean over folds):", "",
                      "| AU | pairs | MAE | Pearson r | ICC(3,1) |", "|---|---|---|---|---|"]
            for au, v in entry["intensity"]["per_au"].items():
                lines.append(f"| {au} | {v['pairs']} | {_cell(v['mae'])} | {_cell(v['pearson_r'])} | {_cell(v['icc3_1'])} |")
            lines.append("")
    return "\n".join(lines)
