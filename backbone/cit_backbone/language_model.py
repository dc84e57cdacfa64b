"""The frozen language model (SmolLM2-135M-Instruct) and the decode loop that turns visual tokens into text."""
from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .paths import LM_GGUF_FILE, cache_dir, lm_gguf_dir

PREFIX_CACHE_SIZE = 64  # prompt prefixes (instructions) whose keys/values training keeps
LM_CACHE_NAME = "smollm2-135m-instruct"
LM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # written into LoRA configs as their base model
BASE_ROWS = "__base__"  # PEFT's name for "no LoRA" in a mixed batch
MAX_NEW_TOKENS_LIMIT = 512
# The chat template's default system prompt is left out on purpose: 24 constant tokens per row cost training
# time and teach nothing the connector needs. The image ends the user turn, after the instruction: everything
# before it is then the same for all rows of a task, so training computes that prefix once (see `loss`).
USER_PREFIX = "<|im_start|>user\n"
ASSISTANT_PREFIX = "<|im_end|>\n<|im_start|>assistant\n"


def converted_lm_dir(progress: bool = True) -> Path:
    """The LM as safetensors in the local cache, converted from the packaged GGUF on first use (~30 s)."""
    target = cache_dir() / LM_CACHE_NAME
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"converting {LM_GGUF_FILE} to safetensors in {target} (once, ~30 s)", flush=True)
    src = lm_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=LM_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=LM_GGUF_FILE, dtype=torch.float32)
    # The weights are dequantised to fp32 already; drop the GGUF quantizer so transformers lets us save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{LM_CACHE_NAME}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: a concurrent converter either wins or finds the finished copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Sampling:
    """How to decode one request. temperature 0 is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 5.0):
            raise ValueError(f"temperature must be in [0, 5], got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if len(self.stop) > 8 or any(not s or len(s) > 64 for s in self.stop):
            raise ValueError("stop takes at most 8 non-empty strings of at most 64 characters")


@dataclass
class RowState:
    """One row of a decode: its tokens, the text so far (stop string cut off) and why it ended."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0

    def stable_text(self, stop: Sequence[str]) -> str:
        """Text that can no longer change: holds back a partial character and a possible partial stop string."""
        text = self.text if self.finish_reason else self.text.rstrip("\ufffd")
        if self.finish_reason:
            return text
        hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]


