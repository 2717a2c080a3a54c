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
