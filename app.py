"""AU-LLaVA web demo (Gradio Blocks; runs locally and on Hugging Face Spaces): python app.py

A face goes in (upload, webcam, paste or an example); the AU-LLaVA model writes its Action Units in the chosen
format; the page shows that text, an intensity chart, the face with its landmarks and active regions, an
emotion hint, JSON/CSV downloads, and a chat grounded in the analysis. Live mode streams webcam frames; the
Video tab analyses an uploaded video into AU time series and OpenFace-style rows.

Named API endpoints (gradio_client): /analyse (image, format), /chat (message, history, face) and
/analyse_video (video, format, frames per second). The logic
lives in aullava.demo, aullava.plots and aullava.chat; this file only builds the page.
"""
from __future__ import annotations

import html
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import matplotlib.cbook

from aullava import chat as chat_lib
from aullava import demo as logic
from aullava.formats import format_names, get_format

logger = logging.getLogger("aullava.app")



def _example_faces() -> list[str]:
    """Public-domain faces shipped by installed packages (matplotlib's grace_hopper.jpg), copied to a temp
    folder: Gradio serves files only from the working directory, the temp directory or allowed paths."""
    folder = Path(tempfile.gettempdir()) / "aullava-examples"
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for name in ("grace_hopper.jpg",):
        source = Path(matplotlib.cbook.get_sample_data(name, asfileobj=False))
        target = folder / name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copyfile(source, target)
        copies.append(str(target))
    return copies


EXAMPLE_FACES = _example_faces()
FORMAT_CHOICES = [(get_format(name).title, name) for name in format_names()]
DEFAULT_FORMAT = os.environ.get("AULLAVA_DEFAULT_FORMAT", "intensity")
CONCURRENCY = 2  # model calls run one at a time (the model's lock); 2 lets detection and drawing overlap
LIVE_INTERVAL = 0.4  # seconds between webcam frames sent in live mode
ANSWER_PENDING = "…"  # the answer's bubble until its first words (reading the prompt takes ~0.5 s on a CPU)
CHAT_UPDATE_EVERY = 0.2  # seconds between streamed chat updates at least (the last one always comes)
READY = "Give a face: upload a photo, use the webcam, paste an image or click the example."
MAX_UPLOAD = "20mb"  # launch(max_file_size): bigger uploads are refused before they reach the analyser
MAX_PAGE_FACES = 10  # the page describes at most this many faces of one photo (the largest), bounding a request
MAX_SESSIONS = 500  # launch(state_session_capacity): pages whose analysis is kept (~1 MB each; Gradio's default 10000)

CSS = """
#aullava-text textarea {font-family: ui-monospace, monospace; font-size: 0.85rem;}
#aullava-status p {margin: 0;}
.aullava-note {font-size: 0.8rem; opacity: 0.8;}
"""


def tolerant_image(**kwargs) -> gr.Image:
    """A gr.Image whose preprocessing never fails: a file Pillow cannot open (a text file renamed .jpg) is
    handed on as its path, so the analyser can say in a sentence what is wrong with it. (Patched on the
    instance: a gr.Image subclass would make Gradio write an app.pyi stub beside this file.)"""
    component = gr.Image(**kwargs)
    original = component.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except Exception:  # noqa: BLE001 - the analyser explains the problem
            path = getattr(payload, "path", None)
            return path if path and is_upload(path) else ""

    component.preprocess = preprocess
    return component


def is_upload(path) -> bool:
    """Whether `path` lies in Gradio's upload folder: the only files a request may hand to the analyser."""
    from gradio.utils import get_upload_folder

    folder = os.path.realpath(get_upload_folder())
    return os.path.realpath(path).startswith(folder + os.sep)


def as_text(text: str) -> str:
    """Markdown-rendered text (status line, chat) shown as the characters it holds: `<`, `>` and `&` escaped,
    so a file name, a question or a model answer with HTML in it is never rendered as HTML."""
    return html.escape(text, quote=False)


# ----- event handlers -------------------------------------------------------------------------------------
def _empty_outputs(message: str):
    # the face selector is hidden, its choices kept: a request already on its way with the old selection (say
    # "Face 3") would otherwise fail Gradio's check of the value against empty choices, an "Error" badge
    return (as_text(message), "", None, None, gr.update(value=None, visible=False), "", None, None, None)


