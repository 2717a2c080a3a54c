"""`python -m aullava {analyze,evaluate,train,manifest,bench,push}`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _analyze(args) -> int:
    from . import formats as fmt_lib
    from .face import FaceError
    from .service import get_analyzer

    from .batch import analyze_batch, expand_inputs

    fmt_lib.get_format(args.format)
    images = expand_inputs(args.images)
    if not images:
        raise ValueError(f"no image files in {', '.join(args.images)}")
    analyzer = get_analyzer(args.checkpoint)
    if args.csv or args.jsonl:
        summary = analyze_batch(analyzer, images, args.format, args.csv, args.jsonl)
        print(summary, file=sys.stderr)
        return 1 if summary.failed else 0
    failed = 0
    for image in map(str, images):
        try:
            outcome = analyzer.analyze(image, args.format)
        except FaceError as error:
            failed += 1
            print(f"{image}: {error}", file=sys.stderr)
            if args.json:
                print(json.dumps({"image": image, "error": str(error)}))
            continue
        if args.json:
            print(json.dumps({"image": image, "faces": [f.to_dict() for f in outcome.faces],
                              "seconds": {k: round(v, 4) for k, v in outcome.seconds.items()}}))
            continue
        print(f"{image}: {len(outcome.faces)} face(s)")
        for face in outcome.faces:
            box = ", ".join(f"{v:.0f}" for v in face.face.box)
            print(f"  face {face.face.index} box ({box})")
            print(f"    model ({args.format}): {face.text}")
            if face.error:
                print(f"    {face.error}", file=sys.stderr)
                failed += 1
                continue
            active = face.result.active
            levels = ", ".join(f"AU{a}" + (f"={face.result.intensity[a]:g}" if face.result.intensity.get(a) is not None else "")
                               for a in active)
            print(f"    active AUs: {levels or 'none'}")
    return 1 if failed else 0


def _evaluate(args) -> int:
    from .data.manifest import read_manifest
    from .evaluate import evaluate
    from .service import Analyzer

    read_manifest(args.manifest, args.images_root)  # a broken manifest is reported before the model loads
    analyzer = Analyzer(args.checkpoint)
    kinds = tuple(args.kinds.split(",")) if args.kinds else None
    subjects = args.subjects.split(",") if args.subjects else None
    report = evaluate(analyzer, args.manifest, args.images_root, tuple(args.formats), kinds, subjects)
    report["checkpoint"] = str(analyzer.checkpoint)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for name, metrics in report["formats"].items():
        print(f"{name:>10}: macro F1 {metrics['macro_f1']}  parse failures {metrics['parse_failures']}  "
              f"{metrics['seconds_per_image']} s/image")
    diagnostics = report.get("diagnostics", {})
    for key, label in (("encoder_head", "encoder's own head (not an answer)"), ("readout", "fast read-out (live mode)")):
        if key in diagnostics:
            print(f"{label}: macro F1 {diagnostics[key]['macro_f1']}")
    print(f"detection rate {report['detection_rate']}; agreement {report['agreement'].get('all')}; written {args.out}")
    return 0


def _train(args) -> int:
    from .train import Trainer, TrainConfig

    config = TrainConfig(manifest=args.manifest, out=args.out, images_root=args.images_root, seed=args.seed,
                         encoder_steps=args.encoder_steps, projector_steps=args.projector_steps,
                         lora_steps=args.lora_steps, batch_size=args.batch_size,
                         kinds=tuple(args.kinds.split(",")),
                         held_out_subjects=tuple(args.hold_out.split(",")) if args.hold_out else (),
                         base_llm=args.base_llm, tiny_llm=args.tiny)
    path = Trainer(config).run(resume=not args.no_resume)
    print(f"checkpoint written to {path}")
    return 0


def _push(args) -> int:
    from .model import push_to_hub

    print(push_to_hub(args.checkpoint, args.repo_id, private=args.private))
    return 0


def _manifest(args) -> int:
    from .data.manifest import write_manifest
    from .data.readers import READERS

    options = {"frames": args.frames} if args.frames else {}
    if args.frames and args.dataset != "disfa":
        raise ValueError("--frames applies to DISFA only")
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

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    from .formats import format_names

    parser = argparse.ArgumentParser(prog="python -m aullava", description="AU-LLaVA: facial Action Units written by an LLM")
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser("analyze", help="the AUs of every face in one or more images")
    analyze.add_argument("images", nargs="+", help="image files and/or folders of images")
    analyze.add_argument("--format", default="list", choices=format_names())
    analyze.add_argument("--json", action="store_true", help="one JSON line per image")
    analyze.add_argument("--csv", help="write OpenFace-style rows (one per face; failures as success=0) here")
    analyze.add_argument("--jsonl", help="write the same rows as JSON lines here")
    analyze.add_argument("--checkpoint", help="checkpoint folder or hub repo id (default: the embedded one)")
    analyze.set_defaults(run=_analyze)

    evaluate = commands.add_parser("evaluate", help="per-AU metrics of the model on a labelled manifest")
    evaluate.add_argument("--manifest", required=True)
    evaluate.add_argument("--images-root")
    evaluate.add_argument("--checkpoint")
    evaluate.add_argument("--formats", nargs="+", default=["list", "binary"], choices=format_names())
    evaluate.add_argument("--kinds", help="rows to use, comma-separated (default: every row but near_peak)")
    evaluate.add_argument("--subjects", help="only these subjects, comma-separated")
    evaluate.add_argument("--out", required=True)
    evaluate.set_defaults(run=_evaluate)

    train = commands.add_parser("train", help="train encoder, projector and LoRA on a manifest")
    train.add_argument("--manifest", required=True)
    train.add_argument("--images-root")
    train.add_argument("--out", required=True)
    train.add_argument("--kinds", default="peak,neutral,near_peak")
    train.add_argument("--hold-out", help="subjects to leave out, comma-separated")
    train.add_argument("--encoder-steps", type=int, default=1200)
    train.add_argument("--projector-steps", type=int, default=60)
    train.add_argument("--lora-steps", type=int, default=150)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--base-llm", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    train.add_argument("--tiny", action="store_true", help="a tiny random LLM (for tests)")
    train.add_argument("--no-resume", action="store_true")
    train.set_defaults(run=_train)

    manifest = commands.add_parser("manifest", help="turn a dataset's release layout into a manifest CSV")
    manifest.add_argument("--dataset", required=True, choices=["bp4d", "disfa", "feafa", "ckplus"])
    manifest.add_argument("--root", required=True, help="the dataset's release folder")
    manifest.add_argument("--frames", help="DISFA: folder of extracted frames, <frames>/<subject>/<frame>.jpg")
    manifest.add_argument("--images-root", help="paths in the CSV relative to this (default: the CSV's folder)")
    manifest.add_argument("--out", required=True)
    manifest.set_defaults(run=_manifest)

    bench = commands.add_parser("bench", help="time every stage of analysing a photo on this machine")
    bench.add_argument("--checkpoint", help="checkpoint folder or hub repo id (default: the embedded one)")
    bench.add_argument("--image", help="a photo with one face (default: matplotlib's grace_hopper.jpg)")
    bench.add_argument("--formats", nargs="+", default=["list", "binary", "json"], choices=format_names())
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--merge", action="store_true",
                       help="merge LoRA into the weights (faster; the app keeps it switchable for chat)")
    bench.add_argument("--no-scaling", action="store_true", help="skip the faces-per-image and image-size runs")
    bench.add_argument("--out", help="write the figures as JSON")
    bench.set_defaults(run=_bench)

    push = commands.add_parser("push", help="upload a checkpoint folder to the Hugging Face hub")
    push.add_argument("checkpoint")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.set_defaults(run=_push)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
