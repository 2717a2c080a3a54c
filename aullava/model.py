"""AU-LLaVA: aligned face -> AU encoder -> linear projector -> causal LLM (LoRA) that writes the AUs.

The prompt is ChatML: system, then the user turn (the format's instruction, then the image), then the
assistant's answer. The image sits at the END of the user turn, so everything before it is a fixed prefix
per format whose key/value cache is computed once and reused for every image (`_prefix_cache`).

Answers are decoded along the format's plan (formats.py): text the format fixes is fed as-is, and at each
choice the LLM picks the allowed option it gives the highest probability (the product of the option's tokens'
probabilities, each among the option trie's branches there: the quantity training raises). The model therefore
always writes a parseable answer of bounded length, and every decision in it is the LLM's.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from . import formats as fmt_lib
from .encoders import build_encoder
from .facs import MODEL_AUS, UNCODED_INTENSITY
from .llm import DEFAULT_MODEL_ID, on_torch_thread, submit_to_torch_thread

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = ("You are AU-LLaVA, a facial action coding assistant. You look at a face and report its FACS "
                 "Action Units exactly in the requested format.")
CONFIG_NAME = "aullava_config.json"
WEIGHTS_NAME = "aullava.safetensors"
ADAPTER_DIR = "adapter"
# Features of the head's logit z appended to each AU token when the config asks for `evidence`: a saturated
# presence reading and the logit's size (the strength of the evidence).
EVIDENCE_FEATURES = {"presence": lambda z: torch.tanh(z / 2), "strength": lambda z: z / 8}


@dataclass
class AULlavaConfig:
    aus: tuple[int, ...] = MODEL_AUS
    base_llm: str = DEFAULT_MODEL_ID
    # three members: on fold 0 the ensemble's head scored 0.826 where its members alone scored 0.756-0.812
    # (five: no better; fold 1, the mean over sub-ensembles of 1-5 members 0.747 / 0.761 / 0.768 / 0.768 / 0.769).
    # A landmark logistic regression beside them (its logit added at half weight; an L2-penalised linear model
    # of the geometry errs where the CNNs do not): head 0.826 -> 0.845 on fold 0; folds 1-3 0.769 -> 0.783,
    # 0.860 -> 0.867, 0.829 -> 0.858 (folds 2-3 run after the weight was chosen on folds 0-1).
    encoder: dict = field(default_factory=lambda: {"type": "landmark_patch", "dim": 128, "chip_size": 64,
                                                   "channels": 32, "head_layers": 2, "members": 3,
                                                   "landmark_logistic": 0.5})
    lora: dict | None = field(default_factory=lambda: {
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    system_prompt: str = SYSTEM_PROMPT
    # Append the encoder head's reading of each AU token (its logit) to the token's features before the
    # projector, so that AU k's evidence sits in token k along one direction shared by all AUs. Without it the
    # head's reading is a different direction per AU inside tokens that each carry the whole face (the head's
    # queries attend to one another). Alone it did not make the LLM read each token (fold 0, chimeric read-out
    # 0.087); with labelled tokens it was measured and shipped.
    evidence: bool = True
    # Put each AU's image token right after its code in the prompt ("AU01:<token> AU02:<token> ..."), the code
    # the answers write before that AU's decision, so the LLM can find an AU's token by its code (as it finds a
    # repeated phrase) instead of by its place among the image tokens. Fold 0 (with evidence and chimeras 0.25):
    # the read-out on chimeric faces 0.145 -> 0.761 (the head: 0.762), binary 0.816 -> 0.826, the four
    # structured formats agreeing on >= 98% of (image, AU) pairs per pair; the image block grows from 19 to
    # ~95 tokens (list answer of the bench photo 0.28 s).
    labelled_tokens: bool = True
    # Text after the image block in the user turn (empty: the image ends it). Without it the last AU's labelled
    # token ("AU27:<token>") stands right before the answer.
    image_suffix: str = ""
    training: dict = field(default_factory=dict)  # provenance written by train.py

    @property
    def chip_size(self) -> int:
        return int(self.encoder.get("chip_size", 64))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "AULlavaConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["aus"] = tuple(int(a) for a in known.get("aus", MODEL_AUS))
        for written_later in ("evidence", "labelled_tokens"):  # a config older than the field: without it
            known.setdefault(written_later, False)
        return cls(**known)


@dataclass
class Decision:
    """One choice the LLM made while writing an answer."""
    options: tuple
    chosen: object
    probability: float  # of the chosen option, among the options only


@dataclass
class Generation:
    text: str
    decisions: list


class _OptionTrie:
    """Token trie over a choice's options: where they share tokens and where they branch."""

    def __init__(self, encoded: dict):
        self.root: dict = {}
        for option, ids in encoded.items():
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            node[None] = option  # leaf marker


def _leaves(node: dict, path: tuple = ()):
    """(option, token path from `node`) for every option below a trie node."""
    for token, child in node.items():
        if token is None:
            yield child, path
        else:
            yield from _leaves(child, path + (token,))


def _descend(node: dict, path) -> dict:
    for token in path:
        node = node[token]
    return node


def _branches(node: dict, path) -> int:
    """How many tokens can follow `path` below `node`."""
    return sum(t is not None for t in _descend(node, path))