def _view(session: logic.Session, index: int, status: str | None = None):
    """The outputs that show one face of a session."""
    choices = logic.face_choices(session)
    index = index if 0 <= index < len(choices) else 0
    face_result = session.result(index)
    return (as_text(status or logic.status_line(session)),
            logic.model_text(session, index),
            logic.chart(session, index),
            logic.overlay(session, index),
            gr.update(choices=choices, value=choices[index], visible=len(choices) > 1),
            logic.emotion_hint(face_result.result),
            logic.result_dict(session),
            logic.download_files(session),
            session)


def analyse(image, format_name, session=None, face=None):
    """Analyse a face image in one answer format.

    Returns (status, model text, AU chart, face overlay, face selector, emotion hint, result JSON, downloads);
    every problem comes back as a plain sentence in `status` (and a warning toast), never as an exception."""
    started = time.perf_counter()
    previous = session if isinstance(session, logic.Session) else None
    if previous is not None and (not image or logic.image_key(image) != previous.key):
        previous.replaced = True  # an answer still streaming about it stops (its updates would undo the clear)
    if image is None or image == "":
        if image == "":
            message = "That file could not be read as an image."
            gr.Warning(as_text(message))  # a toast renders HTML
            return _empty_outputs(message)
        return _empty_outputs(READY)
    format_name = format_name or DEFAULT_FORMAT
    try:
        analyzer = logic.get_analyzer()
        new = logic.analyse(analyzer, image, format_name, previous, max_faces=MAX_PAGE_FACES)
        index = logic.face_index(face) if previous is not None and previous.key == new.key else 0
        outputs = _view(new, index)
    except Exception as error:  # noqa: BLE001 - shown as a sentence, the app keeps serving
        if not isinstance(error, (logic.FaceError, ValueError)):
            logger.exception("analyse failed")
        message = logic.error_sentence(error, image)
        gr.Warning(as_text(message))  # a toast renders HTML
        return _empty_outputs(message)
    logger.info("analyse %s: %.2f s", format_name, time.perf_counter() - started)
    return_freed_memory()
    return outputs


def clear_chat(session=None):
    """A new image (or none) in the input: an empty chat, and an answer still streaming about the previous
    image stops before its next update (it would bring the old exchange back)."""
    if isinstance(session, logic.Session):
        session.replaced = True
    return []


def show_face(face, session):
    """Switch the text, chart, overlay and hint to another face of the current analysis (no model call)."""
    if not isinstance(session, logic.Session) or not session.results:
        return tuple(gr.skip() for _ in range(9))
    return _view(session, logic.face_index(face))


def chat(message, history, session=None, face=None):
    """Answer a question about the analysed face, streamed. Yields (chat history, cleared input box)."""
    history = list(history or [])
    shown = message if isinstance(message, str) else ""
    if len(shown) > 300:
        shown = shown[:300] + f"... [{len(message):,} characters]"
    history = history + [{"role": "user", "content": as_text(shown) or "(empty message)"}]
    facts = parse_error = None
    generate = None
    if isinstance(session, logic.Session) and session.results:
        index = logic.face_index(face)
        facts = session.facts(index)
        parse_error = session.parse_error(index)
    if facts is not None and chat_lib.refusal(message) is None:
        try:
            analyzer = logic.get_analyzer()
            generate = chat_lib.LLMStreamer(analyzer.model, lock=analyzer.lock)
        except Exception:  # noqa: BLE001 - the computed facts still answer
            logger.exception("chat LLM unavailable")
    def replaced() -> bool:  # the page shows another image now, and a cleared chat
        return getattr(session, "replaced", False)

    previous = history[:-1]
    if not replaced():
        yield history + [{"role": "assistant", "content": ANSWER_PENDING}], ""  # the question, and an answer to come
    shown_at, text = time.perf_counter(), None
    try:
        for text in chat_lib.respond(message, facts, previous, generate, parse_error=parse_error):
            if replaced():
                break  # stops the LLM
            if time.perf_counter() - shown_at >= CHAT_UPDATE_EVERY:  # each update re-sends the whole history
                shown_at = time.perf_counter()
                yield history + [{"role": "assistant", "content": as_text(text)}], ""
                text = None
        if replaced():
            yield gr.skip(), gr.skip()  # the event ends on no change, not on its last update (the old exchange)
        elif text is not None:  # the final reply, if the last update did not show it
            yield history + [{"role": "assistant", "content": as_text(text)}], ""
    except Exception as error:  # noqa: BLE001
        logger.exception("chat failed")
        yield history + [{"role": "assistant", "content": f"Sorry, the chat failed ({type(error).__name__}); "
                                                          "please ask again."}], ""


