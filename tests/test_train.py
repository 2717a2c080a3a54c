"""A tiny-config training run lowers the loss, resumes, and its checkpoint evaluates and analyses."""
import csv
import json

import numpy as np
import pytest
import torch

from aullava.data.faces import face_batch
from aullava.data.manifest import read_manifests
from aullava.formats import au_code, get_format
from aullava.train import Trainer, TrainConfig

TINY_MODEL = {"aus": (1, 2, 4, 6, 7, 12, 25),
              "encoder": {"type": "landmark_patch", "dim": 32, "chip_size": 64, "channels": 8, "head_layers": 1},
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


def _config(manifest, out, **overrides):
    values = dict(manifest=str(manifest), out=str(out), tiny_llm=True, encoder_steps=30, projector_steps=12,
                  lora_steps=12, encoder_batch=8, batch_size=4, save_every=5, model=TINY_MODEL,
                  encoder_lr=1e-2, projector_lr=3e-2, lora_lr=3e-2)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def trained(tiny_manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # one format, so the answer loss compares like with like across steps (decisions differ per format)
    trainer = Trainer(_config(tiny_manifest, out, formats=("binary",)))
    path = trainer.run()
    return trainer, path


def _mean(history, stage, part, key="loss"):
    values = [h[key] for h in history if h["stage"] == stage]
    n = max(1, len(values) // 3)
    return float(np.mean(values[:n] if part == "first" else values[-n:]))


def test_training_lowers_the_loss(trained):
    trainer, path = trained
    history = trainer.history
    assert _mean(history, "encoder", "last") < _mean(history, "encoder", "first")
    assert _mean(history, "projector", "last", "lm") < _mean(history, "projector", "first", "lm")
    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    card = json.loads((path / "aullava_config.json").read_text())
    assert card["training"]["faces"] == 6 and card["aus"] == list(TINY_MODEL["aus"])


def test_each_ensemble_member_learns_from_its_own_loss(tiny_manifest, tmp_path):
    model = {**TINY_MODEL, "encoder": {**TINY_MODEL["encoder"], "members": 2}}
    trainer = Trainer(_config(tiny_manifest, tmp_path, model=model, encoder_steps=0, projector_steps=0, lora_steps=0))
    indices = np.arange(len(trainer.table))
    logits = torch.randn(2, len(indices), len(TINY_MODEL["aus"]))
    per_member = [trainer._aux_loss(member, indices) for member in logits]
    assert torch.allclose(trainer._aux_loss(logits, indices), torch.stack(per_member).mean())
    # the mean of the losses, not the loss of the mean: members are not trained as one averaged model
    assert not torch.allclose(trainer._aux_loss(logits, indices), trainer._aux_loss(logits.mean(0), indices))
    before = [[p.detach().clone() for p in member.parameters()] for member in trainer.model.encoder.members]
    trainer.config.encoder_steps = 40
    trainer.run()
    for member, weights in zip(trainer.model.encoder.members, before):
        assert any(not torch.equal(p, w) for p, w in zip(member.parameters(), weights))
    assert _mean(trainer.history, "encoder", "last") < _mean(trainer.history, "encoder", "first")


def test_the_landmark_regression_is_fitted_on_the_training_faces_at_stage_0(tiny_manifest, tmp_path):
    model = {**TINY_MODEL, "encoder": {**TINY_MODEL["encoder"], "landmark_logistic": 0.5}}
    trainer = Trainer(_config(tiny_manifest, tmp_path, model=model, encoder_steps=2, projector_steps=0, lora_steps=0))
    trainer.run()
    regression = trainer.model.encoder.landmark_logistic
    _, landmarks = face_batch(trainer.table, range(len(trainer.table)), trainer.model.config.chip_size)
    read = regression(landmarks) > 0
    for k, a in enumerate(trainer.aus):
        labels = trainer.labels[:, k] > 0
        if labels.all() or not labels.any():
            assert (read[:, k] == labels).all()  # one class in training: that class
        else:
            assert regression.weight[k].abs().sum() > 0
    assert torch.allclose(regression.mean, landmarks.flatten(1).mean(0), atol=1e-5)


def test_training_resumes_where_it_stopped(tiny_manifest, tmp_path):
    first = Trainer(_config(tiny_manifest, tmp_path, lora_steps=0))
    first.run()
    state = json.loads((tmp_path / "state" / "trainer.json").read_text())
    assert state["stage"] == "lora"
    resumed = Trainer(_config(tiny_manifest, tmp_path, lora_steps=6))
    resumed.run()
    stages = [h["stage"] for h in resumed.history]
    assert stages.count("encoder") == 30 and stages.count("projector") == 12 and stages.count("lora") == 6


def test_a_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tiny_manifest, tmp_path, monkeypatch):
    def encoder_weights(out, kill_at=None):
        config = _config(tiny_manifest, out, encoder_steps=20, projector_steps=0, lora_steps=0)
        trainer = Trainer(config)
        if kill_at is not None:
            step, calls = trainer._encoder_step, []

            def dies_at_kill(*args):
                calls.append(1)
                if len(calls) > kill_at:
                    raise KeyboardInterrupt
                return step(*args)

            monkeypatch.setattr(trainer, "_encoder_step", dies_at_kill)
            with pytest.raises(KeyboardInterrupt):
                trainer.run()
            trainer = Trainer(config)  # a new process, as after a kill
        trainer.run()
        assert [h["step"] for h in trainer.history] == list(range(20))  # steps 10-12 lost with the kill, redone
        return trainer.model.encoder.state_dict()

    whole = encoder_weights(tmp_path / "whole")
    resumed = encoder_weights(tmp_path / "killed", kill_at=13)  # the last state saved holds steps 0-9
    # the encoder trains with dropout: equal weights need the same random draws per step after the restart
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_evaluate_on_a_tiny_manifest(trained, tiny_manifest, tmp_path):
    from aullava.cli import main

    _, path = trained
    out, predictions = tmp_path / "metrics.json", tmp_path / "predictions.csv"
    assert main(["evaluate", "--manifest", str(tiny_manifest), "--checkpoint", str(path),
                 "--formats", "list", "binary", "json", "--out", str(out), "--predictions", str(predictions)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 6 and report["detection_rate"] == 1.0
    assert report["manifest"] == str(tiny_manifest) and report["min_positives"] == 10
    trained_on = set(json.loads((path / "aullava_config.json").read_text())["training"]["subjects"])
    seen = [w for w in report["warnings"] if "this checkpoint was trained on" in w]
    assert bool(seen) == bool(trained_on & set(report["subjects"]))  # a score on its own training faces is flagged
    assert report["subjects"] == sorted({row["subject"] for row in csv.DictReader(tiny_manifest.open())
                                         if row["kind"] != "near_peak"})  # the subjects scored
    # one row per image and format: the written text, the presence parsed from it, the labels beside it
    rows = list(csv.DictReader(predictions.open()))
    assert len(rows) == 6 * 3 and {r["format"] for r in rows} == {"list", "binary", "json"}
    labels = {str(s.path): s for s in read_manifests(tiny_manifest)}
    for row in rows:
        sample = labels[row["path"]]
        parsed = get_format(row["format"]).parse(row["text"], TINY_MODEL["aus"])
        for a in TINY_MODEL["aus"]:
            assert row[f"{au_code(a)}_pred"] == str(int(parsed.present[a]))
            assert row[f"{au_code(a)}_true"] == (str(int(a in sample.aus)) if sample.is_known(a) else "")
            assert row[f"{au_code(a)}_true_intensity"] == str(sample.intensities.get(a, ""))
        assert (row["sequence"], row["frame"], row["emotion"]) == (sample.sequence, sample.frame, sample.emotion)
    for name, metrics in report["formats"].items():  # the rows hold what the metrics count
        for a in TINY_MODEL["aus"]:
            tp = sum(r[f"{au_code(a)}_pred"] == r[f"{au_code(a)}_true"] == "1" for r in rows if r["format"] == name)
            assert tp == metrics["per_au"][f"AU{a}"]["tp"]
    for name in ("list", "binary", "json"):
        metrics = report["formats"][name]
        assert set(metrics["per_au"]) == {f"AU{a}" for a in TINY_MODEL["aus"]}
        assert metrics["seconds_per_image"] > 0
        for values in metrics["per_au"].values():
            if values["support"] == 0 and values["fp"] == 0:
                assert values["f1"] is None and values["precision"] is None  # nothing to score, not 0
            else:
                assert 0.0 <= values["f1"] <= 1.0
    assert 0.0 <= report["agreement"]["all"] <= 1.0
    diagnostics = report["diagnostics"]
    for key in ("encoder_head", "readout"):
        assert set(diagnostics[key]["per_au"]) == {f"AU{a}" for a in TINY_MODEL["aus"]}
    assert 0.0 <= diagnostics["readout_agrees_with_binary"] <= 1.0
    chimeras = diagnostics["chimeras"]  # the read-out on faces made of other faces' AU tokens
    assert set(chimeras["readout"]["per_au"]) == {f"AU{a}" for a in TINY_MODEL["aus"]}
    assert 0.0 <= chimeras["readout_agrees_with_head"] <= 1.0


def test_read_presence_on_given_tokens_is_the_read_presence_of_the_faces_they_come_from(trained):
    trainer, _ = trained
    model = trainer.model.eval()
    chip, landmarks = face_batch(trainer.table, np.arange(len(trainer.table)), model.config.chip_size)
    with torch.no_grad():
        tokens, logits = model.encoder(chip, landmarks)
    own, _ = model.read_presence(chip, landmarks)
    given, _ = model.read_presence(chip, landmarks, encoded=(tokens, logits))
    assert torch.allclose(own, given, atol=1e-5)
    other, _ = model.read_presence(chip, landmarks, encoded=(tokens + 5 * torch.randn_like(tokens), logits))
    # what is read follows the tokens given, not the chips (the tiny model's read-out moves by ~5e-4 here)
    assert not torch.allclose(own, other, atol=1e-5)


def test_bench_times_every_stage_and_finds_every_face(trained, tmp_path):
    from aullava import bench

    _, path = trained
    report = bench.run(str(path), formats=("list", "binary"), repeats=1, log=lambda *_: None)
    stages = report["stages"]
    for key in ("decode", "detect", "landmarks", "align", "encode", "read_presence", "generate_list",
                "generate_binary", "parse_list", "chart"):
        assert stages[key] > 0, key
    assert stages["tokens_binary"] > stages["tokens_list"] >= 2
    assert {k: v["faces_found"] for k, v in report["faces_per_image"].items()} == {"1": 1, "5": 5, "10": 10}
    assert all(v["faces_found"] == 1 for v in report["image_size"].values())
    assert report["peak_rss_mb"] > 0 and "generate_list" in bench.format_report(report)


def test_unknown_labels_are_masked_from_the_losses_and_the_metrics(tiny_manifest, tmp_path):
    import csv

    from aullava.evaluate import presence_metrics

    rows = list(csv.DictReader(tiny_manifest.open()))
    rows[0]["unknown"] = "4;6"  # face0: AU4 and AU6 not coded
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    trainer = Trainer(_config(manifest, tmp_path / "run", images_root=str(tiny_manifest.parent)))
    row = [s.path.name for s in trainer.table.samples].index("face0.png")
    # face0 is asked about every AU but the two it has no label for; the others about all
    groups = {asked: set(rows.tolist()) for asked, rows in trainer.answer_groups}
    assert groups[tuple(a for a in TINY_MODEL["aus"] if a not in (4, 6))] == {row}
    assert len(groups[TINY_MODEL["aus"]]) == 5
    aus = list(trainer.aus)
    assert trainer.known[row].tolist() == [0.0 if a in (4, 6) else 1.0 for a in aus]
    logits = torch.zeros(1, len(aus))
    wild = logits.clone()
    wild[0, aus.index(4)] = wild[0, aus.index(6)] = 50.0  # a confident answer on the unknown AUs changes nothing
    assert trainer._aux_loss(wild, [row]).item() == pytest.approx(trainer._aux_loss(logits, [row]).item())
    truth = np.array([[True], [False]])
    predicted = np.array([[False], [False]])
    assert presence_metrics(truth, predicted, [4], np.array([[False], [True]]))["per_au"]["AU4"]["support"] == 0


def test_intensity_pairs_leave_out_aus_without_a_label():
    from pathlib import Path

    from aullava.data.manifest import Sample
    from aullava.evaluate import level_pairs
    from aullava.formats import AUResult

    aus = (1, 4, 6, 12, 25)
    written = AUResult(aus, {6: True, 12: True, 25: True}, {1: 0.0, 4: 0.0, 6: 2.0, 12: 3.0, 25: 1.0})
    # a BP4D-like frame: AU12 at level 3, AU6 present without a level, AU4 unknown, AU25 not coded by its dataset
    frame = Sample(Path("f.jpg"), "S1", aus=frozenset({6, 12}), intensities={12: 3}, unknown=frozenset({4}),
                   coded=frozenset({1, 4, 6, 12}))
    assert level_pairs(frame, written, aus) == [(0, 0.0, 1), (3, 3.0, 12)]
    assert level_pairs(Sample(Path("g.jpg"), "S1", aus=frozenset({12})), written, aus) == []  # no level coded
    presence_only = AUResult(aus, {12: True})
    assert level_pairs(frame, presence_only, aus) == []


def test_format_agreement_counts_only_the_pairs_compared():
    from aullava.evaluate import format_agreement

    listed = np.array([[1, 0], [0, 0], [0, 0]], bool)
    binary = np.array([[1, 1], [0, 0], [0, 0]], bool)  # rows 2-3: unanswered images, zeros in both
    assert format_agreement({"list": listed, "binary": binary}) == {"list~binary": 0.8333, "all": 0.8333}
    answered = np.array([[True, True], [False, False], [False, False]])
    assert format_agreement({"list": listed, "binary": binary}, answered) == {"list~binary": 0.5, "all": 0.5}
    assert format_agreement({"list": listed, "binary": binary}, np.zeros((3, 2), bool)) == {}


def test_several_datasets_each_asked_only_the_aus_they_code(tiny_manifest, tmp_path, grace_hopper):
    """As the paper trains on BP4D + DISFA + FEAFA: an image of a dataset that codes fewer AUs is asked, and
    taught, only about those; its missing AUs are no label (not "absent") in every loss."""
    import csv

    from aullava.formats import get_format

    rows = list(csv.DictReader(tiny_manifest.open()))
    narrow = (1, 2, 12, 25)  # a DISFA-like dataset coding 4 of the model's AUs
    second = tmp_path / "narrow.csv"
    with second.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + ["coded"])
        writer.writeheader()
        for row in rows:
            aus = [a for a in row["aus"].split(";") if a and int(a) in narrow]
            writer.writerow({**row, "path": str(tiny_manifest.parent / row["path"]), "aus": ";".join(aus),
                             "intensities": "", "coded": ";".join(map(str, narrow))})
    config = _config(tiny_manifest, tmp_path / "run", lora_steps=6, projector_steps=6, formats=("binary", "list"))
    config.manifest = [str(tiny_manifest), str(second)]
    trainer = Trainer(config)
    groups = {asked: len(rows) for asked, rows in trainer.answer_groups}
    assert groups == {TINY_MODEL["aus"]: 6, narrow: 6}
    narrow_row = 6  # the second manifest's first image
    assert trainer.known[narrow_row].tolist() == [float(a in narrow) for a in TINY_MODEL["aus"]]
    model = trainer.model
    before, _ = model.prompt_parts("binary", narrow)
    assert "AU12" in before and "AU04" not in before and "AU07" not in before
    result = trainer.result_for(trainer.table.samples[narrow_row], narrow)
    ids, _, _ = model.answer_targets("binary", result)
    assert model.tokenizer.decode(ids).startswith("AU01:") and "AU04" not in model.tokenizer.decode(ids)
    path = trainer.run()
    llm_steps = [h for h in trainer.history if h["stage"] != "encoder"]
    assert {h["asked_aus"] for h in llm_steps} == {7, 4} and all(h["lm"] > 0 for h in llm_steps)

    from aullava.service import Analyzer

    analyzer = Analyzer(str(path))
    _, faces = analyzer.detect(grace_hopper)
    (answer,) = analyzer.describe(faces[:1], "binary", aus=narrow)
    assert answer.result is not None and answer.result.aus == narrow
    assert [code.split(":")[0] for code in answer.text.split()] == ["AU01", "AU02", "AU12", "AU25"]
    assert get_format("binary").parse(answer.text, narrow).aus == narrow
    with pytest.raises(ValueError, match="subset"):
        analyzer.describe(faces[:1], "binary", aus=(1, 3))

    from aullava.evaluate import evaluate

    predictions = []  # evaluated as trained: each image asked the AUs its dataset codes
    evaluate(analyzer, config.manifest, formats=("binary",), diagnostics=False, progress=False,
             predictions=predictions)
    narrow_rows = [p for p in predictions if "AU07" not in p["text"]]
    assert len(narrow_rows) == len(predictions) // 2 and all(p["AU07_pred"] == "" for p in narrow_rows)
    assert all(p["AU07_pred"] in (0, 1) for p in predictions if p not in narrow_rows)


def test_a_truncated_landmark_cache_file_is_recomputed(tiny_manifest, tmp_path, monkeypatch):
    # Two runs preparing the same images side by side once met a cache file another process was still writing.
    from aullava.data.faces import prepare_faces
    from aullava.data.manifest import read_manifest

    monkeypatch.setenv("AULLAVA_CACHE", str(tmp_path))
    samples = read_manifest(tiny_manifest)[:2]
    first = prepare_faces(samples, progress=False)
    files = sorted((tmp_path / "landmarks").iterdir())
    assert [f.suffix for f in files] == [".npy", ".npy"]  # no partial file left behind
    files[0].write_bytes(b"")
    again = prepare_faces(samples, progress=False)
    np.testing.assert_array_equal(again.landmarks, first.landmarks)
    assert files[0].stat().st_size > 0


def test_boundary_mixes_move_tokens_toward_the_heads_boundary_on_their_own_side(tiny_manifest, tmp_path):
    from aullava.train import boundary_mix

    model = {**TINY_MODEL, "encoder": {**TINY_MODEL["encoder"], "members": 2}}
    trainer = Trainer(_config(tiny_manifest, tmp_path, model=model, encoder_steps=0, projector_steps=0, lora_steps=0,
                              boundary_mix=1.0))
    encoder = trainer.model.encoder.eval()
    tokens, logits = trainer._bank_of_faces()
    # an untrained head reads every face alike: spread its logits so each AU has faces on both sides
    with torch.no_grad():
        for member, part in zip(encoder.members, torch.split(tokens, 32, dim=-1)):
            member.head.au_weight.mul_(50)
            member.head.au_bias.copy_(-(part * member.head.au_weight).sum(-1).median(0).values)
    trainer._bank = None
    tokens, logits = trainer._bank_of_faces()
    assert torch.allclose(encoder.read_logits(tokens), logits, atol=1e-4)
    both_sides = ((logits > 0).any(0) & (logits <= 0).any(0)).numpy()
    assert both_sides.sum() >= 2
    gap, reach = 0.05, 0.2
    mixed, partner = boundary_mix(tokens, logits, tokens, logits, 1.0, gap, reach, np.random.default_rng(0))
    with torch.no_grad():
        read = encoder.read_logits(mixed)
    assert set(np.flatnonzero(both_sides)) == set(np.nonzero(partner >= 0)[1])
    assert (partner[:, ~both_sides] == -1).all()
    moved = 0
    for i, k in zip(*np.nonzero(partner >= 0)):
        own, now = float(logits[i, k]), float(read[i, k])
        assert bool(logits[i, k] > 0) != bool(logits[partner[i, k], k] > 0)
        assert (now > 0) == (own > 0)  # the head's reading does not change
        if abs(own - now) > 1e-4:  # moved toward the boundary, to within [gap, reach] of it
            moved += 1
            assert gap - 1e-3 <= abs(now) <= reach + 1e-3 and abs(now) < abs(own)
        else:  # already nearer than its aim
            assert abs(own) <= reach + 1e-3
    assert moved > 0
    # nothing mixed where not asked; untouched tokens are the faces' own
    kept, none = boundary_mix(tokens, logits, tokens, logits, 1.0, gap, reach, np.random.default_rng(0),
                              mixable=np.zeros(logits.shape, dtype=bool))
    assert (none == -1).all() and torch.equal(kept, tokens)
    # a rate per face (`weak_faces`): none of the first face's tokens, every two-sided one of the others
    rates = np.ones(len(tokens))
    rates[0] = 0.0
    _, per_face = boundary_mix(tokens, logits, tokens, logits, rates, gap, reach, np.random.default_rng(1))
    assert (per_face[0] == -1).all() and (per_face[1:, both_sides] >= 0).all()
    # the answer targets say what the head reads in each mix, the rest what the labels say
    results = trainer._token_targets(np.arange(len(tokens)), trainer.aus, (mixed, logits), partner,
                                     np.full(partner.shape, -1))
    for row, result in enumerate(results):
        sample = trainer.table.samples[row]
        for k, a in enumerate(trainer.aus):
            expected = bool(read[row, k] > 0) if partner[row, k] >= 0 else a in sample.aus
            assert result.present[a] == expected
            assert (result.intensity[a] or 0) > 0 if expected else result.intensity[a] == 0


def test_chimeras_take_each_au_token_from_a_labelled_face_and_answer_what_that_face_has(tiny_manifest, tmp_path):
    from aullava.train import chimeras

    trainer = Trainer(_config(tiny_manifest, tmp_path, encoder_steps=0, projector_steps=0, lora_steps=0, chimera=1.0))
    tokens, logits = trainer._bank_of_faces()
    faces = np.arange(len(tokens))
    known = trainer.known.numpy() > 0
    known[0, 0] = False  # a face without a label for the first AU never lends it
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    same, same_logits, none = chimeras(tokens, logits, tokens, logits, known, 0.0, rng)
    assert (none == -1).all() and same is tokens and same_logits is logits
    assert rng.bit_generator.state == state  # rate 0 draws nothing: seeded runs without chimeras are unchanged
    mixable = np.ones(known.shape, dtype=bool)
    mixable[:, 1] = False
    mixed, mixed_logits, source = chimeras(tokens, logits, tokens, logits, known, 1.0, rng, mixable=mixable)
    assert (source[:, 1] == -1).all() and torch.equal(mixed[:, 1], tokens[:, 1])
    assert (source[:, [k for k in range(len(trainer.aus)) if k != 1]] >= 0).all()
    assert 0 not in source[:, 0]
    for i, k in zip(*np.nonzero(source >= 0)):
        assert torch.equal(mixed[i, k], tokens[source[i, k], k]) and mixed_logits[i, k] == logits[source[i, k], k]
    results = trainer._token_targets(faces, trainer.aus, (mixed, logits), np.full(source.shape, -1), source)
    for row, result in enumerate(results):
        for k, a in enumerate(trainer.aus):
            lender = trainer.table.samples[source[row, k] if source[row, k] >= 0 else row]
            assert result.present[a] == (a in lender.aus)
    with pytest.raises(ValueError, match="frozen"):
        Trainer(_config(tiny_manifest, tmp_path / "b", chimera=0.5, encoder_lr_scale=0.2))


def test_swaps_change_one_au_token_of_a_real_face_to_a_face_labelled_the_other_way(tiny_manifest, tmp_path):
    from aullava.train import swaps

    trainer = Trainer(_config(tiny_manifest, tmp_path, encoder_steps=0, projector_steps=0, lora_steps=0, swap=1.0))
    tokens, logits = trainer._bank_of_faces()
    labels, known = trainer.labels_mask, trainer.known_mask
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    same, _, none = swaps(tokens, logits, tokens, logits, labels, known, labels, 0.0, rng)
    assert same is tokens and (none == -1).all() and rng.bit_generator.state == state
    chimeric = np.full(labels.shape, -1)
    chimeric[0, :] = 1  # a chimeric face is left alone
    mixable = known.copy()
    mixable[:, 1] = False
    swapped, swapped_logits, source = swaps(tokens, logits, tokens, logits, labels, known, labels, 1.0, rng,
                                            mixable=mixable, source=chimeric)
    assert (source[0] == 1).all() and torch.equal(swapped[0], tokens[0])
    assert (source[1:, 1] == -1).all()
    changed = source[1:] >= 0
    assert (changed.sum(1) <= 1).all() and changed.sum() >= len(changed) - 2  # one AU per face
    removed = 0
    for i, k in zip(*np.nonzero(source >= 0)):
        if i == 0:
            continue
        j = source[i, k]
        assert labels[j, k] != labels[i, k] and known[j, k]
        assert torch.equal(swapped[i, k], tokens[j, k]) and swapped_logits[i, k] == logits[j, k]
        removed += int(labels[i, k])
    assert 0 < removed < changed.sum()  # both ways: present AUs removed and absent ones added
    results = trainer._token_targets(np.arange(len(tokens)), trainer.aus, (swapped, logits),
                                     np.full(source.shape, -1), source)
    for i, k in zip(*np.nonzero(source[1:] >= 0)):
        assert results[i + 1].present[trainer.aus[k]] != bool(labels[i + 1, k])  # the answer changes with it


@pytest.mark.parametrize("altered", [{"boundary_mix": 0.5}, {"boundary_mix": 0.25, "chimera": 0.5},
                                     {"chimera": 0.5, "swap": 1.0},
                                     {"boundary_mix": 0.0, "chimera": 0.0, "weak_faces": 1.0}])
def test_training_on_altered_tokens_lowers_the_answer_loss(tiny_manifest, tmp_path, altered):
    trainer = Trainer(_config(tiny_manifest, tmp_path, formats=("binary",), lora_steps=0, **altered))
    trainer.run()
    assert trainer._bank is not None and trainer._bank[0].shape[0] == len(trainer.table)
    assert _mean(trainer.history, "projector", "last", "lm") < _mean(trainer.history, "projector", "first", "lm")
    with pytest.raises(ValueError, match="frozen"):
        Trainer(_config(tiny_manifest, tmp_path / "b", boundary_mix=0.5, encoder_lr_scale=0.2))


def test_format_weights_set_each_formats_share_of_the_llm_steps(tiny_manifest, tmp_path):
    trainer = Trainer(_config(tiny_manifest, tmp_path, formats=("list", "binary"), format_weights={"list": 30},
                              encoder_steps=2, projector_steps=20, lora_steps=0))
    trainer.run()
    asked = [h["format"] for h in trainer.history if h["stage"] == "projector"]
    assert asked.count("list") >= 15 and len(asked) == 20  # p(list) = 30/33; steps are seeded
    for bad in ({"lists": 2}, {"list": 0}, {"json": 2}):  # json: a format this run does not train
        with pytest.raises(ValueError, match="format_weights"):
            Trainer(_config(tiny_manifest, tmp_path / "bad", formats=("list", "binary"), format_weights=bad))


def test_a_finished_run_is_not_redone_and_another_recipe_is_not_continued(tiny_manifest, tmp_path):
    config = _config(tiny_manifest, tmp_path, encoder_steps=2, projector_steps=1, lora_steps=1)
    Trainer(config).run()
    lines = []
    again = Trainer(config, log=lines.append)
    assert again.run() == tmp_path / "checkpoint" and again.history == []  # nothing trained again
    assert any("already trained" in line for line in lines)
    subject = read_manifests(tiny_manifest)[0].subject
    other = _config(tiny_manifest, tmp_path, encoder_steps=2, projector_steps=1, lora_steps=1,
                    held_out_subjects=(subject,))
    with pytest.raises(ValueError, match="holds a run of another recipe \\(it differs in held_out_subjects\\)"):
        Trainer(other).run()  # its saved encoder learned from that subject
    Trainer(other).run(resume=False)  # --no-resume: trained anew there


def test_a_run_saved_before_a_setting_existed_is_the_same_recipe_at_its_default(tiny_manifest, tmp_path):
    config = _config(tiny_manifest, tmp_path, encoder_steps=2, projector_steps=1, lora_steps=1)
    Trainer(config).run()
    state = tmp_path / "state" / "trainer.json"
    saved = json.loads(state.read_text())
    for key in ("recipe", "finished"):
        del saved[key]["end_weight"]  # as written before the setting was added
    state.write_text(json.dumps(saved))
    again = Trainer(config)
    assert again.run() == tmp_path / "checkpoint" and again.history == []
    changed = _config(tiny_manifest, tmp_path, encoder_steps=2, projector_steps=1, lora_steps=1, end_weight=3.0)
    with pytest.raises(ValueError, match="it differs in end_weight"):
        Trainer(changed).run()


def test_end_weight_scales_the_decisions_where_an_answer_may_stop(tiny_manifest, tmp_path):
    from aullava import formats as fmt_lib

    trainer = Trainer(_config(tiny_manifest, tmp_path, end_weight=3.0, present_weight=2.0))
    model = trainer.model
    result = fmt_lib.AUResult.from_active(model.config.aus, (model.config.aus[0],))
    _, alternatives, present = model.answer_targets("list", result)
    weights = [trainer._decision_weight(p, alts) for p, alts in zip(present, alternatives)]
    ends = [i for i, alts in enumerate(alternatives) if alts is not None and model.eos_id in alts]
    assert ends and all(weights[i] == 3.0 * (2.0 if present[i] else 1.0) for i in ends)
    assert all(w == (2.0 if p else 1.0) for i, (w, p) in enumerate(zip(weights, present)) if i not in ends)
    _, alternatives, _ = model.answer_targets("binary", result)
    assert not any(alts is not None and model.eos_id in alts for alts in alternatives)  # binary never stops early


def test_evaluate_without_diagnostics_scores_the_answers_only(trained, tiny_manifest, tmp_path, capsys):
    from aullava.cli import main

    _, path = trained
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--manifest", str(tiny_manifest), "--checkpoint", str(path), "--formats", "binary",
                 "--out", str(out), "--no-diagnostics"]) == 0
    report = json.loads(out.read_text())
    assert "diagnostics" not in report and set(report["formats"]) == {"binary"}
    assert "encoder's own head" not in capsys.readouterr().out
