"""Run app.py in a subprocess on a free localhost port until the page is served (for tests driving it over HTTP)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_app(checkpoint: str, log: Path):
    """Yields {"url", "log", "process"}; stops the app afterwards and fails if its log holds a traceback (other
    than Gradio's refusal of a file that was not uploaded)."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1",
               GRADIO_ANALYTICS_ENABLED="False", AULLAVA_CHECKPOINT=checkpoint, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > START_TIMEOUT:
                pytest.fail(f"app.py did not serve {url} within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        print(f"\n[bench] page served after {time.perf_counter() - started:.1f} s")
        yield {"url": url, "log": log, "process": process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    text = log.read_text()
    # Gradio logs a traceback when it refuses a file a client named (a test of that refusal): the only kind allowed
    refusals = text.count("gradio.exceptions.InvalidPathError: Cannot move")
    assert text.count("Traceback") == refusals, text[-3000:]
