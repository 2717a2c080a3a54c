"""A bounded load test of the running app (opt-in, a benchmark that prints figures): 20 clients x 10 analyse
calls through gradio_client, then 100 more, with zero errors, p50/p95 latency and the server's RSS growth
over those 300 calls (< 100 MB), measured from after a warm-up that runs 20 clients at once: the first
concurrent burst raises RSS once (worker threads, queue, buffers; printed too), a leak would keep growing.
Run: AULLAVA_LOAD=1 pytest -s tests/test_load.py"""
from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageEnhance, ImageOps

from conftest import grace_hopper_path

pytestmark = pytest.mark.skipif(not os.environ.get("AULLAVA_LOAD"), reason="load test: run with AULLAVA_LOAD=1")
CLIENTS = int(os.environ.get("AULLAVA_LOAD_CLIENTS", "20"))
CALLS = int(os.environ.get("AULLAVA_LOAD_CALLS", "10"))
MORE_CALLS = int(os.environ.get("AULLAVA_LOAD_MORE", "100"))  # after the burst: the RSS figure covers 300 calls


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Ten variants of the example photo, so each call uploads, decodes and detects anew."""
    folder = tmp_path_factory.mktemp("load")
    face = Image.open(grace_hopper_path()).convert("RGB")
    variants = [face, ImageOps.mirror(face), ImageEnhance.Brightness(face).enhance(0.8), face.rotate(5),
                ImageEnhance.Contrast(face).enhance(1.3), face.crop((10, 10, 500, 590)), face.resize((420, 492)),
                ImageOps.grayscale(face).convert("RGB"), ImageEnhance.Brightness(face).enhance(1.15),
                ImageOps.mirror(face).rotate(-4)]
    paths = []
    for i, variant in enumerate(variants):
        variant.save(folder / f"v{i}.jpg", quality=90)
        paths.append(folder / f"v{i}.jpg")
    return paths


def test_twenty_clients_no_errors_bounded_latency_and_memory(app_server, photos):
    from gradio_client import Client, handle_file

    pid = app_server["process"].pid

    def session(index: int, calls: int):
        client = Client(app_server["url"], verbose=False)
        times, errors = [], []
        for call in range(calls):
            path = photos[(index + call) % len(photos)]
            started = time.perf_counter()
            try:
                status, text, *_ = client.predict(handle_file(str(path)), "list", None, api_name="/analyse")
                if not status.startswith("Found 1 face") or not text:
                    errors.append(f"{path.name}: {status}")
            except Exception as error:  # noqa: BLE001 - counted, reported below
                errors.append(f"{path.name}: {type(error).__name__}: {error}")
            times.append(time.perf_counter() - started)
        return times, errors

    session(0, 3)  # warm: the prompt prefix and first allocations
    first = rss_mb(pid)
    with ThreadPoolExecutor(CLIENTS) as pool:  # warm the concurrent path too: queue, worker threads, buffers
        list(pool.map(lambda i: session(i, 1), range(CLIENTS)))
    before = rss_mb(pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        burst = list(pool.map(lambda i: session(i, CALLS), range(CLIENTS)))
    burst_seconds = time.perf_counter() - started
    after_burst = rss_mb(pid)
    with ThreadPoolExecutor(5) as pool:
        more = list(pool.map(lambda i: session(i, MORE_CALLS // 5), range(5)))
    after = rss_mb(pid)
    times = [t for ts, _ in burst for t in ts]
    errors = [e for _, es in burst + more for e in es]
    calls = CLIENTS * CALLS + MORE_CALLS
    print(f"\n[load] {CLIENTS} clients x {CALLS} analyse calls (list) in {burst_seconds:.1f} s "
          f"({CLIENTS * CALLS / burst_seconds:.2f} calls/s): p50 {statistics.median(times):.2f} s, "
          f"p95 {percentile(times, 0.95):.2f} s, max {max(times):.2f} s; errors {len(errors)}")
    print(f"[load] server RSS {first:.0f} MB after 3 calls, {before:.0f} MB after {CLIENTS} concurrent warm-up "
          f"calls, {after_burst:.0f} MB after the burst, {after:.0f} MB after {calls} calls: growth over the "
          f"{calls} calls {after - before:+.0f} MB")
    assert not errors, errors[:5]
    assert after - before < 100