class AULlava(nn.Module):
    def __init__(self, config: AULlavaConfig, causal_lm, tokenizer, encoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = encoder if encoder is not None else build_encoder(config.encoder, len(config.aus))
        self.llm = causal_lm  # a transformers causal LM, or a peft PeftModel around one
        extra = len(EVIDENCE_FEATURES) if config.evidence else 0
        self.projector = nn.Linear(self.encoder.hidden_size + extra, self._causal_lm().config.hidden_size)
        self._prefix_cache: dict[str, tuple] = {}
        self._option_tries: dict[tuple, _OptionTrie] = {}
        self._token_labels: list[list[int]] | None = None  # the AU codes' token ids, see image_sequence
        self._switchable: list[tuple] = []  # (parameter, pre-trained tensor, merged tensor), see merge_lora
        self._lock = threading.RLock()
        self.serve_on_torch_thread = False  # see on_model_thread
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.eos_id is None or self.eos_id == tokenizer.unk_token_id:
            self.eos_id = tokenizer.eos_token_id

    # ----- pieces of the LLM -------------------------------------------------------------------------
    def _causal_lm(self):
        llm = self.llm
        return llm.get_base_model() if hasattr(llm, "get_base_model") else llm

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (tensors made during a forward pass are put there too)."""
        return self.projector.weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self._causal_lm().get_input_embeddings().weight.dtype

    def add_lora(self):
        from peft import LoraConfig, get_peft_model

        if hasattr(self.llm, "peft_config"):
            return
        with _peft_quietly():
            self.llm = get_peft_model(self.llm, LoraConfig(task_type="CAUSAL_LM", **self.config.lora))
        self.invalidate_prefix_cache()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ----- prompt ------------------------------------------------------------------------------------
    def prompt_parts(self, format_name: str, aus=None) -> tuple[str, str]:
        """The ChatML text before and after the image for a format's instruction about `aus` (default: all the
        model's AUs; a dataset that codes fewer is asked only about those)."""
        from .llm import chat_prompt

        instruction = fmt_lib.get_format(format_name).instruction(self.asked_aus(aus))
        content = f"{instruction}\n{IMAGE_PLACEHOLDER}{self.config.image_suffix}"
        text = chat_prompt(self.tokenizer, [{"role": "user", "content": content}], system=self.config.system_prompt)
        before, after = text.split(IMAGE_PLACEHOLDER)
        return before, after

    def warm(self, format_names):
        """Compute (and cache) the prompt prefix of these formats ahead of the first request."""
        self.on_model_thread(lambda: [self._prefix(name) for name in format_names])

    def _has_adapter(self) -> bool:
        return hasattr(self.llm, "disable_adapter") and hasattr(self.llm, "peft_config")

    def merge_lora(self):
        """Fold the LoRA adapter into the LLM's weights in place (~30% faster decoding on this CPU) while keeping
        it switchable: a copy of the pre-trained matrices it changed is kept, and `adapter_disabled` swaps the
        two by reference. Unmerging and re-merging instead cost 0.5-0.7 s per chat turn and let rounding error
        creep into the weights; the copy costs memory (all linear layers of SmolLM2-135M: ~425 MB in float32)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        with self._lock:
            if self._has_adapter() and not self.lora_merged:
                layers = [m.get_base_layer() for m in self.llm.modules() if isinstance(m, BaseTunerLayer)]
                pretrained = [layer.weight.data.clone() for layer in layers]
                self.llm.merge_adapter()
                self._switchable = [(layer.weight, base, layer.weight.data) for layer, base in zip(layers, pretrained)]

    @property
    def lora_merged(self) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(m.merged for m in self.llm.modules() if isinstance(m, BaseTunerLayer))

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Inside the block the LLM runs as pre-trained, LoRA switched off (chat uses it). Holds the model's
        lock throughout, so no AU answer is generated meanwhile with the adapter off. A no-op when there is no
        adapter or it was merged away (`from_pretrained(merge=True)`)."""
        with self._lock:
            if not self._has_adapter():
                yield
                return
            if self._switchable and self.lora_merged:  # merged by merge_lora: swap in the pre-trained matrices
                for weight, pretrained, _ in self._switchable:
                    weight.data = pretrained
                try:
                    yield  # peft's merged layers call their base layer only, which now holds the pre-trained weight
                finally:
                    for weight, _, merged in self._switchable:
                        weight.data = merged
                return
            merged = self.lora_merged
            if merged:
                self.llm.unmerge_adapter()
            try:
                with self.llm.disable_adapter():
                    yield
            finally:
                if merged:
                    self.llm.merge_adapter()

    def on_model_thread(self, fn, *args, **kwargs):
        """`fn` under the model's lock, on the process's torch thread when the model serves from it
        (`serve_on_torch_thread`, set by the Analyzer that loaded it there; see llm.submit_to_torch_thread),
        else on the caller's thread. Callers must not hold a lock the torch thread may need while they wait."""
        def locked():
            with self._lock:
                return fn(*args, **kwargs)

        if not self.serve_on_torch_thread or on_torch_thread() or self._lock._is_owned():
            return locked()  # inside adapter_disabled() on another thread, waiting would deadlock
        return submit_to_torch_thread(locked).result()

    def invalidate_prefix_cache(self):
        self._prefix_cache.clear()

    def asked_aus(self, aus=None) -> tuple[int, ...]:
        """The AUs a prompt asks about, in the model's order: `aus` (a non-empty subset of the model's), or all."""
        if aus is None:
            return self.config.aus
        aus = tuple(aus)
        if not aus or not set(aus) <= set(self.config.aus):
            raise ValueError(f"the AUs asked {list(aus)} must be a non-empty subset of the model's {list(self.config.aus)}")
        return tuple(a for a in self.config.aus if a in aus)  # in the model's order

    def _prefix(self, format_name: str, reuse: bool = True, aus=None):
        """(prefix length, per-layer (key, value) tensors of batch 1, suffix token ids) for a format (and the
        AUs it asks about)."""
        key = (format_name, self.asked_aus(aus))
        if reuse and key in self._prefix_cache:
            return self._prefix_cache[key]
        before, after = self.prompt_parts(format_name, aus)
        prefix_ids = torch.tensor([self.encode(before)], device=self.device)
        with torch.no_grad():
            out = self._causal_lm().get_decoder()(input_ids=prefix_ids, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        entry = (prefix_ids.shape[1], kv, self.encode(after))
        if reuse:
            self._prefix_cache[key] = entry
        return entry

    @staticmethod
    def _expanded_cache(kv, batch: int) -> DynamicCache:
        # transformers extends a passed cache in place: every call gets a fresh cache over the shared prefix.
        return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])

    # ----- forward -----------------------------------------------------------------------------------
    def image_embeddings(self, chip: torch.Tensor, landmarks: torch.Tensor):
        au_tokens, au_logits = self.encoder(chip, landmarks)
        return self.project(au_tokens), au_logits

    def project(self, au_tokens: torch.Tensor) -> torch.Tensor:
        """AU tokens [B,K,D] -> the LLM's input embeddings [B,K,H]. With `evidence`, the head's logit is read
        from the tokens themselves, so altered tokens (boundary mixes, chimeras) carry their own reading."""
        if self.config.evidence:
            logits = self.encoder.read_logits(au_tokens).unsqueeze(-1)
            # scaled so that at the projector's initialisation the evidence weighs about as much as the token
            scale = self.encoder.hidden_size ** 0.5
            evidence = torch.cat([feature(logits) for feature in EVIDENCE_FEATURES.values()], dim=-1) * scale
            au_tokens = torch.cat([au_tokens, evidence.to(au_tokens.dtype)], dim=-1)
        return self.projector(au_tokens)

    def image_sequence(self, image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What is spliced in at the image placeholder: the projected AU tokens [B,K,H], each after its AU's
        code when the config asks for `labelled_tokens`."""
        image = image.to(dtype)
        if not self.config.labelled_tokens:
            return image
        if self._token_labels is None:
            self._token_labels = [self.encode(("" if k == 0 else " ") + fmt_lib.au_code(a) + ":")
                                  for k, a in enumerate(self.config.aus)]
        labels = self._token_labels
        embedded = self._causal_lm().get_input_embeddings()(
            torch.tensor([i for ids in labels for i in ids], device=image.device)).to(dtype)
        pieces, start = [], 0
        for k, ids in enumerate(labels):
            pieces += [embedded[start:start + len(ids)].expand(image.shape[0], -1, -1), image[:, k:k + 1]]
            start += len(ids)
        return torch.cat(pieces, dim=1)

    def _decode(self, embeds, attention_mask, position_ids, cache):
        return self._causal_lm().get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                               position_ids=position_ids, past_key_values=cache,
                                               use_cache=True).last_hidden_state

    def _answer_hidden(self, chip, landmarks, format_name: str, answers: list[list[int]], reuse_prefix: bool,
                       aus=None, encoded=None):
        """Teacher-forced last hidden states of image + suffix + answers (right-padded), the position that
        predicts each answer's first token, and the encoder's per-AU logits. `encoded`: the encoder's
        (AU tokens, logits) of these faces when the caller already has them (or has altered them)."""
        prefix_len, kv, suffix = self._prefix(format_name, reuse=reuse_prefix, aus=aus)
        batch = chip.shape[0]
        au_tokens, au_logits = encoded if encoded is not None else self.encoder(chip, landmarks)
        image = self.image_sequence(self.project(au_tokens), self.llm_dtype)
        fed = [list(suffix) + list(answer) for answer in answers]
        ids, filled = _padded(fed, self.eos_id)
        mask = torch.cat([torch.ones(batch, prefix_len + image.shape[1], dtype=torch.long), filled.long()], dim=1)
        ids, mask = ids.to(image.device), mask.to(image.device)
        token_embeds = self._causal_lm().get_input_embeddings()(ids)
        embeds = torch.cat([image, token_embeds], dim=1)
        positions = torch.arange(prefix_len, prefix_len + embeds.shape[1], device=embeds.device).unsqueeze(0).expand(batch, -1)
        hidden = self._decode(embeds, mask, positions, self._expanded_cache(kv, batch))
        # position t predicts token t+1: the answer's tokens are predicted from the position before each
        return hidden, image.shape[1] + len(suffix) - 1, au_logits

    def answer_loss(self, chip, landmarks, format_name: str, answers: list[list[int]], reuse_prefix: bool = False,
                    choices: list[list[tuple | None]] | None = None, reduction: str = "mean", aus=None,
                    weights: list[list[float]] | None = None, encoded=None):
        """Cross-entropy of the answers (teacher forcing) and the encoder's per-AU logits.

        Without `choices`: every answer token over the whole vocabulary. With `choices` (per answer token the
        alternatives of `answer_targets`, None where nothing is chosen): only the chosen tokens, each among its
        alternatives, which is the decision the plan-guided decoder makes; tokens after the last choice are not
        even fed. The prefix cache is computed without gradient (exact while the LLM is frozen; with LoRA it
        skips the adapter's gradient through the fixed instruction only). The LM head runs at those positions only.
        `reduction="sum"` returns the sum over the scored tokens (`scored_tokens` counts them), so that
        processes holding slices of one batch can divide by the whole batch's count. `weights` (with `choices`,
        one per answer token) scale each chosen token's loss; the mean still divides by the count. `encoded`: see
        `_answer_hidden`.
        """
        if choices is not None:
            last = [max([i + 1 for i, c in enumerate(cs) if c is not None], default=0) for cs in choices]
            answers = [a[:n] for a, n in zip(answers, last)]
        hidden, start, au_logits = self._answer_hidden(chip, landmarks, format_name, answers, reuse_prefix, aus,
                                                          encoded)
        rows, cols, targets, alternatives, scale = [], [], [], [], []
        for row, answer in enumerate(answers):
            for i, token in enumerate(answer):
                if choices is None or choices[row][i] is not None:
                    rows.append(row)
                    cols.append(start + i)
                    targets.append(token)
                    alternatives.append(None if choices is None else choices[row][i])
                    scale.append(1.0 if weights is None else weights[row][i])
        device = hidden.device
        logits = self._causal_lm().get_output_embeddings()(hidden[rows, cols]).float()
        if choices is None:
            return F.cross_entropy(logits, torch.tensor(targets, device=device), reduction=reduction), au_logits
        width = max(len(alt) for alt in alternatives)
        index = torch.tensor([list(alt) + [alt[0]] * (width - len(alt)) for alt in alternatives], device=device)
        valid = torch.tensor([[j < len(alt) for j in range(width)] for alt in alternatives], device=device)
        option_logits = logits.gather(1, index).masked_fill(~valid, float("-inf"))
        target_index = torch.tensor([alt.index(t) for alt, t in zip(alternatives, targets)], device=device)
        losses = F.cross_entropy(option_logits, target_index, reduction="none") * torch.tensor(scale, device=device)
        return (losses.sum() if reduction == "sum" else losses.mean()), au_logits

    @torch.no_grad()
    def read_presence(self, chip, landmarks, passes: int = 3, encoded=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A few forward passes instead of writing: per face and AU, the probability the model gives "1" at that
        AU's digit of its binary answer (AU01:<d> AU02:<d> ...), and per face whether that answer converged.

        Parallel (Jacobi) decoding of the binary answer: pass 1 feeds all digits 0 and reads every digit's
        choice at once, each next pass feeds the digits the previous pass chose. A fixed point (the digits
        fed are the digits chosen) is exactly the answer the decoder writes one digit at a time, with the same
        probabilities; `converged` says whether it was reached within `passes`. Otherwise the probabilities
        are a read-out of the model's answer given the last digits fed, not its written answer. `encoded`: the
        faces' (AU tokens, logits) where the caller has them (or has altered them), as in `answer_loss`."""
        nothing = fmt_lib.AUResult.from_active(self.config.aus, ())
        ids, choices, _ = self.answer_targets("binary", nothing)
        positions = [i for i, c in enumerate(choices) if c is not None]
        one = self.encode("1")
        assert len(positions) == len(self.config.aus) and len(one) == 1, "binary answer layout changed"
        alternatives = torch.tensor([choices[i] for i in positions])  # (n_aus, 2): the "0" and "1" tokens
        is_one = alternatives == one[0]
        zero_token, one_token = alternatives[~is_one], alternatives[is_one]
        batch = chip.shape[0]
        template = torch.tensor(ids[: positions[-1] + 1]).repeat(batch, 1)
        columns = torch.tensor(positions)

        def passes_until_fixed_point():
            # the faces are encoded once: every pass reads the same AU tokens
            given = encoded if encoded is not None else self.encoder(chip.float(), landmarks.float())
            fed = torch.zeros(batch, len(positions), dtype=torch.bool)
            for _ in range(max(1, passes)):
                answer = template.clone()
                answer[:, columns] = torch.where(fed, one_token, zero_token)
                hidden, start, _ = self._answer_hidden(chip.float(), landmarks.float(), "binary", answer.tolist(),
                                                       reuse_prefix=True, encoded=given)
                option_logits = self.token_logits(hidden[:, start + columns], alternatives)
                p_one = (option_logits.softmax(-1) * is_one).sum(-1)
                chosen = option_logits.argmax(-1) == is_one.int().argmax(-1)  # the decoder's pick is "1"
                converged = (chosen == fed).all(1)
                if bool(converged.all()):
                    break
                fed = chosen
            return p_one, converged

        return self.on_model_thread(passes_until_fixed_point)

    # ----- generation along a format's plan ----------------------------------------------------------
    def token_logits(self, hidden: torch.Tensor, tokens) -> torch.Tensor:
        """The LM head's float logits of just `tokens`: hidden (..., H), tokens (..., k) -> (..., k). A decision
        only compares its options; the full head (49k rows) costs ~17 ms per decision on this CPU."""
        head = self._causal_lm().get_output_embeddings()
        index = torch.as_tensor(tokens, device=hidden.device)
        logits = torch.einsum("...h,...kh->...k", hidden, head.weight[index])  # per-position tokens broadcast
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[index]
        return logits.float()

    def answer_ids(self, format_name: str, result) -> list[int]:
        """Training target: the answer tokenised piece by piece exactly as the decoder will feed it."""
        return self.answer_targets(format_name, result)[0]

    def answer_targets(self, format_name: str, result) -> tuple[list[int], list[tuple | None], list[bool]]:
        """The answer's token ids; per token, the tokens the decoder chooses among there (a branch of an
        option trie), or None where it chooses nothing (forced text and the unambiguous rest of an option
        are fed, never predicted); and per token whether its option says an AU is there (`says_present`)."""
        fmt = fmt_lib.get_format(format_name)
        text = fmt.render(result)
        ids, decisive, present, pos, plan = [], [], [], 0, fmt.plan(result.aus)  # the AUs asked: all, or a dataset's
        item = next(plan)
        while True:
            if isinstance(item, fmt_lib.Forced):
                assert text.startswith(item.text, pos), (text, pos, item.text)
                forced = self.encode(item.text)
                ids += forced
                decisive += [None] * len(forced)
                present += [False] * len(forced)
                pos += len(item.text)
                send = None
            else:
                matches = [o for o in item.options if o is not fmt_lib.END and text.startswith(o, pos)]
                if matches:
                    send = matches[0]
                    pos += len(send)
                else:
                    assert fmt_lib.END in item.options and pos == len(text), (text, pos, item.options)
                    send = fmt_lib.END
                node = self._option_trie(item.options).root
                for token in [self.eos_id] if send is fmt_lib.END else self.encode(send):
                    decisive.append(tuple(t for t in node if t is not None) if len(node) > 1 else None)
                    present.append(fmt.says_present(send))
                    ids.append(token)
                    node = node[token]
                if send is fmt_lib.END:
                    return ids, decisive, present
            try:
                item = plan.send(send)
            except StopIteration:
                return ids + [self.eos_id], decisive + [None], present + [False]

    def _option_trie(self, options: tuple) -> _OptionTrie:
        """The token trie of a choice's options, built once per distinct options: a format asks the same
        choices of every face, and tokenizing 20 options anew took 0.8 ms at each decision."""
        trie = self._option_tries.get(options)
        if trie is None:
            trie = self._option_tries[options] = _OptionTrie(
                {o: ([self.eos_id] if o is fmt_lib.END else self.encode(o)) for o in options})
        return trie

    @torch.no_grad()
    def generate(self, chip, landmarks, format_name: str, aus=None, speculate: bool = True) -> list[Generation]:
        """Write the answer for each face in the batch, following the format's plan.

        With `speculate`, the encoder's own AU head drafts an answer that is fed with the image in one forward
        pass; the LLM's decisions are read at every drafted position, the draft is kept up to the first token
        the LLM decides otherwise, and after that decision the rest of the draft is fed again where the
        answer's last tokens occur in it (`_draft_lookup`). The answer is the
        LLM's own, the same as without a draft (up to float rounding of a batched pass); when the LLM agrees
        with its encoder's head (most faces), the whole answer costs one pass instead of one per decision.
        Speculating, the faces are written one at a time: in a batch every pass is as long as the longest
        row's feed, so one face whose draft goes wrong makes every pass of the batch long."""
        aus = self.asked_aus(aus)
        if not speculate or chip.shape[0] == 1:
            return self.on_model_thread(self._generate, chip, landmarks, format_name, aus, speculate)
        return [generation for i in range(chip.shape[0]) for generation in
                self.on_model_thread(self._generate, chip[i:i + 1], landmarks[i:i + 1], format_name, aus, True)]

    def draft_ids(self, format_name: str, au_logits: torch.Tensor, aus) -> list[list[int]]:
        """Per face, the answer tokens the format's plan writes for the AUs the encoder's head finds present
        (logit > 0), at the levels training taught for uncoded intensities: the guess `generate` verifies."""
        levels = (self.config.training or {}).get("default_intensity", {})
        columns = [list(self.config.aus).index(a) for a in aus]
        drafts = []
        for row in au_logits[:, columns].tolist():
            active = [a for a, logit in zip(aus, row) if logit > 0]
            levels_of_active = {a: float(levels.get(str(a), UNCODED_INTENSITY)) for a in active}
            result = fmt_lib.AUResult.from_active(aus, active, levels_of_active)
            drafts.append(self.answer_targets(format_name, result)[0])
        return drafts

    def _generate(self, chip, landmarks, format_name, aus, speculate=True):
        fmt = fmt_lib.get_format(format_name)
        prefix_len, kv, suffix = self._prefix(format_name, aus=aus)
        batch, device = chip.shape[0], self.device
        image, au_logits = self.image_embeddings(chip.to(device, torch.float32), landmarks.to(device, torch.float32))
        drafts = self.draft_ids(format_name, au_logits, aus) if speculate else [[] for _ in range(batch)]
        rows = [_PlanState(fmt.plan(aus), draft) for draft in drafts]
        for row in rows:
            row.advance(self, None)
        embed = self._causal_lm().get_input_embeddings()
        cache = self._expanded_cache(kv, batch)

        # pass 1: the image, the prompt's end and each face's whole draft
        feeds = drafts
        ids, _ = _padded([list(suffix) + feed for feed in feeds], self.eos_id)
        token_embeds = embed(ids.to(device))
        image = self.image_sequence(image, token_embeds.dtype)
        embeds = torch.cat([image, token_embeds], dim=1)
        fed_from = prefix_len + image.shape[1] + len(suffix)  # cache column of the answer's first token
        mask = torch.ones(batch, prefix_len + embeds.shape[1], dtype=torch.long, device=device)
        positions = torch.arange(prefix_len, mask.shape[1], device=device).unsqueeze(0).expand(batch, -1)
        hidden = self._decode(embeds, mask, positions, cache)[:, fed_from - prefix_len - 1:]
        next_position = torch.full((batch,), fed_from, dtype=torch.long, device=device)
        while True:
            # hidden[b, i]: the output before feeds[b][i] (and after the last one at i = len(feeds[b]))
            last_hidden = []
            for b, row in enumerate(rows):
                look = functools.partial(self._look_ahead, cache, mask, b, fed_from, int(next_position[b]))
                kept = row.verify(self, feeds[b], hidden[b], look) if not row.finished else 0
                last_hidden.append(hidden[b, kept])
                mask[b, fed_from + kept:] = 0  # tokens past the LLM's first other decision, and padding
                next_position[b] += kept
                row.keep(feeds[b], kept)
            if all(row.finished for row in rows):
                break
            feeds = [row.next_feed() for row in rows]
            ids, _ = _padded(feeds, self.eos_id)
            ids = ids.to(device)
            fed_from = mask.shape[1]
            positions = next_position.unsqueeze(1) + torch.arange(ids.shape[1], device=device).unsqueeze(0)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            hidden = torch.cat([torch.stack(last_hidden).unsqueeze(1),
                                self._decode(embed(ids), mask, positions, cache)], dim=1)
        return [Generation("".join(row.pieces), row.decisions) for row in rows]

    def _look_ahead(self, cache, mask, row: int, fed_from: int, position: int, kept: int, paths: list) -> list:
        """The LLM's output after each token path, fed after the first `kept` tokens of this pass of one row,
        in a side pass that leaves the decoding cache as it was (the cache grows by concatenation, so the
        sliced views stay untouched)."""
        context = fed_from + kept
        k = len(paths)
        ids, filled = _padded([list(p) for p in paths], self.eos_id)
        ids = ids.to(self.device)
        side_mask = torch.cat([mask[row:row + 1, :context].expand(k, -1), filled.long().to(self.device)], dim=1)
        positions = (position + kept + torch.arange(ids.shape[1], device=self.device)).unsqueeze(0).expand(k, -1)
        kv = [(layer.keys[row:row + 1, :, :context], layer.values[row:row + 1, :, :context]) for layer in cache.layers]
        side_cache = self._expanded_cache(kv, k)
        embeds = self._causal_lm().get_input_embeddings()(ids)
        hidden = self._decode(embeds, side_mask, positions, side_cache)
        return [hidden[r, len(p) - 1] for r, p in enumerate(paths)]


def _mean_option(options: list[str], log_probs: list[float]) -> tuple[int, "fmt_lib.MeanOf"]:
    """For numeric options: their mean under the probabilities, and the largest option not above it (the mean
    rounded to tenths, as it is written), as (its index, `MeanOf`)."""
    probs = [math.exp(lp) for lp in log_probs]
    mean = sum(p * float(o) for p, o in zip(probs, options)) / sum(probs)
    written = fmt_lib.round_half_up(mean * 10) / 10
    best = max((i for i, o in enumerate(options) if float(o) <= written + 1e-9), key=lambda i: float(options[i]))
    return best, fmt_lib.MeanOf(options[best], mean)


def _padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences right-padded with `pad` into one [rows, longest] tensor, and where it holds real tokens."""
    ids = torch.full((len(sequences), max(1, max(len(s) for s in sequences))), pad, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    filled = torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in sequences]).unsqueeze(1)
    return ids, filled


def _draft_lookup(draft: list[int], written: list[int], cursor: int, longest: int = 4) -> tuple[int | None, list]:
    """After the LLM decided otherwise than the draft, where the draft can be picked up again: the draft's
    tokens after the first place (from `cursor` on) where the answer's last tokens (at least 2) occur in it."""
    for n in range(min(longest, len(written)), 1, -1):
        tail = written[-n:]
        for i in range(max(0, cursor - n + 1), len(draft) - n + 1):
            if draft[i: i + n] == tail:
                return i + n, draft[i + n:]
    return None, []


class _PlanState:
    """One row's progress through a format plan during batched decoding."""

    def __init__(self, plan, draft: list[int] = ()):
        self.plan = plan
        self.started = False
        self.pending: list[int] = []  # tokens decided or forced but not yet fed to the LLM
        self.draft = list(draft)  # the encoder's draft of the whole answer (speculative writing), or empty
        self.written: list[int] = []  # answer tokens in the LLM's cache
        self.cursor = 0  # where in the draft the answer stands
        self.drafted_from: int | None = 0  # where in the draft this pass's drafted tokens start (None: none)
        self.pending_fed = 0  # how many tokens this pass feeds before the drafted ones
        self.pieces: list[str] = []
        self.decisions: list[Decision] = []
        self.options = None
        self.mean = False  # the current choice is read as the mean of its numeric options
        self.node = None
        self.finished = False

    def advance(self, model: AULlava, sent):
        """Send the last choice to the plan and queue forced text up to the next choice."""
        try:
            item = self.plan.send(sent) if self.started else next(self.plan)
            self.started = True
            while isinstance(item, fmt_lib.Forced):
                self.pieces.append(item.text)
                self.pending += model.encode(item.text)
                item = self.plan.send(None)
        except StopIteration:
            self.finished = True
            return
        self.options, self.mean = item.options, item.mean
        self.node = model._option_trie(item.options).root
        self._follow()

    def verify(self, model: AULlava, fed: list[int], hidden: torch.Tensor, look_ahead) -> int:
        """Follow the plan along tokens fed in one pass (`hidden[i]`: the LLM's output before `fed[i]`, and
        after the last one at i = len(fed)), deciding at every choice as `decide` does, while the tokens the
        plan queues are the ones fed. Returns how many fed tokens are kept; the plan's next tokens (from the
        first decision that differs from what was fed) stay pending. `look_ahead(kept, paths)`: the LLM's
        outputs after token paths that follow the first `kept` fed tokens (`AULlava._look_ahead`)."""
        kept = 0
        while True:
            while self.pending and kept < len(fed) and self.pending[0] == fed[kept]:
                self.pending.pop(0)
                kept += 1
            if self.pending or self.finished:
                return kept
            self.decide(model, hidden[kept:], fed[kept:], functools.partial(look_ahead, kept))

    def keep(self, fed: list[int], kept: int):
        """The first `kept` tokens fed in this pass stay in the cache: they are the answer so far."""
        self.written += fed[:kept]
        if self.drafted_from is not None and kept > self.pending_fed:
            self.cursor = self.drafted_from + kept - self.pending_fed

    def next_feed(self) -> list[int]:
        """What the next pass feeds: the pending tokens, then the draft from where the answer meets it again."""
        self.drafted_from, drafted = (None, []) if self.finished or not self.draft else \
            _draft_lookup(self.draft, self.written + self.pending, self.cursor)
        self.pending_fed = len(self.pending)
        return self.pending + drafted

    def decide(self, model: AULlava, hidden: torch.Tensor, fed: list[int], look_ahead):
        """Pick the option with the highest probability: the product, along its token path, of the LLM's
        probability of each token among the trie's branches there. Choosing token by token instead lets a
        prefix win on the summed mass of many weak options (after "AU0" it must write some AU0x code).

        `hidden[j]` is the LLM's output after the first j tokens of `fed` (the draft, when speculating), so the
        branch points along the drafted path come free. Where a branch point off that path is needed, the
        options' probabilities so far bound it from above; only when a bound could beat the best known option
        are the missing branch points read in one side pass (`look_ahead(paths)`)."""
        leaves = list(_leaves(self.node))
        known = {path: hidden[len(path)] for path in {tuple(fed[:j]) for j in range(len(hidden))}}
        log_probs: dict[tuple, torch.Tensor] = {}

        def score(path):
            """Log probability of the option at `path`, and whether it is exact (else an upper bound)."""
            total, node = 0.0, self.node
            for j, token in enumerate(path):
                branches = [t for t in node if t is not None]
                if len(branches) > 1:
                    at = path[:j]
                    if at not in log_probs:
                        if at not in known:
                            return total, False
                        log_probs[at] = torch.log_softmax(model.token_logits(known[at], branches), dim=0)
                    total += float(log_probs[at][branches.index(token)])
                node = node[token]
            return total, True

        scores = [score(path) for _, path in leaves]
        exact = [s for s, is_exact in scores if is_exact]
        bounded = max((s for s, is_exact in scores if not is_exact), default=-math.inf)
        if not exact or max(exact) < bounded or (self.mean and bounded > -math.inf):  # a mean needs them all
            missing = sorted({path[:j] for _, path in leaves for j in range(1, len(path))
                              if path[:j] not in known and _branches(self.node, path[:j]) > 1})
            known.update(zip(missing, look_ahead(missing)))
            scores = [score(path) for _, path in leaves]
        if self.mean:
            best, option = _mean_option([option for option, _ in leaves], [s for s, _ in scores])
        else:
            best = max(range(len(leaves)), key=lambda i: scores[i][0] if scores[i][1] else -math.inf)
            option = leaves[best][0]
        self.pending += list(leaves[best][1])
        self._complete(model, option, math.exp(scores[best][0]))

    def _follow(self):
        """Walk down to the first branch point: the tokens every option shares there are forced. (A choice has
        at least two options, none a prefix of another, so the walk never ends at an option.)"""
        while len(self.node) == 1:
            (token, child), = self.node.items()
            self.pending.append(token)
            self.node = child

    def _complete(self, model, option, probability: float):
        self.decisions.append(Decision(tuple(self.options), option, probability))
        if option is fmt_lib.END:
            self.pending = []  # the end token need not be fed
            self.finished = True
            return
        self.pieces.append(option)
        self.advance(model, option)


def _state_with_prefix(prefix: str, module: nn.Module) -> dict:
    return {f"{prefix}.{k}": v.detach().float().contiguous() for k, v in module.state_dict().items()}


def _sub_state(state: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def save_pretrained(model: AULlava, path) -> Path:
    """One folder: the config json, encoder + projector safetensors, the peft adapter. No base LLM copy."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(model.config.to_json())
    save_file(_state_with_prefix("encoder", model.encoder) | _state_with_prefix("projector", model.projector),
              str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    if hasattr(model.llm, "peft_config"):
        model.llm.save_pretrained(str(path / ADAPTER_DIR), safe_serialization=True)
    return path


def resolve_checkpoint(name_or_path) -> Path:
    """A local folder, or a hub repo id downloaded (or read from the hub cache) with huggingface_hub. Only
    json, safetensors and markdown files are fetched from the hub: never code or pickles."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path} is not an AU-LLaVA checkpoint: {CONFIG_NAME} is missing")
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {name_or_path}")
    repo_id = check_repo_id(str(name_or_path))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(repo_id=repo_id,
                                       allow_patterns=["*.json", "*.safetensors", "*.md"]))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(f"hub repo {name_or_path} is not in the local hub cache and the hub cannot be "
                                f"reached (offline?): {error}") from None
    if not (local / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"hub repo {name_or_path} holds no {CONFIG_NAME}")
    return local


