"""The page in headless Chromium: after an analysis (opened with ?example=1&ask=...) the DOM holds the chart
image, the model's text and the chat answer, and at 1280x800 the input image, text, chart and chat sit side by
side without overlapping. Skipped when no Chromium is installed (Debian: apt-get install -y chromium).

The screenshot is saved to $AULLAVA_SCREENSHOT if set (e.g. docs/screenshot.png for the README)."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from cdp import Browser, find_chromium
from conftest import SMOKE
from test_app import checkpoint, server  # noqa: F401 - the app server fixtures

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install -y chromium)")

QUESTION = "what does AU6 mean?"

PROBE = """(() => {
  const chart = document.querySelector('#aullava-chart img');
  const text = document.querySelector('#aullava-text textarea');
  const bots = document.querySelectorAll('#aullava-chat .bot.message');
  const busy = document.querySelector('#aullava-chat .generating, #aullava-chart .generating');
  const answered = bots.length && bots[bots.length - 1].innerText.trim() !== '\u2026';  // not the pending bubble
  const ready = chart && chart.complete && chart.naturalWidth > 0 && text && text.value && answered && !busy;
  if (!ready) return null;
  const box = (selector) => { const r = document.querySelector(selector).getBoundingClientRect();
                              return {x: r.left, y: r.top, w: r.width, h: r.height}; };
  return JSON.stringify({
    text: text.value, answer: bots[bots.length - 1].innerText, chartWidth: chart.naturalWidth,
    boxes: {image: box('#aullava-input'), text: box('#aullava-text'), chart: box('#aullava-chart'),
            chat: box('#aullava-chat')},
    viewport: {w: window.innerWidth, h: window.innerHeight}});
})()"""


def _overlap(a, b) -> bool:
    return not (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or
                a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])


def test_page_after_analysis_shows_image_text_chart_and_chat(server, tmp_path):  # noqa: F811
    browser = Browser(CHROMIUM, 1280, 800)
    try:
        started = time.perf_counter()
        browser.open(server["url"] + "?example=1&ask=" + QUESTION.replace(" ", "%20").replace("?", "%3F"))
        value = browser.wait_for(PROBE, timeout=240)
        assert value, "the page did not show an analysis with a chat answer in time"
        # the answer streams: wait until it has not changed for 2 s
        stable_since, deadline = time.perf_counter(), time.perf_counter() + 120
        while time.perf_counter() - stable_since < 2 and time.perf_counter() < deadline:
            time.sleep(0.4)
            latest = browser.evaluate(PROBE)
            if latest and json.loads(latest)["answer"] != json.loads(value)["answer"]:
                value, stable_since = latest, time.perf_counter()
        seconds = time.perf_counter() - started
        shot = tmp_path / "page.png"
        browser.screenshot(shot)
    finally:
        browser.close()
    page = json.loads(value)
    print(f"\n[bench] page analysed and answered in the browser after {seconds:.1f} s")
    assert page["text"].strip() and page["chartWidth"] > 200
    assert "AU6" in page["answer"] or "AU06" in page["answer"]
    boxes = page["boxes"]
    for name, box in boxes.items():
        assert box["w"] > 100 and box["h"] > 50, (name, box)
        assert box["x"] >= 0 and box["x"] + box["w"] <= page["viewport"]["w"] + 1, (name, box)
        assert box["y"] < page["viewport"]["h"], (name, "starts below the first screen")
    names = list(boxes)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not _overlap(boxes[first], boxes[second]), (first, second, boxes)
    assert boxes["image"]["x"] < boxes["text"]["x"] < boxes["chat"]["x"]  # side by side
    assert shot.stat().st_size > 20_000
    target = os.environ.get("AULLAVA_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


STATUS = "(document.querySelector('#aullava-status') || {innerText: ''}).innerText"


def _pick_file(browser, url: str, path):
    """Open the plain page and pick `path` in the face input, as a person would."""
    browser.open(url)
    assert browser.wait_for("!!document.querySelector('#aullava-input input[type=file]')", timeout=60)
    time.sleep(1)  # the page's load event has run
    browser.set_files("#aullava-input input[type=file]", [path])


def test_a_file_that_is_not_an_image_gets_a_sentence_in_the_page(server, tmp_path):  # noqa: F811
    """Picked in the page as a person would (the plain page, no ?example): the status says what is wrong and no
    output shows Gradio's bare error badge."""
    notes = tmp_path / "notes.png"
    notes.write_text("not an image, just a text file with an image suffix")
    browser = Browser(CHROMIUM, 1280, 800)
    try:
        _pick_file(browser, server["url"], notes)
        status = browser.wait_for(f"/not an image|could not be read/.test({STATUS}) ? {STATUS} : null", timeout=120)
        shown = browser.evaluate(STATUS)
        errors = browser.evaluate("document.querySelectorAll('.error, .validation-error').length")
        browser.screenshot(tmp_path / "not_an_image.png")
    finally:
        browser.close()
    assert status, f"no sentence about the file; status: {shown!r}"
    assert "/tmp" not in status and "Traceback" not in status
    assert errors == 0


