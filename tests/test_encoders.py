"""The encoder's CNNs: the FER2013 mini-Xception that `cnn: "mini_xception"` starts from, and the option itself."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from aullava.encoders import FER2013_CLASSES, MINI_XCEPTION_FER2013, MiniXception, build_encoder, face_tensors
from conftest import SMOKE

AUS = (1, 2, 4, 6, 12, 25)


@pytest.mark.skipif(not SMOKE.is_dir(), reason="needs ../shared/data/smoke")
@pytest.mark.parametrize("photo, emotion", [("0-f15-hao-ph.jpg", "happy"), ("0-f1-su-ph.jpg", "surprise")])
def test_shipped_mini_xception_weights_still_read_fer2013_expressions(photo, emotion):
    # the converted trunk + the classifier kept beside it in the file: a wrong kernel layout or padding in the
    # conversion would not name a posed smile and a posed surprise on aligned chips
    from aullava.face import FaceDetector

    face = FaceDetector(chip_size=64).detect(str(SMOKE / photo))[0]
    chip, _ = face_tensors(face.chip, face.chip_landmarks)
    state = load_file(str(MINI_XCEPTION_FER2013))
    with torch.no_grad():
        last = MiniXception().load_fer2013().eval()(chip.unsqueeze(0))[-1]
        logits = F.conv2d(last, state["emotion.weight"], state["emotion.bias"], padding=1).mean((2, 3))
    assert FER2013_CLASSES[int(logits.argmax())] == emotion


def test_mini_xception_members_start_from_fer2013_sample_three_scales_and_learn():
    config = {"type": "landmark_patch", "dim": 16, "chip_size": 64, "head_layers": 1, "members": 2,
              "cnn": "mini_xception"}
    encoder = build_encoder(config, len(AUS))
    shipped = load_file(str(MINI_XCEPTION_FER2013))
    for member in encoder.members:
        trunk = member.backbone.cnn.state_dict()
        assert all(torch.equal(trunk[name], shipped[name]) for name in trunk)
    assert [m.shape[1:] for m in encoder.members[0].backbone.cnn(torch.zeros(1, 1, 64, 64))] == [
        (32, 15, 15), (64, 8, 8), (128, 4, 4)]
    chip, landmarks = torch.randn(3, 1, 64, 64) * 0.25, torch.rand(3, 68, 2) * 1.6 - 0.8
    tokens, logits = encoder(chip, landmarks)
    assert tokens.shape == (3, len(AUS), 32) and logits.shape == (3, len(AUS))
    logits.sum().backward()
    assert encoder.members[0].backbone.cnn.stem[0].weight.grad.abs().sum() > 0  # fine-tuned, not frozen


def test_an_unknown_cnn_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown encoder cnn 'resnet'"):
        build_encoder({"type": "landmark_patch", "dim": 16, "cnn": "resnet"}, len(AUS))


def test_cell_hog_bins_edges_by_orientation_and_ignores_contrast():
    from aullava.encoders import HOG_BINS, cell_hog

    ramp = torch.arange(64, dtype=torch.float32).repeat(64, 1)  # brightness grows left to right: a 0-degree gradient
    features = cell_hog(torch.stack([ramp, ramp.T]).unsqueeze(1))
    assert features.shape == (2, 8 * 8 * HOG_BINS)
    cells = features.view(2, 64, HOG_BINS)
    assert torch.allclose(cells[0, :, 0], torch.ones(64, dtype=cells.dtype))  # all in the first bin
    assert torch.allclose(cells[1, :, 4], cells[1, :, 5]) and cells[1, :, 4].min() > 0.7  # 90 degrees: bins 4.5
    chip = torch.randn(3, 1, 64, 64)
    assert torch.allclose(cell_hog(chip), cell_hog(chip * 3 + 1), atol=1e-6)


def test_a_landmark_regression_with_gradient_histograms_reads_the_chip_and_needs_it():
    config = {"type": "landmark_patch", "dim": 16, "chip_size": 64, "channels": 8, "head_layers": 1, "members": 1,
              "landmark_logistic": 0.5, "logistic_hog": True}
    encoder = build_encoder(config, len(AUS)).eval()
    regression = encoder.landmark_logistic
    assert regression.weight.shape == (len(AUS), 136 + 576)
    g = torch.Generator().manual_seed(0)
    chip, landmarks = torch.randn(300, 1, 64, 64, generator=g), torch.rand(300, 68, 2, generator=g) * 1.6 - 0.8
    chip[::2, :, 20:44] += torch.linspace(0, 4, 64)  # every other face with a horizontal ramp across the middle
    labels = torch.zeros(300, len(AUS))
    labels[::2, 0] = 1  # AU1 present exactly where the ramp is: only the histograms can tell
    regression.fit(landmarks[:200], labels[:200], torch.ones_like(labels[:200]), chip[:200])
    new_faces = regression(landmarks[200:], chip[200:])[:, 0] > 0  # the landmarks alone: chance on new faces
    assert (new_faces == (labels[200:, 0] > 0)).float().mean() > 0.95
    with pytest.raises(ValueError, match="chip"):
        regression(landmarks)
    with torch.no_grad():
        tokens, logits = encoder(chip[:3], landmarks[:3])
    assert torch.allclose(tokens[..., -1], regression(landmarks[:3], chip[:3]).float())
