"""`python -m aullava {analyze,evaluate,train,crossval,manifest,bench,push}`."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path


def _writable(path, option: str, stdout_ok: bool = False):
    """Refuse an output path that cannot be written before any work is done; the message names the option.
    `-` means standard output where `stdout_ok`, and is refused elsewhere rather than made a file named `-`."""
    from .batch import STDOUT

    if not path:
        return
    if path == STDOUT:
        if stdout_ok:
            return
        raise ValueError(f"{option} cannot write to standard output (-): give a file name")
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path} is a folder: give a file name")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {target.parent} does not exist")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path} cannot be written ({error.strerror or error})") from None
    if not existed:
        target.unlink()


def _analyze(args) -> int:
    from .service import get_analyzer

    images = _analyze_inputs(args)
    if args.csv or args.jsonl or args.plot:
        return _write_rows(args, images)
    analyzer = get_analyzer(args.checkpoint)
    return 1 if sum(_print_results(analyzer, image, args) for image in map(str, images)) else 0


def _analyze_inputs(args) -> list:
    """The image and video files `analyze` was given, folders expanded, every option checked before any model
    loads (a mistake should not cost the wait)."""
    from . import formats as fmt_lib
    from .batch import STDOUT, expand_inputs
    from .distributed import launched
    from .video import is_video

    fmt_lib.get_format(args.format)
    if args.fps is not None and args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    if args.gather_every < 1:
        raise ValueError(f"--gather-every must be at least 1, got {args.gather_every}")
    for path, option in ((args.csv, "--csv"), (args.jsonl, "--jsonl")):
        _writable(path, option, stdout_ok=True)
    _writable(args.plot, "--plot")
    if args.csv == args.jsonl == STDOUT:
        raise ValueError("--csv - and --jsonl - would both write to standard output: send one of them to a file")
    if args.json and (args.csv or args.jsonl or args.plot):
        raise ValueError("--json prints results instead of writing rows; with --csv/--jsonl/--plot the rows go "
                         "there (--jsonl - writes them to standard output)")
    if launched() and not (args.csv or args.jsonl):
        raise ValueError("analyze under a distributed launcher writes its rows with --csv and/or --jsonl")
    skipped = []
    images = expand_inputs(args.images, skipped)
    if skipped:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in skipped[:10])
        print(f"skipped {len(skipped)} folder entr{'y' if len(skipped) == 1 else 'ies'} that are neither images nor "
              f"videos (subfolders are not searched): {names}{', ...' if len(skipped) > 10 else ''}", file=sys.stderr)
    if not images:
        raise ValueError(f"no image or video files in {', '.join(args.images)}")
    if args.plot and not any(is_video(p) for p in images):
        raise ValueError("--plot draws the AU time series of videos, and no video was given")
    return images


def _write_rows(args, images) -> int:
    """--csv / --jsonl / --plot: OpenFace-style rows, written as they come (shared between the processes of a
    distributed launch); a summary on stderr."""
    from .batch import analyze_batch
    from .distributed import analyze_sharded, launched
    from .service import get_analyzer

    analyzer = get_analyzer(args.checkpoint)
    if launched():
        summary, run = analyze_sharded(analyzer, images, args.format, args.csv, args.jsonl, fps=args.fps,
                                       gather_every=args.gather_every)
        if not run["main"]:
            return 0 if summary.ok else 1
        seconds, processes, per_process = run["seconds"], run["processes"], run["per_process"]
    else:
        started = time.perf_counter()
        summary = analyze_batch(analyzer, images, args.format, args.csv, args.jsonl, fps=args.fps)
        seconds, processes, per_process = time.perf_counter() - started, 1, [len(images)]
    if args.plot:
        _plot_videos(summary, analyzer.aus, args.plot)
    print(summary, file=sys.stderr)
    _print_rate(len(images), seconds, processes, per_process)
    return 0 if summary.ok else 1


def _print_results(analyzer, image: str, args) -> int:
    """One input's faces as lines (or one JSON line per image, --json); returns how many faces or frames gave
    no readable result."""
    from . import formats as fmt_lib
    from .batch import failure_line
    from .face import FaceError
    from .video import is_video

    if is_video(image):
        return _print_video(analyzer, image, args)
    try:
        outcome = analyzer.analyze(image, args.format)
    except FaceError as error:
        print(failure_line(image, str(error)), file=sys.stderr)
        if args.json:
            print(json.dumps({"image": image, "error": str(error)}))
        return 1
    unreadable = [face for face in outcome.faces if face.error]
    if args.json:
        print(json.dumps({"image": image, "faces": [f.to_dict() for f in outcome.faces],
                          "seconds": {k: round(v, 4) for k, v in outcome.seconds.items()}}))
        for face in unreadable:
            print(f"{image} face {face.face.number}: {face.error}", file=sys.stderr)
        return len(unreadable)
    print(f"{image}: {len(outcome.faces)} face(s)")
    for face in outcome.faces:
        box = ", ".join(f"{v:.0f}" for v in face.face.box)
        print(f"  face {face.face.number} box ({box})")
        print(f"    model ({args.format}): {face.text}")
        if face.error:
            print(f"    {face.error}", file=sys.stderr)
            continue
        levels = ", ".join(fmt_lib.au_code(a) + (f"={face.result.intensity[a]:g}"
                                                 if face.result.intensity.get(a) is not None else "")
                           for a in face.result.active)
        print(f"    active AUs: {levels or 'none'}")
    return len(unreadable)


def _print_rate(inputs: int, seconds: float, processes: int, per_process: list):
    print(f"{inputs} input(s) in {seconds:.2f} s ({inputs / max(seconds, 1e-9):.3f} inputs/s) on {processes} "
          f"process(es); inputs per process: {', '.join(map(str, per_process))}", file=sys.stderr)


def _print_video(analyzer, video: str, args) -> int:
    """Prints a line (or a JSON row) per sampled frame and face; returns the number of frames without a result."""
    from .batch import failure_line, failure_place, video_rows

    failed = 0
    for rows in video_rows(analyzer, video, args.format, args.fps, progress=False):
        for row in rows:
            if args.json:
                print(json.dumps(row))
            if not row["success"]:
                failed += 1
                print(failure_line(failure_place(video, row), row["reason"], video), file=sys.stderr)
            elif not args.json:
                active = [key[:-2] for key, value in row.items() if key.endswith("_c") and value]
                print(f"{video} t={row['timestamp']:.2f}s frame {row['frame']} face_id {row['face_id']}: "
                      f"{', '.join(active) or 'no AU'}")
    return failed


def _plot_videos(summary, aus, target: str):
    from .plots import au_time_series

    target = Path(target)
    stems = [Path(video).stem for video in summary.video_rows]
    for position, (video, rows) in enumerate(summary.video_rows.items()):
        if not any(row["success"] for row in rows):
            print(f"no time series of {video}: no sampled frame has a result", file=sys.stderr)
            continue
        stem = stems[position] + (f"-{position + 1}" if stems.count(stems[position]) > 1 else "")  # a/x.mp4, b/x.mp4
        path = target if len(stems) == 1 else target.with_name(f"{target.stem}-{stem}{target.suffix}")
        au_time_series(rows, aus, title=Path(video).name).save(path)
        print(f"time series of {video} written to {path}", file=sys.stderr)


def _names(text: str | None) -> tuple | None:
    """A comma-separated flag's names, without the spaces around them ("S005, S010"); None when not given."""
    names = tuple(name.strip() for name in text.split(",") if name.strip()) if text else ()
    return names or None