def test_a_question_asked_while_the_photo_is_analysed_stays_in_the_chat(server, tmp_path):  # noqa: F811
    """Asked right after the upload, before the analysis is there: the exchange stays when the analysis lands."""
    from test_app import grace_hopper_path

    browser = Browser(CHROMIUM, 1280, 800)
    try:
        _pick_file(browser, server["url"], grace_hopper_path())
        # the upload has landed (a new face clears the chat, as it should): ask now, while the analysis runs
        assert browser.wait_for("!!document.querySelector('#aullava-input img')", timeout=60)
        time.sleep(1)
        asked = browser.evaluate("""(() => {
          const box = document.querySelector('#aullava-question textarea');
          const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
          setter.call(box, 'is AU12 there?');
          box.dispatchEvent(new Event('input', {bubbles: true}));
          return true; })()""") and _click(browser, "#aullava-question button", "Ask")
        analysed = browser.wait_for("(document.querySelector('#aullava-text textarea') || {value: ''}).value",
                                    timeout=240)
        time.sleep(4)  # whatever follows the analysis has run
        chat = browser.evaluate("(document.querySelector('#aullava-chat') || {innerText: ''}).innerText")
        browser.screenshot(tmp_path / "asked_during_analysis.png")
    finally:
        browser.close()
    assert asked and analysed
    assert "is AU12 there?" in chat, chat


TEXT = "(document.querySelector('#aullava-text textarea') || {value: ''}).value"
CHAT = "(document.querySelector('#aullava-chat') || {innerText: ''}).innerText"


def _ask(browser, question: str) -> bool:
    return browser.evaluate(f"""(() => {{
      const box = document.querySelector('#aullava-question textarea');
      const setter = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
      setter.call(box, {json.dumps(question)});
      box.dispatchEvent(new Event('input', {{bubbles: true}}));
      return true; }})()""") and _click(browser, "#aullava-question button", "Ask")


@pytest.mark.skipif(not (SMOKE / "multi_face.jpg").is_file(), reason="no shared smoke photos")
def test_a_photo_after_a_cleared_group_photo_gets_a_fresh_chat_and_one_analysis(server, tmp_path):  # noqa: F811
    """Group photo, another face selected, a question; the photo removed with its x while the answer streams and
    another picked: the chat starts empty, the new photo is analysed once, and no output shows Gradio's bare error
    badge."""
    browser = Browser(CHROMIUM, 1280, 800)
    try:
        _pick_file(browser, server["url"], SMOKE / "multi_face.jpg")
        assert browser.wait_for(TEXT, timeout=240)
        assert _click(browser, "label", "Face 3")
        time.sleep(1)
        assert _ask(browser, "is AU12 there?")
        # the photo is removed as soon as the answer starts: it may still be streaming
        assert browser.wait_for(f"/AU/.test({CHAT}.split('is AU12 there?')[1] || '')", timeout=120, interval=0.1)
        analyses_before = server["log"].read_text().count(" analyse ")
        assert _click(browser, "#aullava-input button", "Clear|Remove")
        assert browser.wait_for(f"!{TEXT}", timeout=60)
        browser.set_files("#aullava-input input[type=file]", [SMOKE / "single_face.jpg"])
        assert browser.wait_for(TEXT, timeout=240)
        time.sleep(4)  # whatever follows the analysis has run
        chat, status = browser.evaluate(CHAT), browser.evaluate(STATUS)
        errors = browser.evaluate("Array.from(document.querySelectorAll('.error, .validation-error, "
                                  ".toast-body.error')).map(e => (e.closest('[id]') || e).id + ': ' + e.innerText)")
        browser.screenshot(tmp_path / "after_clear.png")
    finally:
        browser.close()
    log = server["log"].read_text()
    assert "is AU12 there?" not in chat, chat
    assert log.count(" analyse ") - analyses_before == 1, log[-2000:]
    assert errors == [] and "1 face" in status, (errors, status)


