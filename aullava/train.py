"""Training: instruction samples (each image x several formats) -> three stages.

0. encoder warm-up: the AU encoder alone with its per-AU presence loss (seconds to minutes);
1. projector: encoder + projector through the frozen LLM (answer cross-entropy + the per-AU loss);
2. LoRA: adds a LoRA adapter to the LLM, all three trained together.
Seeded and resumable: the state (weights, optimizer, stage, step) is saved every `save_every` steps.

Runs on `accelerate.Accelerator`: alone (`python -m aullava train`) or on several processes, GPUs or machines
(`accelerate launch -m aullava train`). Every process draws the same global batch from the step's seeded rng
and works on its own slice of it; each slice's loss is its share of the global batch's mean (summed terms over
the global count), and the trainable gradients are summed across processes, so the global batch, the loss and
the learning-rate schedule do not depend on the process count. The model is not wrapped in DDP: its trainable
part changes per stage (LoRA is added at stage 2, the encoder is frozen in the LLM stages), so the few
trainable gradients are reduced explicitly, one all-reduce per step.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import formats as fmt_lib
from .data.faces import face_batch, prepare_faces
from .distributed import use_cpu
from .data.manifest import default_intensities, label_warnings, presence_labels, read_manifests
from .llm import DEFAULT_MODEL_ID
from .model import AULlava, AULlavaConfig, save_pretrained

# How often each format is drawn for a training batch.
FORMAT_WEIGHTS = {"list": 4, "binary": 3, "intensity": 2, "continuous": 1, "json": 2, "sentence": 1}
STAGES = ("encoder", "projector", "lora")
BUDGET = ("encoder_steps", "projector_steps", "lora_steps")  # a resumed run may extend its stages


@dataclass
class TrainConfig:
    manifest: str | list  # one manifest CSV, or several (e.g. one per dataset)
    out: str
    images_root: str | None = None
    # CK+'s kinds, and "frame": every row of a video dataset's manifest (`python -m aullava manifest` writes it)
    kinds: tuple = ("peak", "neutral", "near_peak", "frame")
    held_out_subjects: tuple = ()
    formats: tuple = tuple(FORMAT_WEIGHTS)
    # Relative share of LLM-stage steps per format (unnamed formats keep FORMAT_WEIGHTS). A list answer holds
    # ~4 decisions, a binary one 19: at equal shares the list learns from far fewer decisions.
    format_weights: dict = field(default_factory=dict)
    # The embedded checkpoint's budget (~50 min on a 2-core CPU with bf16 units). At 150 LoRA steps the binary
    # answer had not learned its format. Every default below was measured on held-out CK+ subjects: the model
    # card (assets/aullava-ckplus/README.md) gives the figures, and those of the variants tried and left off.
    encoder_steps: int = 1500
    projector_steps: int = 100
    lora_steps: int = 400
    encoder_batch: int = 32
    batch_size: int = 8
    encoder_lr: float = 2e-3
    projector_lr: float = 1e-3
    lora_lr: float = 5e-4
    aux_weight: float = 1.0
    decisive_loss: bool = True  # answer loss on the tokens the plan-guided decoder chooses, not on forced text
    # Weight of the decisions that say an AU is there (list, binary, 0-5), with decisive_loss. Above 1 it
    # counters the written answers' leaning to "absent" on new faces (most AUs are absent in every answer).
    present_weight: float = 1.0
    # Weight of the decisions where an answer may stop (the end-of-answer token among the alternatives: list,
    # JSON, sentence), with decisive_loss. Wrong AUs written after a complete list cost the list most of its
    # distance to binary, and the end stays a soft choice even on the training faces.
    end_weight: float = 1.0
    # Share of (face, AU) decisions taught on an AU token moved toward the encoder head's decision boundary,
    # on its own side, its head logit drawn from [gap, reach]: on its training faces the head is near certain,
    # so without these the LLM never sees where the boundary lies and draws its own on new faces. Letting
    # mixes cross the boundary broke the answers; a gap of 1.0 left the weak readings of new faces unseen.
    boundary_mix: float = 0.25
    boundary_gap: float = 0.25
    boundary_reach: float = 4.0
    # Share of faces taught as a new person's weak face: every AU token moved toward the boundary (odds drawn
    # per face from U(0.5, 1)), where single mixes leave the face's other tokens firm. Within noise: off.
    weak_faces: float = 0.0
    # Share of faces made chimeric: each asked AU's token taken from another training face with that AU
    # labelled, so the answer must read each token rather than complete the posed-emotion set it has begun.
    # Needs the model config's `labelled_tokens` (without them the LLM did not learn to find the tokens).
    chimera: float = 0.5
    # Share of the real faces with ONE asked AU's token swapped for one of a face labelled the other way, the
    # answer changed with it, so that no emotion prototype completes itself. Within noise: off.
    swap: float = 0.0
    # Encoder learning rate during the LLM stages, relative to theirs. 0 freezes it: at 0.2 the LLM's gradient
    # pulled the encoder's held-out macro F1 from 0.76 to 0.71 in the first CK+ run.
    encoder_lr_scale: float = 0.0
    seed: int = 0
    save_every: int = 50
    base_llm: str = DEFAULT_MODEL_ID
    tiny_llm: bool = False  # a tiny random LLM, for tests
    model: dict = field(default_factory=dict)  # AULlavaConfig overrides (aus, encoder, lora)
    mixed_precision: str | None = None  # "no", "bf16", "fp16"; None: accelerate's launch flag or config
    grad_accum: int = 1  # micro-batches per process and step; the global batch stays `batch_size`
    cpu: bool = False  # stay on the CPU even where a GPU is available

    @property
    def alters_tokens(self) -> bool:
        """Whether the LLM stages teach on altered AU tokens (boundary mixes, weak faces, chimeras, swaps)."""
        return self.boundary_mix > 0 or self.weak_faces > 0 or self.chimera > 0 or self.swap > 0

    @property
    def encoder_frozen(self) -> bool:
        """Whether the encoder stays fixed during the LLM stages."""
        return self.encoder_lr_scale <= 0


def _torch_seed(seed: int, stage_index: int, step: int) -> int:
    # torch's draws (dropout) per step, like numpy's (batches, augmentation): a resumed run draws what the
    # uninterrupted one would have, and a stage's draws do not depend on how many numbers building the model
    # or the earlier stages took (a wider projector used to shift stage 0's dropout stream).
    return int(np.random.SeedSequence([seed, stage_index, step, 1]).generate_state(1, np.uint64)[0])


def _cosine(step: int, total: int) -> float:
    warmup = min(20, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def boundary_mix(tokens: torch.Tensor, logits: torch.Tensor, bank_tokens: torch.Tensor,
                 bank_logits: torch.Tensor, rate: float | np.ndarray, gap: float, reach: float,
                 rng: np.random.Generator, mixable=None) -> tuple[torch.Tensor, np.ndarray]:
    """Move a share `rate` (one for all, or one per face [B]) of the (face, AU) tokens [B,K,D] toward the head's
    decision boundary.

    Each chosen token is mixed with the same AU's token of a bank face whose head logit has the other sign,
    in the proportion that puts the head's logit (linear in the token) at a value drawn uniformly from
    [gap, reach] on the token's own side of 0 (the head's reading does not change), or as near as the two ends
    allow: a token already nearer the boundary than its aim stays as it is. Returns the tokens with the mixes
    and the bank face of each mix ([B,K], -1 where unmixed). `mixable` [B,K] bool: where mixes may go (default
    everywhere)."""
    own, bank = logits.detach().float().cpu().numpy(), bank_logits.detach().float().cpu().numpy()
    rate = np.asarray(rate, dtype=float)
    chosen = rng.random(own.shape) < (rate[:, None] if rate.ndim else rate)
    if mixable is not None:
        chosen &= np.asarray(mixable, dtype=bool)
    aim = rng.uniform(gap, reach, own.shape) * np.where(own > 0, 1.0, -1.0)
    mixed, partner = tokens.clone(), np.full(own.shape, -1)
    for i, k in zip(*np.nonzero(chosen)):
        pool = np.flatnonzero((bank[:, k] > 0) != (own[i, k] > 0))
        if not len(pool):
            continue
        j = int(pool[rng.integers(len(pool))])
        share = float(np.clip((aim[i, k] - bank[j, k]) / (own[i, k] - bank[j, k]), 0.0, 1.0))
        mixed[i, k] = share * tokens[i, k] + (1.0 - share) * bank_tokens[j, k].to(tokens.dtype)
        partner[i, k] = j
    return mixed, partner


def chimeras(tokens: torch.Tensor, logits: torch.Tensor, bank_tokens: torch.Tensor, bank_logits: torch.Tensor,
             bank_known, rate: float, rng: np.random.Generator, mixable=None):
    """Make a share `rate` of the faces [B,K,D] chimeric: each of their AU tokens (where `mixable` [B,K] allows)
    replaced by that AU's token of a bank face drawn among those with the AU labelled (`bank_known` [N,K]).
    Returns the tokens, their head logits and the bank face of each replaced token ([B,K], -1 where own)."""
    source = np.full(tokens.shape[:2], -1)
    if rate <= 0:  # no draw either: runs without chimeras keep their seeded mixes
        return tokens, logits, source
    known = np.asarray(bank_known, dtype=bool)
    chosen = (rng.random(tokens.shape[0]) < rate)[:, None] & np.ones(tokens.shape[:2], dtype=bool)
    if mixable is not None:
        chosen &= np.asarray(mixable, dtype=bool)
    tokens, logits = tokens.clone(), logits.clone()
    for i, k in zip(*np.nonzero(chosen)):
        _lend(tokens, logits, source, i, k, np.flatnonzero(known[:, k]), bank_tokens, bank_logits, rng)
    return tokens, logits, source


def _lend(tokens, logits, source, i, k, pool, bank_tokens, bank_logits, rng):
    """Give face i AU k's token and head logit of a bank face drawn from `pool` (none if it is empty)."""
    if not len(pool):
        return
    j = int(pool[rng.integers(len(pool))])
    tokens[i, k] = bank_tokens[j, k].to(tokens.dtype)
    logits[i, k] = bank_logits[j, k].to(logits.dtype)
    source[i, k] = j


