"""The frozen language model (SmolLM2-135M-Instruct) and the decode loop that turns visual tokens into text."""
from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .paths import LM_GGUF_FILE, cache_dir, lm_gguf_dir

# Keys and values of prompt prefixes (chat markup + instruction) kept for reuse, bounded in bytes: one token of
# SmolLM2-135M's prefix holds 30 layers x 2 x 3 heads x 64 x 4 bytes = 45 KiB, so an entry count says little.
PREFIX_CACHE_BYTES = 256 * 1024 * 1024
# vLLM's rule: a temperature this small is greedy decoding (dividing logits by it overflows).
GREEDY_BELOW = 1e-5
LM_CACHE_NAME = "smollm2-135m-instruct"
LM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # written into LoRA configs as their base model
BASE_ROWS = "__base__"  # PEFT's name for "no LoRA" in a mixed batch
MAX_NEW_TOKENS_LIMIT = 512
# The chat template's default system prompt is left out on purpose: 24 constant tokens per row cost training
# time and teach nothing the connector needs. The image ends the user turn, after the instruction: everything
# before it is then the same for all rows of a task, so training computes that prefix once (see `loss`).
USER_PREFIX = "<|im_start|>user\n"
ASSISTANT_PREFIX = "<|im_end|>\n<|im_start|>assistant\n"


def prompt_texts(instruction: str) -> tuple[str, str]:
    """The chat-formatted text before and after a request's visual tokens."""
    return USER_PREFIX + instruction + "\n", ASSISTANT_PREFIX


def prompt_length(encode, instruction: str, visual_tokens: int) -> int:
    """Length of a request's whole prompt in tokens (`encode`: the LM tokenizer's): what its prefill and its keys
    and values cost. The tokenizer alone suffices, so request checks can run without the model."""
    before, after = prompt_texts(instruction)
    return len(encode(before)) + visual_tokens + len(encode(after))


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
    return save_to_cache(model, tokenizer, target)