LIVE_STATUS = "(document.querySelector('#aullava-live-status') || {innerText: ''}).innerText"


def _click(browser, selector: str, pattern: str) -> bool:
    return browser.evaluate(f"""(() => {{
      const found = Array.from(document.querySelectorAll({json.dumps(selector)}))
        .find(e => new RegExp({json.dumps(pattern)}, 'i').test((e.getAttribute('aria-label') || '') + ' ' + e.innerText));
      if (found) found.click();
      return !!found; }})()""")


def test_live_webcam_streams_the_model_answer_and_stops_cleanly(server, tmp_path):  # noqa: F811
    """Chromium's fake webcam plays grace_hopper; the live tab streams frames, each update shows the model's
    written list answer (the default live mode, labelled), and Stop ends the stream (the status stops changing)."""
    import re

    from PIL import Image

    from cdp import write_y4m
    from test_app import grace_hopper_path

    video = write_y4m(Image.open(grace_hopper_path()), tmp_path / "face.y4m")
    browser = Browser(CHROMIUM, 1280, 800, camera_video=str(video))
    try:
        browser.open(server["url"])
        assert browser.wait_for("document.querySelectorAll('button[role=tab]').length >= 2", timeout=60)
        assert _click(browser, "button[role=tab]", "Live")
        assert browser.wait_for("!!document.querySelector('#aullava-camera button')", timeout=30)
        _click(browser, "#aullava-camera button", "Access Webcam")
        assert browser.wait_for("""Array.from(document.querySelectorAll('#aullava-camera button'))
                                   .some(e => /Record/.test(e.innerText))""", timeout=30), "no Record button"
        assert _click(browser, "#aullava-camera button", "Record")
        first = browser.wait_for(f"/largest face took/.test({LIVE_STATUS}) ? {LIVE_STATUS} : null", timeout=240)
        assert first, f"no live update with a face: {browser.evaluate(LIVE_STATUS)!r}"
        started = time.perf_counter()
        time.sleep(float(os.environ.get("AULLAVA_LIVE_SECONDS", "10")))
        status = browser.evaluate(LIVE_STATUS)
        text = browser.evaluate("(document.querySelector('#aullava-live-text textarea') || {value: ''}).value")
        assert _click(browser, "#aullava-camera button", "Stop")
        time.sleep(3)
        stopped = browser.evaluate(LIVE_STATUS)
        time.sleep(3)
        assert browser.evaluate(LIVE_STATUS) == stopped, "updates continued after Stop"
        browser.screenshot(tmp_path / "live.png")
    finally:
        browser.close()
    counts = [int(n) for n in re.findall(r"Live update (\d+)", first + " " + status)]
    updates = counts[-1] - counts[0]
    rate = updates / (time.perf_counter() - started - 6)
    print(f"\n[bench] live: {updates} updates in the observed window (~{rate:.2f}/s); last: {status!r}")
    assert "largest face took" in status or "No face" in status
    assert "the model's own written answer" in status
    assert text == "none" or re.fullmatch(r"AU\d\d(, AU\d\d)*", text), text
