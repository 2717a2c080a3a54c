"""Model hub: push a checkpoint folder, and load a checkpoint by hub id from a pre-filled hub cache, offline."""
import shutil

import pytest

from aullava.train import Trainer, TrainConfig

TINY_MODEL = {"aus": (1, 2, 4, 6, 12, 25),
              "encoder": {"type": "landmark_patch", "dim": 32, "chip_size": 64, "channels": 8, "head_layers": 1},
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(scope="module")
def checkpoint(tiny_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub-run")
    config = TrainConfig(manifest=str(tiny_manifest), out=str(out), tiny_llm=True, encoder_steps=4, projector_steps=2,
                         lora_steps=2, encoder_batch=4, batch_size=2, model=TINY_MODEL)
    return Trainer(config, log=lambda *_: None).run()


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_push_uploads_the_whole_checkpoint_folder(monkeypatch, checkpoint, tmp_path):
    import huggingface_hub

    from aullava.cli import main

    remote, calls = tmp_path / "remote", []

    class RecordingApi:  # the network boundary: what would be sent to the hub lands in a local folder
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id):
            shutil.copytree(folder_path, remote / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert main(["push", str(checkpoint), "--repo-id", "lab/aullava-tiny", "--private"]) == 0
    assert calls == [("create", "lab/aullava-tiny", True, True)]
    assert _files(remote / "lab/aullava-tiny") == _files(checkpoint)
    assert "adapter/adapter_model.safetensors" in _files(checkpoint) and not any(
        name.endswith((".bin", ".pt", ".pkl")) for name in _files(checkpoint))  # safetensors and json only
    assert main(["push", str(tmp_path / "not-a-checkpoint"), "--repo-id", "lab/x"]) == 2
    assert main(["push", str(checkpoint), "--repo-id", "not a repo id!"]) == 2


def test_a_checkpoint_loads_by_hub_id_from_the_hub_cache_offline(monkeypatch, checkpoint, tmp_path, grace_hopper):
    import huggingface_hub.constants

    from aullava.model import resolve_checkpoint
    from aullava.service import Analyzer

    repo = tmp_path / "hub" / "models--lab--aullava-tiny"
    commit = "1" * 40
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert resolve_checkpoint("lab/aullava-tiny") == repo / "snapshots" / commit
    by_id, by_path = Analyzer("lab/aullava-tiny"), Analyzer(str(checkpoint))
    for fmt in ("list", "binary"):
        assert by_id.analyze(grace_hopper, fmt).faces[0].text == by_path.analyze(grace_hopper, fmt).faces[0].text
    with pytest.raises(FileNotFoundError, match="lab/not-cached"):
        resolve_checkpoint("lab/not-cached")