def analyse_video(video, format_name, fps, progress=gr.Progress(track_tqdm=True)):
    """Analyse a video: every face of the frames sampled at `fps` per second. Returns (status, AU time series,
    CSV + JSON lines downloads); problems come back as a sentence."""
    if not video:
        return "Upload a video first.", None, None
    try:
        done = logic.analyse_video(logic.get_analyzer(), video, format_name or "intensity", float(fps or 0))
    except Exception as error:  # noqa: BLE001 - shown as a sentence, the app keeps serving
        if not isinstance(error, (logic.FaceError, ValueError)):
            logger.exception("video analysis failed")
        message = as_text(logic.error_sentence(error, video))
        gr.Warning(message)  # a toast renders HTML
        return message, None, None
    return as_text(done.summary), done.series, done.downloads


def on_load(request: gr.Request):
    """Page opened with ?example=1 (optionally &ask=<question>): show the example face analysed (and the
    question answered), e.g. for screenshots and the headless-browser test."""
    params = dict(request.query_params) if request is not None else {}
    if params.get("example") in (None, "", "0"):
        # None, not gr.skip(): Gradio answers an update by building the session's own copy of the component,
        # which would drop tolerant_image's patch (a text file renamed .png then gets a bare "Error" badge)
        return None, None
    question = (params.get("ask") or "").strip()[: chat_lib.MAX_MESSAGE_CHARS] or None
    return EXAMPLE_FACES[0], question


def ask_pending(question, history, session=None, face=None):
    """The question of ?ask=..., asked once the analysis is there."""
    if not question:
        # the chat as it is: answering gr.skip() here erased a question asked while the analysis ran (seen in
        # Chromium, not in a minimal Blocks app; tests/test_browser.py holds the page to it)
        yield history, None
        return
    for history, _ in chat(question, history, session, face):
        yield history, None


def note_new_format(history, session=None):
    """After a change of answer format re-analysed the face, say so in a chat that has answers about the
    previous analysis (they stay: nothing the user read disappears)."""
    history = list(history or [])
    if not history or not isinstance(session, logic.Session):
        return history
    title = get_format(session.format).title
    return history + [{"role": "assistant", "content": f"(The face was analysed again, as {title}: answers from "
                                                       "here on are about this analysis.)"}]


def live(frame, mode=logic.LIVE_DEFAULT, state=None):
    """One webcam frame in live mode, largest face: the fast read-out of the model's binary answer or its written list
    answer. Returns (status, text, chart, overlay, state); `state` counts this stream's updates for the rate."""
    if frame is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), state
    now = time.perf_counter()
    if not isinstance(state, dict) or now - state.get("last", now) > 5:  # a new stream (or a long pause)
        state = {"first": now, "count": 0}
    state["last"] = now
    state["count"] += 1
    rate = (state["count"] - 1) / (now - state["first"]) if state["count"] > 1 else 0.0
    prefix = f"Live update {state['count']} ({rate:.1f}/s)"
    try:
        what, text, bars, picture = logic.live_update(logic.get_analyzer(), frame, mode or logic.LIVE_DEFAULT)
    except logic.FaceError as error:
        return f"{prefix}: {error}", gr.skip(), gr.skip(), gr.skip(), state
    except Exception as error:  # noqa: BLE001
        logger.exception("live frame failed")
        return f"{prefix}: {logic.error_sentence(error)}", gr.skip(), gr.skip(), gr.skip(), state
    status = f"{prefix}: {what} for the largest face took {time.perf_counter() - now:.2f} s."
    if state.get("shown") == (mode, text):  # the same answer as the last frame: its text and chart stay up
        return status, gr.skip(), gr.skip(), picture, state
    state["shown"] = (mode, text)
    return status, text, bars, picture, state