def swaps(tokens: torch.Tensor, logits: torch.Tensor, bank_tokens: torch.Tensor, bank_logits: torch.Tensor,
          bank_labels, bank_known, own_labels, rate: float, rng: np.random.Generator, mixable=None, source=None):
    """Swap ONE AU token in a share `rate` of the faces [B,K,D] that are still their own (`source` [B,K] all -1,
    see `chimeras`): with even odds an AU the face has (`own_labels` [B,K] bool) or one it has not, among the
    `mixable` ones, replaced by that AU's token of a bank face labelled the other way (`bank_labels`,
    `bank_known` [N,K] bool). Returns the tokens, their head logits and the source of each token, as `chimeras`."""
    source = np.full(tokens.shape[:2], -1) if source is None else source.copy()
    if rate <= 0:  # no draw: runs without swaps keep their seeded mixes
        return tokens, logits, source
    labels, known = np.asarray(bank_labels, dtype=bool), np.asarray(bank_known, dtype=bool)
    own = np.asarray(own_labels, dtype=bool)
    allowed = np.ones(own.shape, dtype=bool) if mixable is None else np.asarray(mixable, dtype=bool)
    chosen = (rng.random(len(own)) < rate) & (source < 0).all(axis=1)
    remove = rng.random(len(own)) < 0.5
    tokens, logits = tokens.clone(), logits.clone()
    for i in np.flatnonzero(chosen):
        present, absent = np.flatnonzero(allowed[i] & own[i]), np.flatnonzero(allowed[i] & ~own[i])
        candidates = present if (remove[i] and len(present)) or not len(absent) else absent
        if not len(candidates):
            continue
        k = int(candidates[rng.integers(len(candidates))])
        _lend(tokens, logits, source, i, k, np.flatnonzero(known[:, k] & (labels[:, k] != own[i, k])),
              bank_tokens, bank_logits, rng)
    return tokens, logits, source


