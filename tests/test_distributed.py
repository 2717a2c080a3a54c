"""Two CPU processes (gloo) started by `accelerate launch` train and analyse like one process.

Slow-ish (~1-2 min on 2 cores): each launch starts fresh interpreters. The launch uses `--multi_gpu` (accelerate's
torchrun launcher): `accelerate launch --cpu --num_processes 2` starts ONE process unless MPI is configured, so
every test also checks the run said it had 2 processes. On a host without a GPU the code runs them on the CPU.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TINY = {"tiny_llm": True, "encoder_batch": 8, "batch_size": 4, "save_every": 100, "encoder_lr": 1e-2,
        "projector_lr": 3e-2, "lora_lr": 3e-2,
        "model": {"aus": [1, 2, 4, 6, 7, 12, 25],
                  "encoder": {"type": "landmark_patch", "dim": 32, "chip_size": 64, "channels": 8, "head_layers": 1},
                  "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ACCELERATE.is_file(), reason="the accelerate CLI is not installed beside python")]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "AULLAVA_THREADS": "1", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as s:  # another run of these tests may hold accelerate's default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, processes: int):
    """`python -m aullava ARGS` alone, or under `accelerate launch` with `processes` processes."""
    if processes == 1:
        command = [sys.executable, "-m", "aullava", *args]
    else:
        command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   "-m", "aullava", *args]
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def _train(manifest, out, config_path, processes, *extra):
    done = _run(["train", "--config", str(config_path), "--manifest", str(manifest), "--out", str(out),
                 "--no-resume", *extra], processes)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{processes} process(es) on cpu" in done.stdout + done.stderr
    return json.loads((out / "history.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    runs = {}
    # LLM stages only (the encoder stays at its seeded init, in eval mode): nothing random differs per process
    llm = {"--encoder-steps": "0", "--projector-steps": "5", "--lora-steps": "5"}
    flags = [x for pair in llm.items() for x in pair]
    runs["one_accumulating"] = _train(tiny_manifest, root / "one", config, 1, *flags, "--grad-accum", "2")
    runs["two"] = _train(tiny_manifest, root / "two", config, 2, *flags)
    # every stage: the encoder's batch norm and dropout see each process's slice, so stage 0 only nearly matches
    full = ["--encoder-steps", "6", "--projector-steps", "3", "--lora-steps", "3"]
    runs["one_full"] = _train(tiny_manifest, root / "one_full", config, 1, *full)
    runs["two_full"] = _train(tiny_manifest, root / "two_full", config, 2, *full)
    return root, runs


def test_two_processes_follow_the_loss_curve_of_one(runs):
    root, history = runs
    one, two = history["one_accumulating"], history["two"]
    assert [(h["stage"], h["step"], h["format"]) for h in one] == [(h["stage"], h["step"], h["format"]) for h in two]
    assert len(one) == 10
    # the same global batch, its slices' losses summed over the global count, gradients summed across processes
    np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in one], rtol=1e-5, atol=1e-6)
    for part in ("aullava.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(root / "one" / "checkpoint" / part)), load_file(str(root / "two" / "checkpoint" / part))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)

    full_one, full_two = history["one_full"], history["two_full"]
    assert [h["stage"] for h in full_one] == [h["stage"] for h in full_two] == ["encoder"] * 6 + ["projector"] * 3 + ["lora"] * 3
    np.testing.assert_allclose([h["loss"] for h in full_two], [h["loss"] for h in full_one], rtol=0.05)


def test_sharded_analysis_writes_the_single_process_rows(runs, tiny_manifest, tmp_path):
    root, _ = runs
    checkpoint = root / "one" / "checkpoint"
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(5):
        shutil.copy(tiny_manifest.parent / "images" / f"face{i}.png", folder / f"face{i}.png")
    (folder / "c_notes.jpg").write_text("a text file renamed .jpg")
    from PIL import Image

    Image.fromarray(np.add.outer(np.arange(120), np.arange(160)).astype(np.uint8)).save(folder / "d_gradient.png")
    from conftest import write_video

    write_video(folder / "e_clip.mp4", Image.open(folder / "face0.png"), seconds=1)  # one input, its frames on one process
    outputs = {}
    for processes in (1, 2):
        csv_path, jsonl_path = tmp_path / f"{processes}.csv", tmp_path / f"{processes}.jsonl"
        done = _run(["analyze", str(folder), "--checkpoint", str(checkpoint), "--format", "intensity", "--csv",
                     str(csv_path), "--jsonl", str(jsonl_path), "--gather-every", "2"], processes)
        assert done.returncode == 1, done.stderr[-3000:]  # two inputs without a result, as alone
        summary = done.stderr[done.stderr.index("7 image(s), "):].splitlines()[0]
        assert "of 1 video(s)" in summary and "without a result" in summary
        shares = re.search(r"on (\d+) process\(es\); inputs per process: ([\d, ]+)", done.stderr)
        assert shares and int(shares.group(1)) == processes, done.stderr[-2000:]
        assert [int(n) for n in shares.group(2).split(",")] == ([8] if processes == 1 else [4, 4])
        outputs[processes] = csv_path.read_text(), jsonl_path.read_text(), summary
    assert outputs[2] == outputs[1]
    rows = [json.loads(line) for line in outputs[1][1].splitlines()]
    images = [r for r in rows if not r["file"].endswith(".mp4")]  # sorted: c_, d_, e_clip.mp4 (input 3), face*
    assert [r["frame"] for r in images] == [1, 2, 4, 5, 6, 7, 8]
    assert [r["success"] for r in images] == [0, 0, 1, 1, 1, 1, 1]
    video = [r for r in rows if r["file"].endswith(".mp4")]
    assert len(video) >= 4 and rows[2:2 + len(video)] == video
    assert "not an image" in rows[0]["reason"] and "No face" in rows[1]["reason"]