# ----- the page -----------------------------------------------------------------------------------------
def build() -> gr.Blocks:
    with gr.Blocks(title="AU-LLaVA: facial Action Units, written by an LLM", delete_cache=(3600, 7200)) as page:
        session = gr.State(None, time_to_live=3600)
        pending_question = gr.State(None)
        live_session = gr.State(None, time_to_live=600)
        gr.Markdown("## AU-LLaVA: facial Action Units, written by a language model\n"
                    "A face goes through dlib (detection, 68 landmarks, alignment), an AU encoder and a projector "
                    "into SmolLM2-135M-Instruct with a LoRA adapter, which writes the FACS Action Units in the "
                    "format you choose. Research demo; not for judging people.")
        with gr.Tabs():
            with gr.Tab("Photo"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=280):
                        image = tolerant_image(label="Face", type="filepath", image_mode=None,
                                               sources=["upload", "webcam", "clipboard"], height=300,
                                               elem_id="aullava-input")
                        fmt = gr.Dropdown(FORMAT_CHOICES, value=DEFAULT_FORMAT, label="Answer format",
                                          elem_id="aullava-format")
                        face = gr.Radio([], label="Face", visible=False)
                        status = gr.Markdown(READY, elem_id="aullava-status")
                        gr.Examples(EXAMPLE_FACES, inputs=[image], label="Example (public domain)")
                        overlay = gr.Image(label="Landmarks and active regions", type="pil",
                                           interactive=False, height=260, format="jpeg", elem_id="aullava-overlay")
                    with gr.Column(scale=5, min_width=320):
                        text = gr.Textbox(label="The model's answer", lines=3, max_lines=8, interactive=False,
                                          elem_id="aullava-text", buttons=["copy"])
                        bars = gr.Image(label="AU intensity (0-5)", show_label=False, type="pil",
                                        interactive=False, format="png", elem_id="aullava-chart",
                                        buttons=["download", "fullscreen"])
                        hint = gr.Markdown("")
                        downloads = gr.File(label="Download the result (JSON, CSV)", file_count="multiple",
                                            interactive=False, height=130)
                        result_json = gr.JSON(label="Result", visible=False)
                    with gr.Column(scale=4, min_width=300):
                        chatbot = gr.Chatbot(label="Ask about this face", height=470, elem_id="aullava-chat",
                                             placeholder="Analyse a face, then ask: what does AU6 mean? "
                                                         "Is this a genuine smile? Which AUs are on the brow?",
                                             feedback_options=None, sanitize_html=True)
                        question = gr.Textbox(placeholder="Ask about the Action Units...", show_label=False,
                                              elem_id="aullava-question",
                                              submit_btn="Ask", max_length=chat_lib.MAX_MESSAGE_CHARS + 1)
                        gr.Markdown("Answers come from the same base LLM (adapter off), grounded in the "
                                    "analysis; when its wording contradicts the analysis (or it fails), the "
                                    "computed facts are shown instead, with a note saying so.",
                                    elem_classes=["aullava-note"])
            with gr.Tab("Live webcam"):
                gr.Markdown(f"Streams webcam frames (one every {LIVE_INTERVAL} s at most; slow frames are "
                            "skipped) and shows the model's view of the largest face: it writes its AU list, "
                            "or its binary answer's probabilities are read in at most "
                            f"{logic.LIVE_PASSES} forward passes (labelled as such, not a written answer). "
                            "Stop the webcam to stop.")
                live_mode = gr.Radio([(label, key) for key, label in logic.LIVE_MODES.items()], value=logic.LIVE_DEFAULT,
                                     label="Live mode", elem_id="aullava-live-mode")
                with gr.Row():
                    with gr.Column():
                        camera = gr.Image(label="Webcam", sources=["webcam"], streaming=True, type="numpy",
                                          height=360, elem_id="aullava-camera")
                        live_status = gr.Markdown("", elem_id="aullava-live-status")
                    with gr.Column():
                        live_text = gr.Textbox(label="The model's answer (live)", interactive=False, lines=2,
                                               elem_id="aullava-live-text")
                        live_bars = gr.Image(label="AU chart (live)", type="pil", interactive=False, format="png")
                        live_overlay = gr.Image(label="Face (live)", type="pil", interactive=False,
                                                format="jpeg", height=240)

            with gr.Tab("Video"):
                gr.Markdown("Upload a video: the frames sampled at the chosen rate are analysed (every face, ids "
                            f"kept across frames; at most {logic.MAX_VIDEO_FRAMES} frames here, the command line "
                            "has no limit) and the AU curves of the most seen face drawn. Rows in OpenFace's "
                            "columns download as CSV and JSON lines.")
                with gr.Row(equal_height=False):
                    with gr.Column(scale=4, min_width=300):
                        video = gr.Video(label="Video", sources=["upload"], height=300, elem_id="aullava-video")
                        video_fmt = gr.Dropdown(FORMAT_CHOICES, value="intensity", label="Answer format")
                        video_fps = gr.Slider(0.5, 10, value=2, step=0.5, label="Frames analysed per second")
                        video_button = gr.Button("Analyse the video", variant="primary")
                        video_status = gr.Markdown("", elem_id="aullava-video-status")
                    with gr.Column(scale=6, min_width=360):
                        # no label over the chart: it covered the start of the chart's own title
                        video_series = gr.Image(label="AU time series", show_label=False, type="pil", interactive=False,
                                                format="png", elem_id="aullava-video-series")
                        video_downloads = gr.File(label="Download the rows (CSV, JSON lines)",
                                                  file_count="multiple", interactive=False, height=130)

        outputs = [status, text, bars, overlay, face, hint, result_json, downloads, session]
        common = dict(concurrency_limit=CONCURRENCY, concurrency_id="model")
        question.submit(chat, [question, chatbot, session, face], [chatbot, question], api_name="chat", **common)
        # a new face, a new chat: cleared first, in the same chain, so that what follows the analysis reads the
        # cleared chat (an answer still streaming about the previous face stops itself: Session.replaced)
        image.change(clear_chat, session, chatbot, queue=False, api_visibility="private").then(
            analyse, [image, fmt, session, face], outputs, api_name="analyse", **common).then(
            ask_pending, [pending_question, chatbot, session, face], [chatbot, pending_question],
            api_visibility="private", **common)
        page.load(on_load, None, [image, pending_question], api_visibility="private")
        fmt.change(analyse, [image, fmt, session, face], outputs, api_visibility="private",
                   trigger_mode="always_last", **common).success(
            note_new_format, [chatbot, session], chatbot, api_visibility="private", queue=False)
        face.input(show_face, [face, session], outputs, api_visibility="private", concurrency_limit=None)
        video_button.click(analyse_video, [video, video_fmt, video_fps], [video_status, video_series, video_downloads],
                           api_name="analyse_video", **common)
        camera.stream(live, [camera, live_mode, live_session], [live_status, live_text, live_bars, live_overlay, live_session],
                      stream_every=LIVE_INTERVAL, time_limit=600, concurrency_limit=1, concurrency_id="live",
                      api_visibility="private")
    page.queue(default_concurrency_limit=CONCURRENCY, max_size=100)
    return page


