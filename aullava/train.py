"""Training: instruction samples (each image x several formats) -> three stages.

0. encoder warm-up: the AU encoder alone with its per-AU presence loss (seconds to minutes);
1. projector: encoder + projector through the frozen LLM (answer cross-entropy + the per-AU loss);
2. LoRA: adds a LoRA adapter to the LLM, all three trained together.
Seeded and resumable: the state (weights, optimizer, stage, step) is saved every `save_every` steps.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import formats as fmt_lib
from .data.faces import face_batch, prepare_faces
from .data.manifest import default_intensities, read_manifest
from .model import AULlava, AULlavaConfig, save_pretrained

# How often each format is drawn for a training batch.
FORMAT_WEIGHTS = {"list": 4, "binary": 3, "intensity": 2, "continuous": 1, "json": 2, "sentence": 1}
STAGES = ("encoder", "projector", "lora")


@dataclass
class TrainConfig:
    manifest: str
    out: str
    images_root: str | None = None
    kinds: tuple = ("peak", "neutral", "near_peak")
    held_out_subjects: tuple = ()
    formats: tuple = tuple(FORMAT_WEIGHTS)
    encoder_steps: int = 1200
    projector_steps: int = 60
    lora_steps: int = 150
    encoder_batch: int = 32
    batch_size: int = 8
    encoder_lr: float = 2e-3
    projector_lr: float = 1e-3
    lora_lr: float = 5e-4
    aux_weight: float = 1.0
    decisive_loss: bool = True  # answer loss on the tokens the plan-guided decoder chooses, not on forced text
    # Encoder learning rate during the LLM stages, relative to theirs. 0 freezes it: at 0.2 the LLM's gradient
    # pulled the encoder's held-out macro F1 from 0.76 to 0.71 in the first CK+ run.
    encoder_lr_scale: float = 0.0
    seed: int = 0
    save_every: int = 50
    base_llm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    tiny_llm: bool = False  # a tiny random LLM, for tests
    model: dict = field(default_factory=dict)  # AULlavaConfig overrides (aus, encoder, lora)

    @property
    def encoder_frozen(self) -> bool:
        """Whether the encoder stays fixed during the LLM stages."""
        return self.encoder_lr_scale <= 0


def _cosine(step: int, total: int) -> float:
    warmup = min(20, max(1, total // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _labels(table, aus) -> torch.Tensor:
    return torch.tensor([[float(a in s.aus) for a in aus] for s in table.samples])


def _optimizer_state_to_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors, {"param_groups": state["param_groups"]}


def _optimizer_state_from_tensors(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class Trainer:
    def __init__(self, config: TrainConfig, log=print):
        self.config = config
        self.log = log
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        model_config = AULlavaConfig(base_llm=config.base_llm, **config.model)
        # the data first: a broken manifest or missing images are reported before the LLM loads
        samples = read_manifest(config.manifest, config.images_root, kinds=config.kinds)
        if config.held_out_subjects:
            samples = [s for s in samples if s.subject not in set(config.held_out_subjects)]
        self.table = prepare_faces(samples)
        if len(self.table) == 0:
            raise ValueError(f"no training face could be read from {config.manifest} (see the skipped lines above)")
        self.model = self._build_model(model_config)
        self.aus = model_config.aus
        self.labels = _labels(self.table, self.aus)
        self.known = torch.tensor([[float(a not in s.unknown) for a in self.aus] for s in self.table.samples])
        # Answers state every asked AU, so they are taught only from images whose asked AUs are all known.
        self.answerable = np.flatnonzero(self.known.min(1).values.numpy() > 0)
        if len(self.answerable) == 0:
            raise ValueError("no training image has all of the model's AUs labelled; cannot teach answers")
        self.default_levels = default_intensities(self.table.samples, self.aus)
        positives = (self.labels * self.known).sum(0)
        self.pos_weight = ((len(self.labels) - positives) / positives.clamp(min=1)).sqrt().clamp(max=4.0)
        self.log(f"{len(self.table)} training faces from {len({s.subject for s in self.table.samples})} subjects "
                 f"({int(self.table.fallback.sum())} by whole-crop fallback)")
        self.history: list[dict] = []

    def _build_model(self, model_config) -> AULlava:
        from .llm import load_base_llm, tiny_llm

        if self.config.tiny_llm:
            # saved beside the run so its checkpoint names a base LLM that loads ("path" source)
            llm, tokenizer = tiny_llm(seed=self.config.seed)
            folder = self.out / "tiny-llm"
            llm.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))
            model_config.base_llm = str(folder.resolve())
        else:
            llm, tokenizer, source = load_base_llm(model_config.base_llm, fresh=True)
            self.log(f"base LLM {model_config.base_llm} from {source}")
        llm.requires_grad_(False)
        return AULlava(model_config, llm, tokenizer)

    # ----- targets -----------------------------------------------------------------------------------
    def result_for(self, sample) -> fmt_lib.AUResult:
        active = [a for a in self.aus if a in sample.aus]
        levels = {a: sample.intensities.get(a, self.default_levels[a]) for a in active}
        return fmt_lib.AUResult.from_active(self.aus, active, levels)

    # ----- one step ----------------------------------------------------------------------------------
    def _aux_loss(self, logits, indices):
        known = self.known[indices]
        losses = F.binary_cross_entropy_with_logits(logits.float(), self.labels[indices], pos_weight=self.pos_weight,
                                                    reduction="none")
        return (losses * known).sum() / known.sum().clamp(min=1)

    def _encoder_step(self, rng, batch_size):
        indices = rng.choice(len(self.table), size=batch_size, replace=True)
        chip, landmarks = face_batch(self.table, indices, self.model.config.chip_size, rng)
        _, logits = self.model.encoder(chip, landmarks)
        loss = self._aux_loss(logits, indices)
        return loss, {"aux": loss.item()}

    def _answer_step(self, rng, batch_size):
        names = [f for f in self.config.formats]
        weights = np.array([FORMAT_WEIGHTS.get(f, 1) for f in names], dtype=float)
        format_name = names[rng.choice(len(names), p=weights / weights.sum())]
        indices = self.answerable[rng.choice(len(self.answerable), size=batch_size, replace=True)]
        chip, landmarks = face_batch(self.table, indices, self.model.config.chip_size, rng)
        targets = [self.model.answer_targets(format_name, self.result_for(self.table.samples[i])) for i in indices]
        answers = [ids for ids, _ in targets]
        # Only the decoder's choices carry a loss, each among its alternatives: forced text is fed at inference,
        # never predicted, and in the vector formats it outnumbers the decisions 4 to 1, diluting their gradient.
        choices = [alternatives for _, alternatives in targets] if self.config.decisive_loss else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.model.llm_dtype == torch.bfloat16):
            lm_loss, logits = self.model.answer_loss(chip, landmarks, format_name, answers, choices=choices)
        aux = self._aux_loss(logits, indices)
        return lm_loss + self.config.aux_weight * aux, {"lm": lm_loss.item(), "aux": aux.item(), "format": format_name}

    # ----- stages ------------------------------------------------------------------------------------
    def _stage_setup(self, stage):
        c = self.config
        model = self.model
        if stage == "encoder":
            params = [{"params": list(model.encoder.parameters()), "lr": c.encoder_lr}]
            return params, c.encoder_steps, c.encoder_batch, self._encoder_step
        if stage == "lora":
            model.add_lora()
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
            start_stage, start_step = STAGES.index(resume_state["stage"]), resume_state["step"]
            self.history = resume_state.get("history", [])
            self.log(f"resuming at stage {resume_state['stage']} step {start_step}")
        for stage_index, stage in enumerate(STAGES):
            if stage_index < start_stage:
                if stage == "lora":
                    self.model.add_lora()
                continue
            params, steps, batch_size, step_fn = self._stage_setup(stage)
            trainable = [p for group in params for p in group["params"]]
            for p in trainable:
                p.requires_grad_(True)
            optimizer = torch.optim.AdamW(params, weight_decay=0.01)
            first = 0
            if resume_state is not None and stage_index == start_stage:
                self._load_state(state_dir, optimizer)
                first = start_step
            base_lrs = [g["lr"] for g in optimizer.param_groups]
            self.model.train()
            self.model.llm.eval()  # dropout off in the frozen LLM; LoRA dropout still applies in train mode
            if stage != "encoder" and self.config.encoder_frozen:
                self.model.encoder.eval()  # frozen: batch-norm statistics stay those it was trained with
            if stage == "lora":
                for module in self.model.llm.modules():
                    if "lora_dropout" in type(module).__name__.lower():
                        module.train()
            bar = tqdm(range(first, steps), desc=stage, unit="step", initial=first, total=steps)
            for step in bar:
                rng = np.random.default_rng([self.config.seed, stage_index, step])
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * _cosine(step, steps)
                loss, info = step_fn(rng, batch_size)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                self.history.append({"stage": stage, "step": step, "loss": loss.item(), **info})
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if (step + 1) % self.config.save_every == 0 and step + 1 < steps:
                    self._save_state(state_dir, stage, step + 1, optimizer)
            if stage_index + 1 < len(STAGES):
                self._save_state(state_dir, STAGES[stage_index + 1], 0, None)
        self.model.eval()
        self.model.invalidate_prefix_cache()
        self.model.config.training = self.provenance()
        path = save_pretrained(self.model, self.out / "checkpoint")
        (self.out / "history.json").write_text(json.dumps(self.history))
        return path

    def provenance(self) -> dict:
        c = asdict(self.config)
        counts = {str(a): int(n) for a, n in zip(self.aus, self.labels.sum(0).tolist())}
        return {"train_config": c, "faces": len(self.table), "subjects": sorted({s.subject for s in self.table.samples}),
                "positives": counts, "default_intensity": {str(a): v for a, v in self.default_levels.items()},
                "images_with_coded_intensity": sum(bool(s.intensities) for s in self.table.samples),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _save_state(self, state_dir: Path, stage: str, step: int, optimizer):
        state_dir.mkdir(parents=True, exist_ok=True)
        save_pretrained(self.model, state_dir / "model")
        meta = {}
        if optimizer is not None:
            tensors, meta = _optimizer_state_to_tensors(optimizer)
            save_file(tensors, str(state_dir / "optimizer.safetensors"))
        elif (state_dir / "optimizer.safetensors").exists():
            (state_dir / "optimizer.safetensors").unlink()
        (state_dir / "trainer.json").write_text(json.dumps({"stage": stage, "step": step, "optimizer": meta,
                                                            "history": self.history}))

    def _load_state(self, state_dir: Path, optimizer):
        from .model import WEIGHTS_NAME, ADAPTER_DIR, _sub_state

        weights = load_file(str(state_dir / "model" / WEIGHTS_NAME))
        self.model.encoder.load_state_dict(_sub_state(weights, "encoder"))
        self.model.projector.load_state_dict(_sub_state(weights, "projector"))
        adapter = state_dir / "model" / ADAPTER_DIR / "adapter_model.safetensors"
        if adapter.is_file():
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model.llm, load_file(str(adapter)))
        meta = json.loads((state_dir / "trainer.json").read_text())["optimizer"]
        if meta and (state_dir / "optimizer.safetensors").is_file():
            optimizer.load_state_dict(_optimizer_state_from_tensors(load_file(str(state_dir / "optimizer.safetensors")), meta))