def _manifests(paths: list | None):
    """--manifest as given: one path (as a single dataset's runs record it) or a list of them."""
    return paths[0] if paths and len(paths) == 1 else paths


def _evaluate(args) -> int:
    from .data.manifest import label_warnings
    from .evaluate import MIN_POSITIVES, checked_min_positives, evaluate, scored_samples
    from .service import Analyzer

    manifest = _manifests(args.manifest)
    kinds, subjects = _names(args.kinds), _names(args.subjects)
    least = checked_min_positives(MIN_POSITIVES if args.min_positives is None else args.min_positives)
    scored = scored_samples(manifest, args.images_root, kinds, subjects)  # refused before the model loads
    samples = scored[0]
    _writable(args.out, "--out")
    _writable(args.predictions, "--predictions")
    analyzer = Analyzer(args.checkpoint, speculate=not args.no_speculate)
    warnings = label_warnings(samples, analyzer.aus, training=False) + _seen_in_training(samples, analyzer)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = [] if args.predictions else None
    report = evaluate(analyzer, manifest, args.images_root, tuple(args.formats), kinds, subjects, predictions=rows,
                      diagnostics=not args.no_diagnostics, scored=scored, min_positives=least)
    if rows is not None:
        with open(args.predictions, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
            writer.writeheader()
            writer.writerows(rows)
    report["checkpoint"] = str(analyzer.checkpoint)
    report["speculate"] = analyzer.speculate
    report.update(manifest=manifest, kinds=list(kinds) if kinds else "every kind but near_peak",
                  warnings=warnings)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if report["missing_images"]:
        print(f"warning: {report['missing_images']} image(s) of the manifest do not exist (e.g. "
              f"{report['missing_examples'][0]}): scored as undetected, listed in the report", file=sys.stderr)

    def macro(metrics):
        return metrics["macro_f1"] if metrics["macro_f1"] is not None else f"n/a (no AU has {least} positives)"

    for name, metrics in report["formats"].items():
        print(f"{name:>10}: macro F1 {macro(metrics)}  parse failures {metrics['parse_failures']}  "
              f"{metrics['seconds_per_image']:.2f} s/image")
    diagnostics = report.get("diagnostics", {})
    for key, label in (("encoder_head", "encoder's own head (not an answer)"), ("readout", "fast read-out (live mode)")):
        if key in diagnostics:
            print(f"{label}: macro F1 {macro(diagnostics[key])}")
    if "chimeras" in diagnostics:
        chimeras = diagnostics["chimeras"]
        print(f"read-out on chimeric faces (each AU token from another face): macro F1 "
              f"{macro(chimeras['readout'])}, the head {macro(chimeras['encoder_head'])}")
    agreement = report["agreement"].get("all", "n/a (one format)")
    print(f"detection rate {report['detection_rate']}; agreement {agreement}; written {args.out}")
    return 0


def _seen_in_training(samples, analyzer) -> list[str]:
    """A warning when subjects scored are among those the checkpoint learned from: a score on its training
    faces, not on new people."""
    trained_on = set((analyzer.model.config.training or {}).get("subjects", ()))
    seen = sorted({s.subject for s in samples} & trained_on)
    if not seen:
        return []
    return [f"{len(seen)} of the scored subjects ({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''}) are among "
            f"the {len(trained_on)} this checkpoint was trained on: their scores are not those of new people"]


def _train_config(args, **extra):
    """TrainConfig from --config (if any), overridden by the flags given (unset flags are None)."""
    from .train import train_config

    flags = {"manifest": _manifests(args.manifest), "out": args.out, "images_root": args.images_root, "seed": args.seed,
             "encoder_steps": args.encoder_steps, "projector_steps": args.projector_steps,
             "lora_steps": args.lora_steps, "batch_size": args.batch_size, "base_llm": args.base_llm,
             "kinds": _names(args.kinds), "tiny_llm": args.tiny or None,
             "mixed_precision": args.mixed_precision, "grad_accum": args.grad_accum, "cpu": args.cpu or None,
             "boundary_mix": args.boundary_mix, "boundary_gap": args.boundary_gap, "chimera": args.chimera,
             "swap": args.swap, "weak_faces": args.weak_faces, "end_weight": args.end_weight}
    return train_config(args.config, **flags, **extra)


def _train(args) -> int:
    from .train import Trainer

    held_out = _names(args.hold_out)
    config = _train_config(args, held_out_subjects=held_out)
    try:
        path = Trainer(config).run(resume=not args.no_resume)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the same command continues from the last state saved in {Path(config.out) / 'state'} "
              f"(saved every {config.save_every} steps and between stages)", file=sys.stderr)
        return 130
    print(f"checkpoint written to {path}")
    return 0


