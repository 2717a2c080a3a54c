"""Batch analysis split across processes with accelerate (`accelerate launch ... -m aullava analyze DIR --csv ...`).

The inputs are sharded by index: process r of n analyses inputs r, r+n, r+2n, ... with batch.py's per-input
`rows_for` (an image) or `video_rows` (all sampled frames of a video, on one process). Every `gather_every` inputs per process, the rows are gathered on every process (accelerate's
`gather_object`) and the main process writes them in input order, so the CSV / JSON lines are those of a
single-process run: every input exactly once, failures as success=0 rows, and a crash keeps the rounds already
written. A failure that is not a face/image error becomes a success=0 row too, so that one bad input cannot
leave the other processes waiting.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm import tqdm

from . import formats as fmt_lib
from .batch import BatchSummary, RowWriter, expand_inputs, failure_row, rows_for, video_rows
from .video import DEFAULT_FPS, is_video

LAUNCHER_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def use_cpu(requested: bool = False) -> bool:
    """Whether accelerate should run on the CPU: when asked, or when the host has no GPU (or other accelerator).
    On a CPU-only host this turns the processes that `accelerate launch --multi_gpu` / torchrun start into gloo
    CPU processes (`accelerate launch --cpu --num_processes N` starts one process only unless MPI is set up)."""
    return bool(requested) or not torch.accelerator.is_available()


def launched() -> bool:
    """Whether this process was started by a distributed launcher (accelerate launch, torchrun, mpirun)."""
    import os

    return any(name in os.environ for name in LAUNCHER_WORLD_SIZE)


def _analyse_one(analyzer, path, frame: int, format_name: str, fps) -> list[list[dict]]:
    """The row groups of one input, as analyze_batch writes them: one for an image, one per sampled video frame."""
    try:
        if is_video(path):
            return list(video_rows(analyzer, path, format_name, fps, progress=False))
        return [rows_for(analyzer, path, frame, format_name)]
    except Exception as error:  # noqa: BLE001 - kept as a failure row, see the module's doc
        return [[failure_row({"file": str(path), "frame": frame, "timestamp": 0.0, "format": format_name},
                             f"analysis failed: {type(error).__name__}: {error}")]]


def _count(summary: BatchSummary, path, groups):
    """The summary analyze_batch keeps, for one input."""
    summary.begin(path)
    for rows in groups:
        summary.record(path, rows)


def analyze_sharded(analyzer, items, format_name: str = "list", csv_path=None, jsonl_path=None,
                    fps: float | None = DEFAULT_FPS, gather_every: int = 16,
                    progress: bool = True) -> tuple[BatchSummary, dict]:
    """Analyse `items` (files and folders) across the launched processes; the main process writes the rows.

    Returns, on every process, the summary of all inputs and run facts: `processes`, `per_process` (inputs each
    analysed), `seconds` (from the moment every process had its model loaded to the last row written)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    fmt_lib.get_format(format_name)
    if gather_every < 1:
        raise ValueError(f"gather_every must be at least 1, not {gather_every}")
    state = PartialState(cpu=use_cpu())
    analyzer.model.to(state.device)
    paths = expand_inputs(items)
    rank, processes = state.process_index, state.num_processes
    mine = list(range(rank, len(paths), processes))
    rounds = math.ceil(math.ceil(len(paths) / processes) / gather_every)
    summary, per_process = BatchSummary(), [0] * processes
    writer = RowWriter(analyzer.aus, csv_path, jsonl_path) if state.is_main_process else None
    state.wait_for_everyone()
    started = time.perf_counter()
    bar = tqdm(total=len(paths), desc="analyse", unit="img", disable=not (progress and state.is_main_process))
    try:
        for round_index in range(rounds):
            batch = mine[round_index * gather_every: (round_index + 1) * gather_every]
            done = [(i, rank, _analyse_one(analyzer, paths[i], i + 1, format_name, fps)) for i in batch]
            gathered = sorted(gather_object(done), key=lambda item: item[0])
            for index, owner, groups in gathered:
                _count(summary, paths[index], groups)
                per_process[owner] += 1
                if writer:
                    for rows in groups:
                        writer.write(rows)
            bar.update(len(gathered))
    finally:
        bar.close()
        if writer:
            writer.close()
    if sum(per_process) != len(paths):
        raise RuntimeError(f"{sum(per_process)} of {len(paths)} inputs were analysed: the shards did not cover the list")
    return summary, {"processes": processes, "per_process": per_process, "seconds": time.perf_counter() - started,
                     "main": state.is_main_process}
