"""Security: no pickles or remote code, validated hub ids, bounded chat input, text never rendered as HTML,
uploads capped, and the running app serves no file outside its own uploads and outputs."""
from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO, grace_hopper_path

SOURCES = sorted((REPO / "aullava").rglob("*.py")) + [REPO / "app.py"]


class _Trap:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


# ----- no pickles, no remote code --------------------------------------------------------------------------
def test_sources_load_no_pickle_and_no_remote_code():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert "trust_remote_code=True" not in text, path
        assert "allow_pickle=True" not in text, path


def test_a_pickled_adapter_is_never_unpickled(tmp_path):
    from aullava.model import from_pretrained
    from aullava.service import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.is_dir():
        pytest.skip("no embedded checkpoint")
    folder = tmp_path / "checkpoint"
    shutil.copytree(DEFAULT_CHECKPOINT, folder)
    (folder / "adapter" / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    (folder / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        from_pretrained(folder)
    assert not marker.exists()


def test_a_base_llm_folder_with_only_a_pickle_is_refused(tmp_path):
    from aullava.llm import load_base_llm

    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "vocab_size": 32, "hidden_size": 8, '
                                        '"intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}')
    marker = tmp_path / "marker"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(Exception):
        load_base_llm(str(folder), fresh=True)
    assert not marker.exists()


@pytest.mark.parametrize("repo_id", ["bad id/x", "a/b/c", "owner/na..me", "x--y/z", "owner/" + "n" * 97, "noslash"])
def test_malformed_hub_ids_are_refused_without_a_download(repo_id):
    from aullava.model import resolve_checkpoint

    with pytest.raises(ValueError, match="neither a checkpoint folder nor a hub repo id of the form 'owner/name'"):
        resolve_checkpoint(repo_id)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    from aullava.model import resolve_checkpoint

    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):
        resolve_checkpoint(str(tmp_path / "nowhere"))


# ----- the page: bounded chat, text never HTML ---------------------------------------------------------------
def test_chat_input_is_bounded():
    import app
    from aullava import chat as chat_lib

    message = "x" * 20000
    history, box = list(app.chat(message, [], None))[-1]
    assert "over 2,000 characters" in history[-1]["content"] and str(chat_lib.MAX_MESSAGE_CHARS) in \
        history[-1]["content"].replace(",", "")
    assert len(history[0]["content"]) < 400 and box == ""  # the echo is cut too
    question = next(c for c in app.demo.blocks.values() if getattr(c, "placeholder", "") and
                    "Ask about the Action Units" in c.placeholder)
    assert question.max_length == chat_lib.MAX_MESSAGE_CHARS + 1


def test_html_in_a_question_or_an_answer_is_shown_as_text(monkeypatch):
    import app

    attack = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    history, _ = list(app.chat(attack, [], None))[-1]
    assert history[0]["content"] == "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    monkeypatch.setattr(app.chat_lib, "respond", lambda *args, **kwargs: iter([f"AU12 {attack}"]))
    history, _ = list(app.chat("what is AU12?", [], None))[-1]
    assert "<" not in history[-1]["content"] and history[-1]["content"].startswith("AU12 &lt;script&gt;")


def test_model_text_goes_to_plain_text_components():
    import gradio as gr

    import app

    by_id = {c.elem_id: c for c in app.demo.blocks.values() if getattr(c, "elem_id", None)}
    assert isinstance(by_id["aullava-text"], gr.Textbox) and isinstance(by_id["aullava-live-text"], gr.Textbox)
    assert by_id["aullava-chat"].sanitize_html is True
    assert not any(isinstance(c, gr.HTML) for c in app.demo.blocks.values())


def test_a_file_name_with_html_is_escaped_in_the_status(tmp_path, monkeypatch):
    import app
    from aullava import demo
    from aullava.service import get_analyzer

    monkeypatch.setattr(demo, "_analyzer", get_analyzer())
    path = tmp_path / "<img src=x onerror=alert(1)>.jpg"
    path.write_text("not a photo")
    with pytest.warns(UserWarning) as toasts:  # gr.Warning outside a request: a Python warning
        status = app.analyse(str(path), "list")[0]
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in status and "<img" not in status
    assert all("<img" not in str(toast.message) for toast in toasts)


def test_only_uploads_reach_the_analyser_when_gradio_cannot_read_them(tmp_path):
    import app
    from gradio.data_classes import ImageData

    component = next(c for c in app.demo.blocks.values() if getattr(c, "elem_id", None) == "aullava-input")
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the analyser")
    assert component.preprocess(ImageData(path=str(outside))) == ""
    assert app.is_upload("/etc/passwd") is False


# ----- the running app ---------------------------------------------------------------------------------------
def test_app_serves_no_file_outside_its_uploads_and_outputs(app_server):
    import httpx

    base = app_server["url"]
    for target in ("/etc/passwd", str(REPO / "app.py"), str(REPO / "assets" / "aullava-ckplus" / "aullava.safetensors"),
                   grace_hopper_path(), "../../../../etc/passwd"):
        response = httpx.get(f"{base}gradio_api/file={target}", timeout=30)
        assert response.status_code in (403, 404), (target, response.status_code)
        assert "root:" not in response.text


def test_app_does_not_analyse_a_server_file_named_by_a_client(app_server):
    import httpx

    base = app_server["url"]
    payload = {"data": [{"path": grace_hopper_path(), "meta": {"_type": "gradio.FileData"}}, "list", None]}
    event = httpx.post(f"{base}gradio_api/call/analyse", json=payload, timeout=30).json()["event_id"]
    stream = httpx.get(f"{base}gradio_api/call/analyse/{event}", timeout=120).text
    assert "event: error" in stream and "Found 1 face" not in stream


def test_app_refuses_uploads_over_the_size_cap(app_server, tmp_path):
    import httpx

    import app

    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"0" * (21 * 1024 * 1024))
    with big.open("rb") as handle:
        response = httpx.post(f"{app_server['url']}gradio_api/upload", files={"files": ("big.jpg", handle)},
                              timeout=120)
    assert app.MAX_UPLOAD == "20mb"
    assert response.status_code == 413, response.status_code