def _crossval(args) -> int:
    from .crossval import crossval

    summary = crossval(_train_config(args), folds=args.folds, formats=tuple(args.formats),
                       diagnostics=args.diagnostics)
    least = summary["min_positives"]
    for name, entry in summary["formats"].items():
        per_fold = ", ".join("n/a" if f is None else str(f) for f in entry["macro_f1_per_fold"])
        print(f"{name:>10}: average F1 {entry['average_f1']} over the {len(entry['average_aus'])} AUs with {least} "
              f"positives in all folds together (per fold, over the AUs with {least} there: {per_fold})")
    print(f"{summary['seconds']} s; report in {Path(args.out) / 'crossval.md'} and crossval.json")
    return 0


def _add_training_options(parser, out_help: str):
    # no argparse defaults: an unset flag leaves the --config file's value, else TrainConfig's default (the
    # "(default X)" in the help texts; a test holds them to TrainConfig, read here it would import torch)
    parser.add_argument("--config", help="a JSON file of TrainConfig fields (e.g. configs/gpu-siglip-base.json); its "
                        "\"model\" holds the model's (aus, encoder, lora); flags given here override it")
    parser.add_argument("--manifest", nargs="+", help="one CSV, or one per dataset (each image is asked only the AUs "
                        "its dataset codes); required, here or in --config")
    parser.add_argument("--images-root", help="the folder the manifest's image paths are relative to (default: the "
                        "manifest's folder)")
    parser.add_argument("--out", help=out_help + " (required, here or in --config)")
    parser.add_argument("--kinds", help="manifest rows to train on (default peak,neutral,near_peak,frame)")
    parser.add_argument("--encoder-steps", type=int, help="default 1500")
    parser.add_argument("--projector-steps", type=int, help="default 100")
    parser.add_argument("--lora-steps", type=int, help="default 400")
    parser.add_argument("--batch-size", type=int, help="the global batch, whatever the process count (default 8)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per process and step (default 1)")
    parser.add_argument("--boundary-mix", type=float, help="share of the LLM stages' AU decisions taught on AU "
                        "tokens moved toward the encoder head's decision boundary (default 0.25; 0 turns it off)")
    parser.add_argument("--boundary-gap", type=float, help="how near the boundary those tokens go: their head "
                        "logits are drawn from [gap, 4] on their own side (default 0.25)")
    parser.add_argument("--weak-faces", type=float, help="share of the LLM stages' faces with most of their AU "
                        "tokens moved toward that boundary, as a new person's face often reads (default 0.0)")
    parser.add_argument("--chimera", type=float, help="share of the LLM stages' faces made of AU tokens each taken "
                        "from another training face, so that no AU can be read from the others (default 0.5)")
    parser.add_argument("--swap", type=float, help="share of the other faces with one AU token swapped for one "
                        "from a face labelled the other way, so that no emotion prototype completes itself "
                        "(default 0.0)")
    parser.add_argument("--end-weight", type=float, help="weight of the loss where an answer may stop (list, JSON, "
                        "sentence), against lists that go on past their last AU (default 1.0)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"],
                        help="default: accelerate's (launch flag or `accelerate config`), else no")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where a GPU is available")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--base-llm", help="hub id or folder (default HuggingFaceTB/SmolLM2-135M-Instruct)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLM (for tests)")