class LanguageModel:
    def __init__(self, path: Path | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = path or converted_lm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.hidden_size: int = self.model.config.hidden_size
        self.eos_id: int = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = {self.eos_id, self.tokenizer.eos_token_id}
        self._prefixes: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.peft = None              # peft.PeftModel around `model`, created when the first LoRA arrives
        self._names: dict[str, str] = {}  # LoRA name -> PEFT's adapter name
        self._counter = itertools.count()
        self._training: set[str] = set()  # LoRAs being trained: their prefixes change every step, never cached

    # -- LoRA adapters (PEFT). Rows name the LoRA they use; the model holds any number of them at once.
    # Callers' names (task ids, versions) may hold characters PEFT cannot use in module names ("." or "training"),
    # so each LoRA gets an internal name of its own.
    def add_lora(self, name: str, rank: int = 8, alpha: int = 16, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> None:
        """A new trainable LoRA (B = 0, so it starts as the frozen LM)."""
        from peft import LoraConfig, PeftModel

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                            base_model_name_or_path=LM_NAME, task_type="CAUSAL_LM")
        internal = self._new_name(name)
        if self.peft is None:
            self.peft = PeftModel(self.model, config, adapter_name=internal)
        else:
            self.peft.add_adapter(internal, config)
        self._training.add(name)
        self._settle()

    def load_lora(self, name: str, directory: Path, trainable: bool = False) -> None:
        """Load a LoRA saved in PEFT's format (by `save_lora`, or by PEFT itself)."""
        from peft import PeftModel

        internal = self._new_name(name)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(directory), adapter_name=internal)
        else:
            self.peft.load_adapter(str(directory), adapter_name=internal)
        if trainable:
            self._training.add(name)
        self._settle()

    def save_lora(self, name: str, directory: Path) -> None:
        """PEFT's own on-disk format: `PeftModel.from_pretrained(lm, directory)` (and vLLM) load it as is."""
        from dataclasses import replace

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        internal = self._internal(name)
        directory.mkdir(parents=True, exist_ok=True)
        replace(self.peft.peft_config[internal], inference_mode=True).save_pretrained(str(directory))
        weights = get_peft_model_state_dict(self.peft, adapter_name=internal, save_embedding_layers=False)
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(directory / "adapter_model.safetensors"))

    def set_lora_trainable(self, name: str, trainable: bool) -> None:
        self._internal(name)
        (self._training.add if trainable else self._training.discard)(name)
        self._settle()

    def unload_lora(self, name: str) -> None:
        import warnings

        with warnings.catch_warnings():  # PEFT warns that the deleted adapter was "active"; rows never use that
            warnings.simplefilter("ignore")
            self.peft.delete_adapter(self._names.pop(name))
        self._training.discard(name)
        for key in [k for k in self._prefixes if k[0] == name]:
            del self._prefixes[key]

    def loras(self) -> list[str]:
        return list(self._names)

    def lora_parameters(self, name: str) -> list[torch.nn.Parameter]:
        internal = self._internal(name)
        return [p for n, p in self.model.named_parameters() if f".{internal}." in n and "lora_" in n]

    def _new_name(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"a LoRA named {name!r} is loaded already")
        self._names[name] = f"lora{next(self._counter)}"
        return self._names[name]

    def _internal(self, name: str) -> str:
        if name not in self._names:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self._names)})")
        return self._names[name]

    def _settle(self) -> None:
        """PEFT marks adapters trainable as it adds them; only the LoRAs being trained may be."""
        training = {f".{self._names[n]}." for n in self._training}
        for n, p in self.model.named_parameters():
            p.requires_grad_("lora_" in n and any(t in n for t in training))
        self.peft.eval()  # PEFT refuses per-row adapter names in training mode; there is no dropout anyway

    def _rows(self, loras: Sequence[str | None]):
        """Context in which row i of the next forward passes uses LoRA loras[i] (None: the plain LM)."""
        from contextlib import nullcontext

        if self.peft is None:
            if any(loras):
                raise ValueError(f"no LoRA is loaded, but rows ask for {sorted({n for n in loras if n})}")
            return nullcontext()
        names = [self._internal(n) if n else BASE_ROWS for n in loras]
        # Private in PEFT, but it is exactly what PeftModel.forward does with `adapter_names`; calling it directly
        # lets the trainer run the bare decoder (no LM head over every position) with per-row adapters too.
        return self.peft.base_model._enable_peft_forward_hooks(adapter_names=names)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens."""
        return self.encode(USER_PREFIX + instruction + "\n"), self.encode(ASSISTANT_PREFIX)

    def answer_ids(self, answer: str) -> list[int]:
        return self.encode(answer) + [self.eos_id]

    def _embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))

    def prompt_embeddings(self, visual: torch.Tensor, instructions: Sequence[str]) -> list[torch.Tensor]:
        """Per row: the whole prompt's embeddings [L, H], visual tokens in place."""
        rows = []
        for i, instruction in enumerate(instructions):
            pre, post = self.prompt_ids(instruction)
            rows.append(torch.cat([self._embed(pre), visual[i], self._embed(post)]))
        return rows

    def loss(self, visual: torch.Tensor, instructions: Sequence[str], answers: Sequence[str],
             lora: str | None = None) -> torch.Tensor:
        """Mean cross-entropy over answer tokens; gradients flow into `visual` (the connector's output) and into
        `lora` when it is being trained."""
        logits, targets = self.answer_logits(visual, instructions, answers, lora)
        return torch.nn.functional.cross_entropy(logits, targets)

    def answer_logits(
        self, visual: torch.Tensor, instructions: Sequence[str], answers: Sequence[str], lora: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [T, vocab] at every position that predicts an answer token, and those tokens [T].

        Rows are grouped by instruction: the prompt before the image is the same for every row of a group, so its
        keys and values are computed once and only image + answer positions run per row.
        """
        from transformers import DynamicCache

        groups: dict[str, list[int]] = {}
        for row, instruction in enumerate(instructions):
            groups.setdefault(instruction, []).append(row)
        all_logits, all_targets = [], []
        for instruction, rows in groups.items():
            pre, post = self.prompt_ids(instruction)
            suffixes = [(torch.cat([visual[r], self._embed(post + ans)]), [-100] * (visual.shape[1] + len(post)) + ans)
                        for r, ans in ((r, self.answer_ids(answers[r])) for r in rows)]
            n, length = len(rows), max(len(lab) for _, lab in suffixes)
            emb = torch.zeros(n, length, self.hidden_size)
            labels = torch.full((n, length), -100, dtype=torch.long)
            mask = torch.ones(n, len(pre) + length, dtype=torch.long)
            for i, (e, lab) in enumerate(suffixes):  # right padding after the shared prefix
                emb[i, : len(lab)], labels[i, : len(lab)] = e, torch.tensor(lab)
                mask[i, len(pre) + len(lab) :] = 0
            cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                  for k, v in self._prefix(pre, lora)], config=self.model.config)
            positions = torch.arange(len(pre), len(pre) + length).expand(n, -1)
            with self._rows([lora] * n):
                hidden = self.model.model(inputs_embeds=emb, attention_mask=mask, position_ids=positions,
                                          cache=cache, use_cache=True).last_hidden_state
            # Logits only where an answer token is predicted: the 49k-wide head is a fifth of the model's compute.
            targets = labels[:, 1:]
            keep = targets != -100
            all_logits.append(self.model.get_output_embeddings()(hidden[:, :-1][keep]))
            all_targets.append(targets[keep])
        return torch.cat(all_logits), torch.cat(all_targets)

    def _prefix(self, ids: list[int], lora: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [1, heads, len, dim] of a prompt prefix; an LRU of the latest prefixes.
        A LoRA being trained changes the prefix at every step: it is recomputed, with gradients, each time."""
        if lora in self._training:
            with self._rows([lora]):
                out = self.model.model(input_ids=torch.tensor([ids]), use_cache=True)
            return [(k, v) for k, v, *_ in out.cache]
        key = (lora, *ids)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return self._prefixes[key]
        # Plain tensors even when first asked under inference mode: later training steps save them for backward.
        with torch.inference_mode(False), torch.no_grad(), self._rows([lora]):
            out = self.model.model(input_ids=torch.tensor([ids]), use_cache=True)
        kv = [(k, v) for k, v, *_ in out.cache]
        self._prefixes[key] = kv
        while len(self._prefixes) > PREFIX_CACHE_SIZE:
            self._prefixes.popitem(last=False)
        return kv

    @torch.inference_mode()
    def decode(
        self, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
        loras: Sequence[str | None] | None = None,
    ) -> Iterator[list[RowState]]:
        """Decode a batch, one step at a time; yields the row states after every step (the last with all finished).
        Row i runs through LoRA loras[i] (None or absent: the plain LM)."""
        loras = list(loras) if loras is not None else [None] * len(instructions)
        rows = self.prompt_embeddings(visual, instructions)
        batch, length = len(rows), max(e.shape[0] for e in rows)
        emb = torch.zeros(batch, length, self.hidden_size)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for i, e in enumerate(rows):  # left padding, so every row's next token sits in the last column
            emb[i, length - e.shape[0] :], mask[i, length - e.shape[0] :] = e, 1
        states = [RowState(prompt_tokens=e.shape[0]) for e in rows]
        generators = [torch.Generator().manual_seed(s.seed) if s.seed is not None else None for s in sampling]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._rows(loras):
            out = self.model(inputs_embeds=emb, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
        for _ in range(max(s.max_new_tokens for s in sampling)):
            logits = out.logits[:, -1, :]
            next_ids = []
            for i, (state, params) in enumerate(zip(states, sampling)):
                if state.finish_reason:
                    next_ids.append(self.eos_id)
                    continue
                token = _sample(logits[i], params, generators[i])
                next_ids.append(token)
                self._advance(state, token, params)
            yield states
            if all(s.finish_reason for s in states):
                return
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            with self._rows(loras):
                out = self.model(
                    input_ids=torch.tensor(next_ids).unsqueeze(1),
                    attention_mask=mask,
                    position_ids=positions,
                    cache=out.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )

    def _advance(self, state: RowState, token: int, params: Sampling) -> None:
        if token in self.stop_ids:
            state.finish_reason = "stop"
            return
        state.token_ids.append(token)
        state.text = self.tokenizer.decode(state.token_ids, skip_special_tokens=True)
        for stop in params.stop:
            at = state.text.find(stop)
            if at >= 0:
                state.text, state.finish_reason = state.text[:at], "stop"
                return
        if len(state.token_ids) >= params.max_new_tokens:
            state.finish_reason = "length"

    def generate(self, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
                 loras: Sequence[str | None] | None = None) -> list[RowState]:
        states: list[RowState] = []
        for states in self.decode(visual, instructions, sampling, loras):
            pass
        return states


def _sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> int:
    if params.temperature == 0.0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))