def save_to_cache(model, tokenizer, target: Path) -> Path:
    """Write a model and its tokenizer to `target` atomically: a concurrent writer either wins or finds the
    finished copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class Sampling:
    """How to decode one request. A temperature below GREEDY_BELOW (0 included) is greedy."""

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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class RowState:
    """One row of a decode: its tokens, the text so far (stop string cut off) and why it ended ("stop", "length",
    or "error" with the row's own `error`: the other rows go on)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    error: Exception | None = None

    def fail(self, error: Exception) -> None:
        self.finish_reason, self.error = "error", error

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

        self.path = path = path or converted_lm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.hidden_size: int = self.model.config.hidden_size
        self.eos_id: int = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = {self.eos_id, self.tokenizer.eos_token_id}
        self._prefixes: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._prefix_bytes: dict[tuple, int] = {}
        self._tokenizer_lock = threading.Lock()
        self.prefix_cache_bytes = PREFIX_CACHE_BYTES  # the bound; the server sets its --prefix-cache-bytes
        self.peft = None              # peft.PeftModel around `model`, created when the first LoRA arrives
        self._lora_layers: list[torch.nn.Module] = []  # PEFT's LoRA layers, found once per injection
        self._names: dict[str, str] = {}  # LoRA name -> PEFT's adapter name
        self._counter = itertools.count()
        self._training: set[str] = set()  # LoRAs being trained: their prefixes change every step, never cached
        self._slot_config = None           # serving: the shape of the LoRA slots (see lora_slots)
        self._slot_count = 0               # slots wanted
        self._free_slots: list[str] = []   # injected and unused
        self._slots_made = 0
        self._slot_params: dict[str, dict[str, torch.nn.Parameter]] = {}

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

    def lora_slots(self, count: int, rank: int = 8, alpha: int = 16,
                   targets: tuple[str, ...] = ("q_proj", "v_proj")) -> None:
        """Serving: keep `count` LoRAs of this shape injected (vLLM's slots). Loading a LoRA of the same shape then
        copies its weights into a free slot (milliseconds) instead of building its modules; unloading frees the
        slot. The slots are injected at the first load, so a server without LoRA tasks never pays for them."""
        from peft import LoraConfig

        if self._slots_made and (rank, alpha, set(targets)) != (self._slot_config.r, self._slot_config.lora_alpha,
                                                                set(self._slot_config.target_modules)):
            raise ValueError("LoRA slots of another shape exist already")
        self._slot_count = max(count, self._slots_made)
        self._slot_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                                       base_model_name_or_path=LM_NAME, task_type="CAUSAL_LM")

    def _fits_slot(self, directory: Path) -> bool:
        from peft import LoraConfig

        if self._slot_config is None:
            return False
        config, slot = LoraConfig.from_pretrained(str(directory)), self._slot_config
        return (config.r, config.lora_alpha, set(config.target_modules), config.use_rslora, config.use_dora,
                config.bias) == (slot.r, slot.lora_alpha, set(slot.target_modules), False, False, "none")

    def read_lora(self, directory: Path) -> dict[str, torch.Tensor] | None:
        """A saved LoRA's weights, when it fits the slots (else None: PEFT reads it at load). Changes nothing, so a
        loader thread can read ahead of `load_lora`."""
        from safetensors.torch import load_file

        return load_file(str(directory / "adapter_model.safetensors")) if self._fits_slot(directory) else None

    def _load_into_slot(self, name: str, directory: Path, weights: dict[str, torch.Tensor] | None) -> bool:
        """Copy a LoRA (its weights, read from `directory` unless given) into a free slot; False when none is free."""
        from peft import PeftModel
        from safetensors.torch import load_file

        if self._slots_made < self._slot_count:  # first use (or more slots asked for): inject them once
            for i in range(self._slots_made, self._slot_count):
                if self.peft is None:
                    self.peft = PeftModel(self.model, self._slot_config, adapter_name=f"slot{i}")
                else:
                    self.peft.add_adapter(f"slot{i}", self._slot_config)
                self._free_slots.append(f"slot{i}")
            self._slots_made = self._slot_count
            self._settle()
        if not self._free_slots:
            return False
        internal = self._free_slots.pop()  # the most recently freed first
        params = self._slot_parameters(internal)
        if weights is None:
            weights = load_file(str(directory / "adapter_model.safetensors"))
        if set(weights) != set(params) or any(weights[k].shape != params[k].shape for k in weights):
            self._free_slots.append(internal)
            raise ValueError(f"{directory}: its weights do not match the LoRA modules of this LM")
        with torch.no_grad():  # a copy per tensor: no module is built, no state dict of the whole model walked
            for key, value in weights.items():
                params[key].copy_(value)
        self._names[name] = internal
        return True

    def _slot_parameters(self, internal: str) -> dict[str, torch.nn.Parameter]:
        """A slot's parameters by the names they have in a saved LoRA (PEFT's names without the adapter's)."""
        if internal not in self._slot_params:
            self._slot_params[internal] = {n.replace(f".{internal}.", "."): p for n, p in self.peft.named_parameters()
                                           if f".{internal}." in n}
        return self._slot_params[internal]

    def load_lora(self, name: str, directory: Path, trainable: bool = False,
                  weights: dict[str, torch.Tensor] | None = None) -> None:
        """Load a LoRA saved in PEFT's format (by `save_lora`, or by PEFT itself); `weights`: read ahead by
        `read_lora`."""
        from peft import PeftModel

        if name in self._names:
            raise ValueError(f"a LoRA named {name!r} is loaded already")
        fits = weights is not None or self._fits_slot(directory)  # weights read ahead fit (read_lora checked)
        if not trainable and fits and self._load_into_slot(name, directory, weights):
            return
        _only_safetensors(Path(directory))  # PEFT's own loader reads the directory from here on
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
        self._drop_prefixes(name)
        self._settle()

    def unload_lora(self, name: str) -> None:
        import warnings

        internal = self._names.pop(name)
        if internal.startswith("slot"):
            self._free_slots.append(internal)  # its weights stay until the next load overwrites them: no row uses it
        else:
            with warnings.catch_warnings():  # PEFT warns that the deleted adapter was "active"; rows never use that
                warnings.simplefilter("ignore")
                self.peft.delete_adapter(internal)
        self._training.discard(name)
        self._drop_prefixes(name)

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
        from peft.tuners.lora import LoraLayer

        training = {f".{self._names[n]}." for n in self._training}
        for n, p in self.model.named_parameters():
            p.requires_grad_("lora_" in n and any(t in n for t in training))
        self.peft.eval()  # PEFT refuses per-row adapter names in training mode; there is no dropout anyway
        self._lora_layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]

    def _rows(self, loras: Sequence[str | None]):
        """Context in which row i of the next forward passes uses LoRA loras[i] (None: the plain LM)."""
        from contextlib import nullcontext

        if self.peft is None:
            if any(loras):
                raise ValueError(f"no LoRA is loaded, but rows ask for {sorted({n for n in loras if n})}")
            return nullcontext()
        return self._adapter_names([self._internal(n) if n else BASE_ROWS for n in loras])

    @contextmanager
    def _adapter_names(self, names: list[str]) -> Iterator[None]:
        """What PeftModel.forward does with `adapter_names` (each LoRA layer gets them as a keyword), for the bare
        decoder too (the trainer runs it without the LM head), and with the layers found once: PEFT walks the whole
        module tree twice per forward pass to find them (18 ms of a ~130 ms decode step here, slots injected)."""
        def pass_names(module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs

        handles = [layer.register_forward_pre_hook(pass_names, with_kwargs=True) for layer in self._lora_layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:  # front threads check prompt lengths while the scheduler thread encodes
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens."""
        before, after = prompt_texts(instruction)
        return self.encode(before), self.encode(after)

    def prompt_tokens(self, instruction: str, visual_tokens: int) -> int:
        return prompt_length(self.encode, instruction, visual_tokens)

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
        """Logits [T, vocab] at every position that predicts an answer token, and those tokens [T] (row order).

        The prompt before the image is the same for every row with the same instruction: its keys and values come
        from the prefix cache, and only image + answer positions run, for all rows in one pass (prefixes of
        different instructions left-padded to one width, suffixes right-padded).
        """
        from transformers import DynamicCache

        prefix_of: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        prefixes, suffixes = [], []
        for row, instruction in enumerate(instructions):
            pre, post = self.prompt_ids(instruction)
            if instruction not in prefix_of:
                prefix_of[instruction] = self._prefix(pre, lora)
            prefixes.append(prefix_of[instruction])
            ans = self.answer_ids(answers[row])
            suffixes.append((torch.cat([visual[row], self._embed(post + ans)]),
                             [-100] * (visual.shape[1] + len(post)) + ans))
        rows, lengths = len(suffixes), [p[0][0].shape[2] for p in prefixes]
        width, length = max(lengths), max(len(lab) for _, lab in suffixes)
        emb = torch.zeros(rows, length, self.hidden_size)
        labels = torch.full((rows, length), -100, dtype=torch.long)
        mask = torch.zeros(rows, width + length, dtype=torch.long)
        for i, ((e, lab), n) in enumerate(zip(suffixes, lengths)):
            emb[i, : len(lab)], labels[i, : len(lab)] = e, torch.tensor(lab)
            mask[i, width - n : width + len(lab)] = 1
        kv = [tuple(torch.cat([_pad_left(p[layer][part], width - n) for p, n in zip(prefixes, lengths)])
                    for part in (0, 1)) for layer in range(len(prefixes[0]))]
        positions = torch.tensor(lengths).unsqueeze(1) + torch.arange(length)
        with self._rows([lora] * rows):
            hidden = self.model.model(inputs_embeds=emb, attention_mask=mask, position_ids=positions,
                                      cache=DynamicCache(kv, config=self.model.config), use_cache=True).last_hidden_state
        # Logits only where an answer token is predicted: the 49k-wide head is a fifth of the model's compute.
        targets = labels[:, 1:]
        keep = targets != -100
        return self.model.get_output_embeddings()(hidden[:, :-1][keep]), targets[keep]

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
        size = sum(k.nbytes + v.nbytes for k, v in kv)
        if size <= self.prefix_cache_bytes:  # a prefix larger than the whole cache is used once, not kept
            self._prefixes[key], self._prefix_bytes[key] = kv, size
            while self.prefix_bytes() > self.prefix_cache_bytes:
                oldest = next(iter(self._prefixes))  # least recently used
                del self._prefixes[oldest], self._prefix_bytes[oldest]
        return kv

    def prefix_bytes(self) -> int:
        """Bytes of keys and values the prefix cache holds now (at most `prefix_cache_bytes`)."""
        return sum(self._prefix_bytes.values())

    def _drop_prefixes(self, lora: str) -> None:
        """A LoRA's cached prefixes go when it is unloaded or starts or stops training (its weights change)."""
        for key in [k for k in self._prefixes if k[0] == lora]:
            del self._prefixes[key], self._prefix_bytes[key]

    def decode(
        self, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
        loras: Sequence[str | None] | None = None,
    ) -> Iterator[list[RowState]]:
        """Decode a batch, one step at a time; yields the row states after every step (the last with all finished).
        Row i runs through LoRA loras[i] (None or absent: the plain LM)."""
        batch = DecodeBatch(self)
        states = batch.join(visual, instructions, sampling, loras)
        yield states
        while len(batch):
            batch.step()
            yield states

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


@dataclass
class _Row:
    state: RowState
    sampling: Sampling
    generator: torch.Generator | None
    lora: str | None
    token: int = -1  # sampled last, fed at the next step


class DecodeBatch:
    """Iteration-level (continuous) batching: rows join between steps after a prefill of their own, and leave as
    soon as they finish or are removed, so a slot never idles until a whole batch ends.

    Keys and values are left-padded: every row's next token sits in the last column, a row that joined later
    has masked columns on its left, and columns no row attends to any more are cut off.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self._rows: list[_Row] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer [rows, heads, columns, dim]
        self._mask = torch.zeros(0, 0, dtype=torch.long)        # [rows, columns]
        self._positions = torch.zeros(0, 1, dtype=torch.long)   # [rows, 1] position of each row's last token

    def __len__(self) -> int:
        return len(self._rows)

    @torch.inference_mode()
    def join(self, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
             loras: Sequence[str | None] | None = None) -> list[RowState]:
        """Prefill new rows and sample their first token; their states then advance with every `step`.

        The prompt before the image (chat markup + instruction) is the same for every request with that
        instruction: its keys and values come from the LM's prefix cache, so only the image and the text after it
        run per row (vLLM's prefix caching, at the granularity cit's prompts have)."""
        from transformers import DynamicCache

        lm = self.lm
        loras = list(loras) if loras is not None else [None] * len(instructions)
        n = len(instructions)
        prefixes = [lm._prefix(lm.prompt_ids(ins)[0], lora) for ins, lora in zip(instructions, loras)]
        lengths = [kv[0][0].shape[2] for kv in prefixes]
        width = max(lengths)
        kv = [(torch.cat([_pad_left(p[layer][0], width - length) for p, length in zip(prefixes, lengths)]),
               torch.cat([_pad_left(p[layer][1], width - length) for p, length in zip(prefixes, lengths)]))
              for layer in range(len(prefixes[0]))]
        post = lm._embed(lm.prompt_ids(instructions[0])[1])  # the same for every instruction
        emb = torch.cat([visual, post.expand(n, -1, -1)], dim=1)
        suffix = emb.shape[1]
        mask = torch.ones(n, width + suffix, dtype=torch.long)
        for i, length in enumerate(lengths):
            mask[i, : width - length] = 0
        positions = torch.tensor(lengths).unsqueeze(1) + torch.arange(suffix)
        with lm._rows(loras):
            out = lm.model(inputs_embeds=emb, attention_mask=mask, position_ids=positions,
                           cache=DynamicCache(kv, config=lm.model.config), use_cache=True, logits_to_keep=1)
        rows = [_Row(RowState(prompt_tokens=length + suffix), s,
                     torch.Generator().manual_seed(s.seed) if s.seed is not None else None, lora)
                for length, s, lora in zip(lengths, sampling, loras)]
        # Transactional: a row enters the batch only once its first token is sampled; one that fails (or is done
        # after one token) stays out, so no later step can trip over it.
        self._sample(out.logits[:, -1, :], rows)
        live = [i for i, r in enumerate(rows) if not r.state.finish_reason]
        if live:
            index = torch.tensor(live)
            self._append([(k[index], v[index]) for k, v, *_ in out.cache], mask[index], positions[index, -1:],
                         [rows[i] for i in live])
        return [r.state for r in rows]

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every row in the batch."""
        if not self._rows:
            return
        from transformers import DynamicCache

        lm = self.lm
        mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long)], dim=1)
        positions = self._positions + 1
        with lm._rows([r.lora for r in self._rows]):
            out = lm.model(input_ids=torch.tensor([[r.token] for r in self._rows]), attention_mask=mask,
                           position_ids=positions, cache=DynamicCache(self._kv, config=lm.model.config),
                           use_cache=True, logits_to_keep=1)
        # the batch changes only once the forward pass has succeeded
        self._kv, self._mask, self._positions = [(k, v) for k, v, *_ in out.cache], mask, positions
        self._sample(out.logits[:, -1, :], self._rows)
        if any(r.state.finish_reason for r in self._rows):
            self._keep([i for i, r in enumerate(self._rows) if not r.state.finish_reason])

    def close(self) -> None:
        """Nothing to release (the vLLM engine's batch has a connection to close)."""

    def remove(self, state: RowState) -> None:
        """Stop decoding a row (its client went away); its slot is free at once."""
        self._keep([i for i, r in enumerate(self._rows) if r.state is not state])

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """The next token of every row; a row whose sampling fails (e.g. its adapter made the logits NaN) ends
        with its own error and the others go on."""
        for i, row in enumerate(rows):
            try:
                row.token = _sample(logits[i], row.sampling, row.generator)
                self.lm._advance(row.state, row.token, row.sampling)
            except Exception as exc:  # noqa: BLE001 - this row's failure, reported to its request only
                row.state.fail(exc)

    def _append(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, positions: torch.Tensor,
                rows: list[_Row]) -> None:
        if self._rows:  # left-pad the shorter side so the last columns line up
            width = max(mask.shape[1], self._mask.shape[1])
            old, new = self._mask.shape[1], mask.shape[1]
            kv = [(torch.cat([_pad_left(k0, width - old), _pad_left(k1, width - new)]),
                   torch.cat([_pad_left(v0, width - old), _pad_left(v1, width - new)]))
                  for (k0, v0), (k1, v1) in zip(self._kv, kv)]
            mask = torch.cat([_pad_left(self._mask, width - old), _pad_left(mask, width - new)])
            positions = torch.cat([self._positions, positions])
            rows = self._rows + rows
        self._kv, self._mask, self._positions, self._rows = kv, mask, positions, rows

    def _keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        mask = self._mask[index]
        used = mask.any(dim=0).nonzero()  # columns before the first one any row still attends to are dropped
        start = int(used[0]) if len(used) else mask.shape[1]
        self._mask = mask[:, start:]
        self._kv = [(k[index, :, start:], v[index, :, start:]) for k, v in self._kv]
        self._positions = self._positions[index]
        self._rows = [self._rows[i] for i in keep]


def _only_safetensors(directory: Path) -> None:
    """PEFT's loader falls back to a pickled adapter_model.bin when there is no adapter_model.safetensors:
    unpickling runs code, so such a directory is refused before PEFT sees it."""
    pickled = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle"))
    if pickled or not (directory / "adapter_model.safetensors").is_file():
        raise ValueError(f"{directory}: a LoRA is read from adapter_model.safetensors only"
                         + (f"; refusing pickled files {', '.join(pickled)}" if pickled else ""))


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """n zero columns before the sequence axis of keys/values [rows, heads, seq, dim] or a mask [rows, seq]."""
    if n == 0:
        return t
    axis = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[axis] = n
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def _sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> int:
    if params.greedy:
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