def _push(args) -> int:
    from .model import push_to_hub

    print(push_to_hub(args.checkpoint, args.repo_id, private=args.private))
    return 0


CKPLUS_NEAR_PEAK = 2  # frames before each CK+ peak listed as near_peak, as in the data the checkpoint learned


def _manifest(args) -> int:
    from .data.manifest import write_manifest
    from .data.readers import READERS

    options = {"frames": args.frames} if args.frames else {}
    if args.frames and args.dataset != "disfa":
        raise ValueError("--frames applies to DISFA only")
    if args.near_peak is not None and args.dataset != "ckplus":
        raise ValueError("--near-peak applies to CK+ only")
    if args.dataset == "ckplus":
        if args.near_peak is not None and args.near_peak < 0:
            raise ValueError(f"--near-peak must be 0 or more, got {args.near_peak}")
        options["near_peak"] = CKPLUS_NEAR_PEAK if args.near_peak is None else args.near_peak
    root = Path(args.root)
    if not root.is_dir():
        raise ValueError(f"--root {args.root} " + ("is a file: give the dataset's folder" if root.exists()
                                                    else "does not exist"))
    _writable(args.out, "--out")
    samples, problems = READERS[args.dataset](args.root, **options)
    if not samples:
        raise ValueError(f"no labelled image found in {args.root}" + (f"; first problem: {problems[0]}" if problems else ""))
    path = write_manifest(samples, args.out, args.images_root)
    unknown = sum(len(s.unknown) for s in samples)
    print(f"{len(samples)} images of {len({s.subject for s in samples})} subjects written to {path} "
          f"({unknown} unknown labels); {len(problems)} label rows without an image or readable value")
    for problem in problems[:20]:
        print(f"  {problem}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
    return 0


def _bench(args) -> int:
    from .bench import main as bench_main

    _writable(args.out, "--out")
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    from .formats import format_names

    parser = argparse.ArgumentParser(prog="python -m aullava", description="AU-LLaVA: facial Action Units written by an LLM")
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser("analyze", help="the AUs of every face in images, folders or videos")
    analyze.add_argument("images", nargs="+", help="image or video files and/or folders of them")
    analyze.add_argument("--format", default="list", choices=format_names())
    analyze.add_argument("--json", action="store_true",
                         help="one JSON line per image (its faces: box, text, parsed AUs); a video gives one per "
                              "sampled frame and face in the rows' schema, which --jsonl - gives for images too")
    analyze.add_argument("--csv", help="write OpenFace-style rows (one per face; failures as success=0) here (- for standard output)")
    analyze.add_argument("--jsonl", help="write the same rows as JSON lines here (- for standard output)")
    analyze.add_argument("--fps", type=float, default=5.0, help="frames analysed per second of video (default 5)")
    analyze.add_argument("--plot", help="save each video's AU time series to this PNG")
    analyze.add_argument("--checkpoint", help="checkpoint folder or hub repo id (default: the embedded one)")
    analyze.add_argument("--gather-every", type=int, default=16,
                         help="under accelerate launch: inputs per process between two gathers/writes (default 16)")
    analyze.set_defaults(run=_analyze)

    evaluate = commands.add_parser("evaluate", help="per-AU metrics of the model on a labelled manifest")
    evaluate.add_argument("--manifest", required=True, nargs="+", help="one CSV or several (e.g. one per dataset)")
    evaluate.add_argument("--images-root", help="the folder the manifest's image paths are relative to (default: "
                          "the manifest's folder)")
    evaluate.add_argument("--checkpoint", help="checkpoint folder or hub repo id (default: the embedded one)")
    evaluate.add_argument("--formats", nargs="+", default=["list", "binary"], choices=format_names(),
                          help="answer formats to score (default: list binary)")
    evaluate.add_argument("--kinds", help="rows to use, comma-separated (default: every row but near_peak)")
    evaluate.add_argument("--subjects", help="only these subjects, comma-separated")
    evaluate.add_argument("--out", required=True, help="the metrics JSON to write")
    evaluate.add_argument("--predictions", help="also write a CSV row per image and format: the model's text, the "
                          "presence (AU01_pred ...) and intensity (AU01_intensity ...) it implies per AU, and the label (AU01_true ...; AU01_true_intensity where coded), with sequence, frame and emotion")
    evaluate.add_argument("--min-positives", type=int,
                          help="macro F1 over the AUs with at least this many positive images (default 10, the bar "
                               "the model card reports at; lower it for a small labelled set)")
    evaluate.add_argument("--no-diagnostics", action="store_true",
                          help="skip scoring the encoder's own head and the live read-out (about a third of the time)")
    evaluate.add_argument("--no-speculate", action="store_true",
                          help="write every answer one decision per LLM pass, without verifying the encoder "
                               "head's draft (slower; the same answers up to float rounding)")
    evaluate.set_defaults(run=_evaluate)

    train = commands.add_parser("train", help="train encoder, projector and LoRA on a manifest")
    _add_training_options(train, "run folder: state (resumable), history.json, checkpoint/")
    train.add_argument("--hold-out", help="subjects to leave out, comma-separated")
    train.add_argument("--no-resume", action="store_true", help="train from the start, over a state saved in --out "
                       "(default: continue it, or keep its checkpoint if it finished with these settings)")
    train.set_defaults(run=_train)

    crossval = commands.add_parser("crossval", help="subject-exclusive k-fold cross-validation (train + evaluate)")
    _add_training_options(crossval, "folder for fold<i>/ runs, crossval.json and crossval.md (resumable)")
    crossval.add_argument("--folds", type=int, default=3, help="subject-exclusive folds (default 3)")
    crossval.add_argument("--formats", nargs="+", default=["list", "binary"], choices=format_names(),
                          help="answer formats to score per fold (default: list binary)")
    crossval.add_argument("--diagnostics", action="store_true",
                          help="also score the encoder's own head and the live read-out (slower)")
    crossval.set_defaults(run=_crossval)

    manifest = commands.add_parser("manifest", help="turn a dataset's release layout into a manifest CSV")
    manifest.add_argument("--dataset", required=True, choices=["bp4d", "disfa", "feafa", "ckplus"])
    manifest.add_argument("--root", required=True, help="the dataset's release folder")
    manifest.add_argument("--frames", help="DISFA: folder of extracted frames, <frames>/<subject>/<frame>.jpg")
    manifest.add_argument("--near-peak", type=int,
                          help=f"CK+: also list the N frames before each peak, with its AUs uncoded in level, as "
                               f"near_peak rows (default {CKPLUS_NEAR_PEAK}, as the embedded checkpoint was trained; "
                               "0: peak and neutral frames only)")
    manifest.add_argument("--images-root", help="paths in the CSV relative to this (default: the CSV's folder)")
    manifest.add_argument("--out", required=True, help="the manifest CSV to write")
    manifest.set_defaults(run=_manifest)

    bench = commands.add_parser("bench", help="time every stage of analysing a photo on this machine")
    bench.add_argument("--checkpoint", help="checkpoint folder or hub repo id (default: the embedded one)")
    bench.add_argument("--image", help="a photo with one face (default: matplotlib's grace_hopper.jpg)")
    bench.add_argument("--formats", nargs="+", default=["list", "binary", "json"], choices=format_names())
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per format (default 5)")
    bench.add_argument("--merge", action="store_true",
                       help="merge LoRA into the weights (faster; the app keeps it switchable for chat)")
    bench.add_argument("--no-scaling", action="store_true", help="skip the faces-per-image and image-size runs")
    bench.add_argument("--batch", action="store_true",
                       help="instead: throughput of analyze --csv on a folder of photos and on a video")
    bench.add_argument("--batch-images", type=int, default=200, help="--batch: photos in the folder (default 200)")
    bench.add_argument("--video-seconds", type=float, default=30, help="--batch: the video's length (default 30)")
    bench.add_argument("--video-fps", type=float, default=5.0, help="frames analysed per second of video")
    bench.add_argument("--out", help="write the figures as JSON")
    bench.set_defaults(run=_bench)

    push = commands.add_parser(
        "push", help="upload a checkpoint folder to the Hugging Face hub",
        description="Upload a checkpoint folder as it is (aullava_config.json, aullava.safetensors, the LoRA adapter; "
                    "the config records the training settings, the manifest's and output folder's paths included) "
                    "to a model repo, created if missing. Needs a token with write access: $HF_TOKEN or `hf auth "
                    "login`. A trained checkpoint has no model card: add a README.md to the folder first. "
                    "`--checkpoint <repo id>` then loads it in analyze, evaluate and the app.")
    push.add_argument("checkpoint", help="the checkpoint folder (a run's <out>/checkpoint)")
    push.add_argument("--repo-id", required=True, help="the model repo, owner/name")
    push.add_argument("--private", action="store_true", help="create the repo private (a repo that exists keeps "
                      "its visibility)")
    push.set_defaults(run=_push)
    return parser


class _StderrLines(logging.Handler):
    """aullava's log records as plain lines on the stderr of the moment (a test's captured one included)."""

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - as logging's own handlers do: a log line never stops the work
            self.handleError(record)


def _quiet_weight_loading():
    """aullava's own lines on loading (which source, how long) instead of transformers' bar over the ~270
    tensors of each model load: noise between a command's own lines. That switch also turns off
    huggingface_hub's bars, which a first download from the hub needs: they are turned back on."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    package = logging.getLogger("aullava")
    if not any(isinstance(h, _StderrLines) for h in package.handlers):
        package.addHandler(_StderrLines())
        package.setLevel(logging.INFO)
    hub_bars = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if hub_bars:
        hub_utils.enable_progress_bars()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_weight_loading()
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