def _optimizer_state_to_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state_from_tensors(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _checked_format_shares(config: TrainConfig, processes: int) -> np.ndarray:
    """The probability of each of `config.formats` per LLM-stage step, once the settings that no run could
    honour are refused (before any data or model loads)."""
    unknown = sorted(set(config.format_weights) - set(config.formats))
    if unknown or any(not w > 0 for w in config.format_weights.values()):
        # a share for a format that is not trained would silently do nothing
        raise ValueError(f"format_weights takes positive shares of the trained formats {', '.join(config.formats)}; "
                         f"got {config.format_weights}")
    if config.grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, not {config.grad_accum}")
    for name in ("present_weight", "end_weight"):
        if not getattr(config, name) > 0:  # 0 would silence those decisions' loss altogether
            raise ValueError(f"{name} must be positive, not {getattr(config, name)}")
    if min(config.batch_size, config.encoder_batch) < processes:
        raise ValueError(f"the global batch ({config.batch_size}, encoder {config.encoder_batch}) is split across "
                         f"{processes} processes: it must hold at least one image per process")
    if config.alters_tokens and not config.encoder_frozen:
        raise ValueError("boundary_mix, weak_faces, chimera and swap change the frozen encoder's tokens: they need "
                         "encoder_lr_scale 0")
    shares = {**FORMAT_WEIGHTS, **config.format_weights}
    weights = np.array([shares.get(f, 1) for f in config.formats], dtype=float)
    return weights / weights.sum()


def _training_faces(config: TrainConfig):
    """The manifest's training rows without the held-out subjects, detected and landmarked (aullava.data.faces)."""
    samples = read_manifests(config.manifest, config.images_root, kinds=config.kinds)
    samples = _without_held_out(samples, config.held_out_subjects)
    missing = [s.path for s in samples if not s.path.is_file()]
    if len(missing) == len(samples):
        raise ValueError(f"none of the {len(samples)} training images of {config.manifest} exist (e.g. "
                         f"{missing[0]}): give the folder its paths are relative to with --images-root")
    table = prepare_faces(samples)
    if len(table) == 0:
        raise ValueError(f"no training face could be read from {config.manifest} (see the skipped lines above)")
    return table


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        from accelerate import Accelerator

        self.config = config
        self.accelerator = Accelerator(cpu=use_cpu(config.cpu), mixed_precision=config.mixed_precision)
        self.device = self.accelerator.device
        self.log = log if self.accelerator.is_main_process else (lambda *args, **kwargs: None)
        processes = self.accelerator.num_processes
        self.format_probabilities = _checked_format_shares(config, processes)  # of config.formats, per LLM step
        self.out = Path(config.out)
        torch.manual_seed(config.seed)
        model_config = AULlavaConfig(base_llm=config.base_llm, **config.model)
        # the data first: a broken manifest or missing images are reported before the LLM loads
        self.table = _training_faces(config)
        for warning in label_warnings(self.table.samples, model_config.aus):
            self.log(f"warning: {warning}")
        self.out.mkdir(parents=True, exist_ok=True)  # once the data is known good: a refused run leaves no folder
        self.model = self._build_model(model_config).to(self.device)
        self.aus = model_config.aus
        self._label_tables()
        self.log(f"{len(self.table)} training faces from {len({s.subject for s in self.table.samples})} subjects "
                 f"({int(self.table.fallback.sum())} by whole-crop fallback); {processes} process(es) on "
                 f"{self.device.type}, mixed precision {self.accelerator.mixed_precision}")
        self.history: list[dict] = []
        self._bank = None  # (AU tokens, logits) of every training face, for the altered tokens

    def _label_tables(self):
        """Labels, which of them are known, the asked-AU groups and the per-AU weights, over the training faces."""
        labels, known = presence_labels(self.table.samples, self.aus)
        self.labels, self.known = torch.from_numpy(labels).float(), torch.from_numpy(known).float()
        self.known_mask = known  # [faces, AUs] bool, as numpy for the per-step draws
        self.labels_mask = (labels > 0) & known
        # As the paper does for mixed datasets, each image is asked only about the AUs it has labels for (its
        # dataset's AU set minus unknown labels). A batch shares one prompt, so images are grouped by that set.
        groups: dict[tuple, list[int]] = {}
        for index, sample in enumerate(self.table.samples):
            asked = sample.asked(self.aus)
            if asked:
                groups.setdefault(asked, []).append(index)
        if not groups:
            raise ValueError("no training image has a label for any of the model's AUs; cannot teach answers")
        self.answer_groups = sorted(((asked, np.array(rows)) for asked, rows in groups.items()),
                                    key=lambda group: (-len(group[1]), group[0]))
        self.default_levels = default_intensities(self.table.samples, self.aus)
        positives = (self.labels * self.known).sum(0)
        self.pos_weight = ((len(self.labels) - positives) / positives.clamp(min=1)).sqrt().clamp(max=4.0).to(self.device)

    def _build_model(self, model_config) -> AULlava:
        from .llm import load_base_llm, tiny_llm

        if self.config.tiny_llm:
            # saved beside the run so its checkpoint names a base LLM that loads ("path" source)
            llm, tokenizer = tiny_llm(seed=self.config.seed)
            folder = self.out / "tiny-llm"
            if self.accelerator.is_main_process:
                llm.save_pretrained(str(folder))
                tokenizer.save_pretrained(str(folder))
            self.accelerator.wait_for_everyone()
            model_config.base_llm = str(folder.resolve())
        else:
            llm, tokenizer, source = load_base_llm(model_config.base_llm, fresh=True)
            self.log(f"base LLM {model_config.base_llm} from {source}")
        llm.requires_grad_(False)
        return AULlava(model_config, llm, tokenizer)

    def _add_lora(self):
        # Seeded: the adapter's initial weights are the same in every process, for any process count and on
        # resume, whatever random numbers the earlier stages drew.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed + 1)
            self.model.add_lora()

    # ----- targets -----------------------------------------------------------------------------------
    def _level(self, sample, au) -> float:
        """The intensity an answer gives `au` where `sample` has it: its coded level, else the AU's default."""
        return sample.intensities.get(au, self.default_levels[au])

    def result_for(self, sample, asked=None) -> fmt_lib.AUResult:
        asked = asked or self.aus
        active = [a for a in asked if a in sample.aus]
        levels = {a: self._level(sample, a) for a in active}
        return fmt_lib.AUResult.from_active(asked, active, levels)

    def _token_targets(self, indices, asked, encoded, partner, source) -> list[fmt_lib.AUResult]:
        """Answers for faces whose AU tokens were replaced (`source` [B,K], the training face each token comes
        from, -1 for the face's own) or mixed (`partner`, see `boundary_mix`). An AU is present where its
        token's face has it; a mixed one where the head reads the mix as present (its face's label, unless head
        and label disagree), at the level of whichever face has the AU."""
        with torch.no_grad():
            mixed_present = (self.model.encoder.read_logits(encoded[0]) > 0).cpu().numpy()
        results = []
        for row, i in enumerate(indices):
            present, levels = {}, {}
            for a in asked:
                k = self.aus.index(a)
                own = self.table.samples[source[row, k] if source[row, k] >= 0 else i]
                present[a] = a in own.aus
                levels[a] = self._level(own, a) if present[a] else 0.0
                j = partner[row, k]
                if j < 0:
                    continue
                if mixed_present[row, k] and not present[a]:
                    levels[a] = self._level(self.table.samples[j], a)
                elif not mixed_present[row, k]:
                    levels[a] = 0.0
                present[a] = bool(mixed_present[row, k])
            results.append(fmt_lib.AUResult(asked, present, levels))
        return results

    def _bank_of_faces(self):
        """The frozen encoder's AU tokens and logits of every training face (unaugmented), computed once."""
        if self._bank is None:
            tokens, logits = [], []
            with torch.no_grad(), self.accelerator.autocast():
                for part in np.array_split(np.arange(len(self.table)), max(1, len(self.table) // 64)):
                    chip, landmarks = face_batch(self.table, part, self.model.config.chip_size)
                    t, l = self.model.encoder(chip.to(self.device), landmarks.to(self.device))
                    tokens.append(t.float())
                    logits.append(l.float())
            self._bank = torch.cat(tokens), torch.cat(logits)
        return self._bank

    # ----- one step ----------------------------------------------------------------------------------
    def _aux_loss(self, logits, indices, reduction: str = "mean"):
        """Per-AU presence loss over the known labels: their mean, or their sum (`reduction="sum"`).

        Logits with a leading members axis (an encoder ensemble's, per member) give each member its own loss,
        averaged over members: the members stay independent learners rather than one model of their mean."""
        known = self.known[indices].to(logits.device)
        labels = self.labels[indices].to(logits.device)
        if logits.dim() == 3:
            labels, known = labels.expand_as(logits), known.expand_as(logits) / logits.shape[0]
        losses = F.binary_cross_entropy_with_logits(logits.float(), labels,
                                                    pos_weight=self.pos_weight.to(logits.device), reduction="none")
        total = (losses * known).sum()
        return total if reduction == "sum" else total / known.sum().clamp(min=1)

    def _micro_batches(self, batch_size: int) -> list[np.ndarray]:
        """This process's positions in the global batch (a contiguous slice), in `grad_accum` micro-batches."""
        mine = np.array_split(np.arange(batch_size), self.accelerator.num_processes)[self.accelerator.process_index]
        return [part for part in np.array_split(mine, self.config.grad_accum) if len(part)]

    def _accumulate(self, micro_loss, batch_size: int, counts: dict, weights: dict) -> dict:
        """Backward of this process's share of the global batch's loss, micro-batch by micro-batch.

        `micro_loss(positions)` returns each loss term summed over those positions of the global batch; `counts`
        holds what each term is averaged over in the whole global batch. Returns each term's global mean."""
        totals = torch.zeros(len(counts), device=self.device)
        for part in self._micro_batches(batch_size):
            terms = micro_loss(part)
            loss = sum(weights[name] * terms[name] / counts[name] for name in counts)
            self.accelerator.backward(loss)
            totals += torch.stack([terms[name].detach().float() for name in counts])
        totals = self.accelerator.reduce(totals, "sum")
        return {name: float(total) / float(counts[name]) for name, total in zip(counts, totals)}

    def _encoder_step(self, rng, batch_size):
        indices = rng.choice(len(self.table), size=batch_size, replace=True)
        chip, landmarks = face_batch(self.table, indices, self.model.config.chip_size, rng)

        def micro_loss(part):
            with self.accelerator.autocast():
                _, logits = self.model.encoder(chip[part].to(self.device), landmarks[part].to(self.device),
                                               per_member=True)
            return {"aux": self._aux_loss(logits, indices[part], reduction="sum")}

        means = self._accumulate(micro_loss, batch_size, {"aux": float(self.known[indices].sum().clamp(min=1))}, {"aux": 1.0})
        return means["aux"], means

    def _altered_answers(self, chip, landmarks, indices, asked, rng):
        """The faces' AU tokens as the LLM stages teach them (chimeras, swaps, weak faces, boundary mixes, each
        where its share asks) with the faces' own logits, and the answers those tokens call for."""
        with torch.no_grad(), self.accelerator.autocast():
            tokens, logits = self.model.encoder(chip.to(self.device), landmarks.to(self.device))
        asked_columns = np.isin(self.aus, asked)[None, :] & self.known_mask[indices]
        bank = self._bank_of_faces()
        mixed, mixed_logits, source = chimeras(tokens, logits, *bank, self.known_mask,
                                               self.config.chimera, rng, mixable=asked_columns)
        mixed, mixed_logits, source = swaps(mixed, mixed_logits, *bank, self.labels_mask, self.known_mask,
                                            self.labels_mask[indices], self.config.swap, rng,
                                            mixable=asked_columns, source=source)
        rate = self.config.boundary_mix
        if self.config.weak_faces > 0:  # no draw otherwise: runs without weak faces keep their seeded mixes
            weak = rng.random(len(indices)) < self.config.weak_faces
            rate = np.where(weak, rng.uniform(0.5, 1.0, len(indices)), rate)
        mixed, partner = boundary_mix(mixed, mixed_logits, *bank, rate, self.config.boundary_gap,
                                      self.config.boundary_reach, rng, mixable=asked_columns)
        encoded = (mixed, logits)  # the faces' own logits: the per-AU loss stays on their labels
        return encoded, self._token_targets(indices, asked, encoded, partner, source)

    def _answer_step(self, rng, batch_size):
        names = self.config.formats
        format_name = names[rng.choice(len(names), p=self.format_probabilities)]
        if len(self.answer_groups) == 1:
            asked, pool = self.answer_groups[0]
        else:  # a group (AU set) in proportion to its images
            sizes = np.array([len(rows) for _, rows in self.answer_groups], dtype=float)
            asked, pool = self.answer_groups[rng.choice(len(sizes), p=sizes / sizes.sum())]
        indices = pool[rng.choice(len(pool), size=batch_size, replace=True)]
        chip, landmarks = face_batch(self.table, indices, self.model.config.chip_size, rng)
        if self.config.alters_tokens:
            encoded, results = self._altered_answers(chip, landmarks, indices, asked, rng)
        else:
            encoded, results = None, [self.result_for(self.table.samples[i], asked) for i in indices]
        targets = [self.model.answer_targets(format_name, result) for result in results]
        answers = [ids for ids, _, _ in targets]
        # Only the decoder's choices carry a loss, each among its alternatives: forced text is fed at inference,
        # never predicted, and in the vector formats it outnumbers the decisions 4 to 1, diluting their gradient.
        choices = [alternatives for _, alternatives, _ in targets] if self.config.decisive_loss else None
        weights = ([[self._decision_weight(p, alternatives) for p, alternatives in zip(present, alts)]
                    for _, alts, present in targets] if choices is not None else None)  # the choices' losses only
        scored = (sum(c is not None for cs in choices for c in cs) if choices is not None
                  else sum(len(a) for a in answers))
        bf16_llm = self.model.llm_dtype == torch.bfloat16

        def micro_loss(part):
            with self.accelerator.autocast(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16_llm):
                lm_sum, logits = self.model.answer_loss(
                    chip[part].to(self.device), landmarks[part].to(self.device), format_name,
                    [answers[i] for i in part], choices=None if choices is None else [choices[i] for i in part],
                    reduction="sum", aus=asked, weights=None if weights is None else [weights[i] for i in part],
                    encoded=None if encoded is None else (encoded[0][part], encoded[1][part]))
            return {"lm": lm_sum, "aux": self._aux_loss(logits, indices[part], reduction="sum")}

        counts = {"lm": float(max(1, scored)), "aux": float(self.known[indices].sum().clamp(min=1))}
        means = self._accumulate(micro_loss, batch_size, counts, {"lm": 1.0, "aux": self.config.aux_weight})
        return means["lm"] + self.config.aux_weight * means["aux"], {**means, "format": format_name, "asked_aus": len(asked)}

    def _decision_weight(self, says_present: bool, alternatives) -> float:
        weight = self.config.present_weight if says_present else 1.0
        if alternatives is not None and self.model.eos_id in alternatives:
            weight *= self.config.end_weight
        return weight

    # ----- across processes --------------------------------------------------------------------------
    def _flat_reduce(self, tensors: list, reduction: str) -> list:
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        flat = self.accelerator.reduce(flat, reduction)
        return list(torch.split(flat, [t.numel() for t in tensors]))

    def _sync_gradients(self, params):
        """Sum the slices' gradients across processes (one all-reduce); a parameter without a gradient in one
        process counts as zero there, so every process reduces the same layout."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        for p, total in zip(params, self._flat_reduce(grads, "sum")):
            p.grad = total.view_as(p).to(p.dtype)

    def _sync_parameters(self, params):
        """Start every stage from the main process's weights (LoRA's initial weights, any drift)."""
        if self.accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast

        flat = broadcast(torch.cat([p.detach().reshape(-1).float() for p in params]), from_process=0)
        with torch.no_grad():
            for p, value in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.copy_(value.view_as(p))

    def _sync_buffers(self, module):
        """Batch-norm running statistics are updated from each process's slice: average them."""
        if self.accelerator.num_processes == 1:
            return
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            for b, mean in zip(buffers, self._flat_reduce(buffers, "mean")):
                b.copy_(mean.view_as(b))

    # ----- stages ------------------------------------------------------------------------------------
    def fit_landmark_logistic(self):
        """Fit the encoder's landmark regression (where its config has one) on the training faces, unaugmented."""
        regression = getattr(self.model.encoder, "landmark_logistic", None)
        if regression is None:
            return
        chip, landmarks = face_batch(self.table, range(len(self.table)), self.model.config.chip_size)
        regression.fit(landmarks, self.labels, self.known, chip)

    def _stage_setup(self, stage):
        c = self.config
        model = self.model
        if stage == "encoder":
            self.fit_landmark_logistic()
            params = [{"params": list(model.encoder.parameters()), "lr": c.encoder_lr}]
            return params, c.encoder_steps, c.encoder_batch, self._encoder_step
        if stage == "lora":
            self._add_lora()
        lr = c.projector_lr if stage == "projector" else c.lora_lr
        params = [{"params": list(model.projector.parameters()), "lr": lr}]
        if not c.encoder_frozen:
            params.append({"params": list(model.encoder.parameters()), "lr": lr * c.encoder_lr_scale})
        else:
            model.encoder.requires_grad_(False)
        if stage == "lora":
            params.append({"params": [p for n, p in model.llm.named_parameters() if "lora_" in n], "lr": lr})
        steps = c.projector_steps if stage == "projector" else c.lora_steps
        return params, steps, c.batch_size, self._answer_step

    def run(self, resume: bool = True) -> Path:
        state_dir = self.out / "state"
        start_stage, start_step = 0, 0
        resume_state = None
        if resume and (state_dir / "trainer.json").is_file():
            resume_state = json.loads((state_dir / "trainer.json").read_text())
            self._check_same_recipe(resume_state.get("recipe"))
            finished = resume_state.get("finished")
            if finished is not None and not recipe_changes(finished, self.recipe(), budget=True) \
                    and (self.out / "checkpoint").is_dir():
                self.log(f"already trained with this recipe: {self.out / 'checkpoint'} (--no-resume trains it again)")
                return self.out / "checkpoint"
            start_stage, start_step = STAGES.index(resume_state["stage"]), resume_state["step"]
            self.history = resume_state.get("history", [])
            self.log(f"resuming at stage {resume_state['stage']} step {start_step}")
        main = self.accelerator.is_main_process
        for stage_index, stage in enumerate(STAGES):
            if stage_index < start_stage:
                if stage == "lora":
                    self._add_lora()
                continue
            params, steps, batch_size, step_fn = self._stage_setup(stage)
            trainable = [p for group in params for p in group["params"]]
            for p in trainable:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, weight_decay=0.01)
            base_lrs = [g["lr"] for g in optimizer.param_groups]  # before a resumed state brings its scheduled lr
            first = 0
            if resume_state is not None and stage_index == start_stage:
                self._load_state(state_dir, optimizer)
                first = start_step
            self._sync_parameters(trainable)
            optimizer = self.accelerator.prepare(optimizer)
            self.model.train()
            self.model.llm.eval()  # dropout off in the frozen LLM; LoRA dropout still applies in train mode
            if stage != "encoder" and self.config.encoder_frozen:
                self.model.encoder.eval()  # frozen: batch-norm statistics stay those it was trained with
            if stage == "lora":
                for module in self.model.llm.modules():
                    if "lora_dropout" in type(module).__name__.lower():
                        module.train()
            encoder_learns = stage == "encoder" or not self.config.encoder_frozen
            bar = tqdm(range(first, steps), desc=stage, unit="step", initial=first, total=steps, disable=not main)
            for step in bar:
                rng = np.random.default_rng([self.config.seed, stage_index, step])
                torch.manual_seed(_torch_seed(self.config.seed, stage_index, step))
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * _cosine(step, steps)
                optimizer.zero_grad(set_to_none=True)
                loss, info = step_fn(rng, batch_size)
                self._sync_gradients(trainable)
                self.accelerator.unscale_gradients(optimizer=optimizer)  # fp16 only; a no-op otherwise
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                if encoder_learns:
                    self._sync_buffers(self.model.encoder)
                self.history.append({"stage": stage, "step": step, "loss": loss, **info})
                bar.set_postfix(loss=f"{loss:.3f}")
                if (step + 1) % self.config.save_every == 0 and step + 1 < steps:
                    self._save_state(state_dir, stage, step + 1, optimizer)
            if stage_index + 1 < len(STAGES):
                self._save_state(state_dir, STAGES[stage_index + 1], 0, None)
        self.model.eval()
        self.model.invalidate_prefix_cache()
        self.model.config.training = self.provenance()
        path = self.out / "checkpoint"
        if main:
            save_pretrained(self.model, path)
            (self.out / "history.json").write_text(json.dumps(self.history))
            state = state_dir / "trainer.json"
            if state.is_file():  # the last saved state stays: a larger budget given later continues from it
                state.write_text(json.dumps({**json.loads(state.read_text()), "finished": self.recipe()}))
        self.accelerator.wait_for_everyone()
        return path

    def recipe(self) -> dict:
        return run_recipe(self.config)

    def _check_same_recipe(self, saved: dict | None):
        """Refuse to continue a run of another recipe: its weights would be kept and the new settings recorded,
        e.g. a held-out subject the saved encoder has already learned from. (States written before recipes
        were recorded are continued as they were.)"""
        if saved is None:
            return
        changed = recipe_changes(saved, self.recipe())
        if changed:
            raise ValueError(f"{self.out} holds a run of another recipe (it differs in {', '.join(changed)}): give "
                             "another --out, or --no-resume to train this one from the start there")

    def provenance(self) -> dict:
        c = asdict(self.config)
        counts = {str(a): int(n) for a, n in zip(self.aus, self.labels.sum(0).tolist())}
        return {"train_config": c, "faces": len(self.table), "subjects": sorted({s.subject for s in self.table.samples}),
                "positives": counts, "default_intensity": {str(a): v for a, v in self.default_levels.items()},
                "images_with_coded_intensity": sum(bool(s.intensities) for s in self.table.samples),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _save_state(self, state_dir: Path, stage: str, step: int, optimizer):
        """Written by the main process (every process holds the same weights); the others wait for it."""
        if self.accelerator.is_main_process:
            self._write_state(state_dir, stage, step, optimizer)
        self.accelerator.wait_for_everyone()

    def _write_state(self, state_dir: Path, stage: str, step: int, optimizer):
        state_dir.mkdir(parents=True, exist_ok=True)
        save_pretrained(self.model, state_dir / "model")
        meta = {}
        if optimizer is not None:
            tensors, meta = _optimizer_state_to_tensors(optimizer)
            save_file(tensors, str(state_dir / "optimizer.safetensors"))
        elif (state_dir / "optimizer.safetensors").exists():
            (state_dir / "optimizer.safetensors").unlink()
        (state_dir / "trainer.json").write_text(json.dumps({"stage": stage, "step": step, "optimizer": meta,
                                                            "history": self.history, "recipe": self.recipe()}))

    def _load_state(self, state_dir: Path, optimizer):
        from .model import WEIGHTS_NAME, ADAPTER_DIR, _sub_state

        weights = load_file(str(state_dir / "model" / WEIGHTS_NAME), device=str(self.device))
        self.model.encoder.load_state_dict(_sub_state(weights, "encoder"))
        self.model.projector.load_state_dict(_sub_state(weights, "projector"))
        adapter = state_dir / "model" / ADAPTER_DIR / "adapter_model.safetensors"
        if adapter.is_file():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model.llm, load_file(str(adapter), device=str(self.device)))
        meta = json.loads((state_dir / "trainer.json").read_text())["optimizer"]
        if meta and (state_dir / "optimizer.safetensors").is_file():
            optimizer.load_state_dict(_optimizer_state_from_tensors(load_file(str(state_dir / "optimizer.safetensors")), meta))


def run_recipe(config: TrainConfig) -> dict:
    """Every setting but where the run is written: a finished run given the same recipe is not redone."""
    recipe = {k: v for k, v in asdict(config).items() if k not in ("out", "save_every")}
    manifests = [config.manifest] if isinstance(config.manifest, str) else config.manifest
    recipe["manifest"] = [str(Path(m).resolve()) for m in manifests]
    return json.loads(json.dumps(recipe))  # tuples as lists, as read back from trainer.json


def recipe_changes(saved: dict, now: dict, budget: bool = False) -> list[str]:
    """The settings in which two recipes differ (the stages' budgets only with `budget`). A setting added to
    TrainConfig after a run was saved is no change while it keeps its default."""
    def default(name):
        f = TrainConfig.__dataclass_fields__.get(name)
        return None if f is None or f.default is MISSING else json.loads(json.dumps(f.default))

    saved = {**{k: now[k] for k in set(now) - set(saved) if now[k] == default(k)}, **saved}
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and (budget or k not in BUDGET))


