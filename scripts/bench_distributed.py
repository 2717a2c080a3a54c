"""Inputs per second of `analyze --csv` alone vs under `accelerate launch` with N processes, on this machine.

    python scripts/bench_distributed.py [--checkpoint DIR] [--count 16] [--processes 2] [--format list]

Builds a folder of `--count` photos cycled from the shared smoke set (faces, several faces, one without a
face), runs `python -m aullava analyze` and `accelerate launch --multi_gpu --num_processes N -m aullava analyze`
on it, checks both CSVs are identical, and prints the rate of each (from all models loaded to the last row
written, as the CLI reports it), the wall-clock time of each command (with interpreter start and model load),
and the ratio. Each process uses $AULLAVA_THREADS threads (default 1 here, so the processes do not compete).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO.parent / "shared" / "data" / "smoke"
RATE = re.compile(r"(\d+) input\(s\) in ([\d.]+) s \(([\d.]+) inputs/s\) on (\d+) process\(es\)")


def run(args, processes: int, threads: str) -> dict:
    if processes == 1:
        command = [sys.executable, "-m", "aullava", *args]
    else:
        accelerate = str(Path(sys.executable).parent / "accelerate")
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "aullava", *args]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "AULLAVA_THREADS": threads, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    match = RATE.search(done.stderr)
    if not match:
        raise RuntimeError(f"no rate line from {' '.join(command)} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {"processes": int(match.group(4)), "seconds": float(match.group(2)), "inputs_per_s": float(match.group(3)),
            "wall_s": round(wall, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: the embedded one")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--format", default="list")
    parser.add_argument("--threads", default=os.environ.get("AULLAVA_THREADS", "1"))
    parser.add_argument("--out", help="write the figures as JSON")
    args = parser.parse_args()
    photos = sorted(p for p in SMOKE.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no photos in {SMOKE}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i in range(args.count):
            source = photos[i % len(photos)]
            (folder / f"{i:04d}_{source.name}").symlink_to(source)
        common = ["analyze", str(folder), "--format", args.format] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
        one = run(common + ["--csv", f"{tmp}/one.csv"], 1, args.threads)
        many = run(common + ["--csv", f"{tmp}/many.csv"], args.processes, args.threads)
        if many["processes"] != args.processes:
            raise SystemExit(f"asked for {args.processes} processes, the run had {many['processes']}")
        identical = Path(f"{tmp}/one.csv").read_text() == Path(f"{tmp}/many.csv").read_text()
    report = {"inputs": args.count, "format": args.format, "checkpoint": args.checkpoint or "embedded",
              "threads_per_process": args.threads, "one": one, "many": many, "csv_identical": identical,
              "ratio": round(many["inputs_per_s"] / one["inputs_per_s"], 2),
              "wall_ratio": round(one["wall_s"] / many["wall_s"], 2)}
    print(f"{args.count} inputs, {args.format}: 1 process {one['inputs_per_s']:.3f} inputs/s ({one['wall_s']} s wall), "
          f"{args.processes} processes {many['inputs_per_s']:.3f} inputs/s ({many['wall_s']} s wall); "
          f"ratio {report['ratio']} (wall {report['wall_ratio']}); CSVs identical: {identical}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