demo = build()


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


LIBC = _libc()
_last_trim = [0.0]


def limit_malloc_arenas(count: int = 2):
    """glibc gives busy threads malloc arenas of their own (up to 8 per core), each keeping memory it freed;
    Gradio's worker threads then hold ~50 MB more RSS under load. $MALLOC_ARENA_MAX, when set, wins."""
    if LIBC is not None and hasattr(LIBC, "mallopt") and not os.environ.get("MALLOC_ARENA_MAX"):
        LIBC.mallopt(-8, count)  # M_ARENA_MAX


def return_freed_memory(every: float = 5.0):
    """Hand the heap's freed pages back to the system (glibc malloc_trim), at most once per `every` seconds:
    images and model activations come and go per request and would otherwise stay in the process's RSS."""
    now = time.monotonic()
    if LIBC is None or not hasattr(LIBC, "malloc_trim") or now - _last_trim[0] < every:
        return
    _last_trim[0] = now
    LIBC.malloc_trim(0)


if __name__ == "__main__":
    limit_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    threading.Thread(target=logic.warm_up, args=((DEFAULT_FORMAT, logic.LIVE_FORMAT),), daemon=True).start()
    # No allowed_paths and no static paths: the page serves only its own uploads and outputs (Gradio's cache).
    demo.launch(theme=gr.themes.Soft(), css=CSS, show_error=False, max_file_size=MAX_UPLOAD,
                state_session_capacity=MAX_SESSIONS)