def finished_recipe(out) -> dict | None:
    """The recipe of the finished run in `out`, if there is one."""
    state = Path(out) / "state" / "trainer.json"
    return json.loads(state.read_text()).get("finished") if state.is_file() else None


def _without_held_out(samples: list, held_out) -> list:
    """The samples of subjects not held out; a held-out name the manifest does not have is refused, since a
    typo would leave that subject in training without a word."""
    if not held_out:
        return samples
    subjects = {s.subject for s in samples}
    unknown = sorted(set(held_out) - subjects)
    if unknown:
        raise ValueError(f"held-out subject(s) {', '.join(unknown)} are not in the manifest's rows (subjects "
                         f"there: {', '.join(sorted(subjects)[:8])}{', ...' if len(subjects) > 8 else ''})")
    kept = [s for s in samples if s.subject not in set(held_out)]
    if not kept:
        raise ValueError(f"every subject of the manifest is held out ({len(subjects)}): nothing is left to train on")
    return kept


def train_config(path=None, **overrides) -> TrainConfig:
    """A TrainConfig from a JSON file of its fields (optional), then `overrides` that are not None."""
    from dataclasses import fields

    names = {f.name for f in fields(TrainConfig)}
    values = {}
    if path:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"training config {path} is unreadable: {error}") from error
        values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_comment" keys are notes
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"training config {path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("manifest", "out") if not values.get(k)]
    if missing:
        raise ValueError(f"training needs {' and '.join('--' + k for k in missing)} (on the command line or in --config)")
    for key in ("kinds", "held_out_subjects", "formats"):
        if key in values:
            values[key] = tuple(values[key])
    model = values.get("model", {})
    if "base_llm" in model:
        raise ValueError("put base_llm at the top level of the training config, not under \"model\"")
    unknown_model = sorted(set(model) - set(AULlavaConfig.__dataclass_fields__))
    if unknown_model:
        raise ValueError(f"training config: unknown model field(s) {', '.join(unknown_model)}")
    return TrainConfig(**values)