def check_repo_id(repo_id: str) -> str:
    """`owner/name` as the hub spells it, else a ValueError that says what a repo id looks like."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it needs exactly one '/'")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{repo_id!r} is neither a checkpoint folder nor a hub repo id of the form 'owner/name' "
                         "(letters, digits, '-', '_' and '.'; at most 96 characters each)") from None
    return repo_id


def check_checkpoint_files(path: Path) -> dict:
    """Read the checkpoint's config and check that its weights are whole safetensors files before any model is
    built; a ValueError names the file that is missing or broken. Returns the config as a dict."""
    from safetensors import SafetensorError, safe_open

    def readable_safetensors(file: Path, what: str):
        if not file.is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {what} {file.name} is missing")
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"checkpoint {path}: {what} {file.name} is not a readable safetensors file "
                             f"({error})") from None

    def readable_json(file: Path, what: str) -> dict:
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"checkpoint {path}: {what} {file.name} is not readable JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"checkpoint {path}: {what} {file.name} holds no JSON object")
        return data

    config = readable_json(path / CONFIG_NAME, "the config")
    readable_safetensors(path / WEIGHTS_NAME, "the encoder and projector weights")
    adapter = path / ADAPTER_DIR
    if adapter.is_dir():
        readable_json(adapter / "adapter_config.json", "the LoRA adapter's config")
        readable_safetensors(adapter / "adapter_model.safetensors", "the LoRA adapter's weights")
    return config


@contextlib.contextmanager
def _peft_quietly():
    """peft 0.21 asks transformers 5 for a property it has deprecated: a FutureWarning on every load that no
    user of aullava can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def from_pretrained(name_or_path, llm=None, tokenizer=None, dtype=None, merge: bool = False,
                    base_llm: str | None = None) -> AULlava:
    """Load a checkpoint folder or hub repo. `merge=True` folds LoRA into a private copy of the base LLM
    (fastest generation); otherwise the adapter stays switchable, so one base LLM also serves chat."""
    from .llm import load_base_llm

    path = resolve_checkpoint(name_or_path)
    settings = check_checkpoint_files(path)
    try:
        config = AULlavaConfig.from_dict(settings)
        state = load_file(str(path / WEIGHTS_NAME))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"checkpoint {path} is unreadable: {error}") from error
    if base_llm:
        config.base_llm = base_llm
    if llm is None:
        llm, tokenizer, _ = load_base_llm(config.base_llm, dtype=dtype, fresh=merge)
        if hasattr(llm, "peft_config"):
            # the process's shared base LLM already carries another checkpoint's adapter (perhaps merged into
            # its weights): this checkpoint gets a base of its own
            llm, tokenizer, _ = load_base_llm(config.base_llm, dtype=dtype, fresh=True)
    try:
        model = AULlava(config, llm, tokenizer)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"checkpoint {path}: {CONFIG_NAME} does not describe a model this version can build "
                         f"({type(error).__name__}: {error})") from None
    try:
        model.encoder.load_state_dict(_sub_state(state, "encoder"))
        model.projector.load_state_dict(_sub_state(state, "projector"))
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path}: {WEIGHTS_NAME} does not fit the model its config describes "
                         f"({str(error).splitlines()[0]})") from None
    adapter = path / ADAPTER_DIR
    if adapter.is_dir():
        from peft import PeftModel

        try:
            with _peft_quietly():
                model.llm = PeftModel.from_pretrained(llm, str(adapter), is_trainable=False)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
            raise ValueError(f"checkpoint {path}: the LoRA adapter does not load onto {config.base_llm} "
                             f"({str(error).splitlines()[0]})") from None
        if merge:
            model.llm = model.llm.merge_and_unload()
    model.projector.to(torch.float32)
    model.eval()
    return model


def push_to_hub(path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a saved checkpoint folder to the hub; returns the repo URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint folder")
    resolve_checkpoint(path)
    api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(path), repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"
