"""The frozen language model (SmolLM2-135M-Instruct by default): its prompt (prompt.py), its training loss, and
the prefix cache that training and decoding share. Its LoRAs are owned by lora.LoraManager (`lm.loras`), the running batch lives in
decode_batch.py, sampling in sampling.py, and the one-time GGUF conversion in conversion.py."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .conversion import converted_lm_dir
from .kernels import pack_linears
from .lora import LoraManager
from .numerics import CPU_FLOAT32, Numerics
from .prompt import CIT_CHATML, PromptFormat
from .sampling import RowState, Sampling, advance

# Keys and values of prompt prefixes (chat markup + instruction) kept for reuse, bounded in bytes: one token of
# SmolLM2-135M's prefix holds 30 layers x 2 x 3 heads x 64 x 4 bytes = 45 KiB, so an entry count says little.
PREFIX_CACHE_BYTES = 256 * 1024 * 1024
LM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # written into LoRA configs as their base model


def prompt_length(encode, instruction: str, visual_tokens: int, prompt: PromptFormat = CIT_CHATML) -> int:
    """Length of a request's whole prompt in tokens (`encode`: the LM tokenizer's): what its prefill and its keys
    and values cost. The tokenizer alone suffices, so request checks can run without the model."""
    before, after = prompt.texts(instruction)
    return len(encode(before)) + visual_tokens + len(encode(after))


@dataclass(frozen=True)
class VisualLayout:
    """Where a family's LM puts a prompt's visual tokens and what they attend to. The default: a plain causal LM,
    positions counted from 0, one per token."""

    visual_grid: tuple[int, int] | None = None  # multimodal RoPE (Qwen2-VL): the visual tokens' rows x columns
    # PaliGemma: the image and the prompt text after it attend to each other both ways (it counts positions from 1;
    # rotary attention depends on differences only, so cit's from 0 give the same numbers: tested)
    prefix_lm: bool = False

    @property
    def plain(self) -> bool:
        """One position per token, causal attention: what a prompt-embeddings engine (vLLM) can run."""
        return self == VisualLayout()


class LanguageModel:
    def __init__(self, path: Path | None = None, numerics: Numerics = CPU_FLOAT32,
                 prompt: PromptFormat = CIT_CHATML, layout: VisualLayout = VisualLayout()) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path = path or converted_lm_dir()
        self.numerics, self.prompt = numerics, prompt
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._tokenizer_lock = threading.Lock()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=numerics.dtype, device_map=str(numerics.device))
        self.model.eval().requires_grad_(False)
        pack_linears(self.model)  # frozen CPU weights packed once for oneDNN: decode steps ~3x faster in their matmuls
        self.hidden_size: int = self.model.config.hidden_size
        sections = getattr(self.model.config, "cit_mrope_section", None)
        if (sections is None) != (layout.visual_grid is None):
            raise ValueError("an LM with multimodal RoPE needs the visual tokens' grid, and only such an LM takes one")
        if sections is not None:
            self.model.model.rotary_emb = MultimodalRotary(self.model.model.rotary_emb, sections)
        self.layout = layout
        self.eos_id: int = self.encode(prompt.end_of_turn)[0]  # ends an answer: decoding stops, labels end with it
        self.stop_ids = {self.eos_id, self.tokenizer.eos_token_id}
        self._prefixes: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._prefix_bytes: dict[tuple, int] = {}
        self.prefix_cache_bytes = PREFIX_CACHE_BYTES  # the bound; the server sets its --prefix-cache-bytes
        # rows name the LoRA they use; a LoRA whose weights change takes its cached prefixes with it
        self.loras = LoraManager(self.model, LM_NAME, on_change=self._drop_prefixes)

    @property
    def device(self) -> torch.device:
        return self.numerics.device

    @property
    def dtype(self) -> torch.dtype:
        return self.numerics.dtype

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:  # front threads check prompt lengths while the scheduler thread encodes
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, instruction: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual tokens."""
        before, after = self.prompt.texts(instruction)
        return self.encode(before), self.encode(after)

    def prompt_tokens(self, instruction: str, visual_tokens: int) -> int:
        return prompt_length(self.encode, instruction, visual_tokens, self.prompt)

    def image_text_positions(self, visual_tokens: int, text_tokens: int) -> torch.Tensor:
        """Positions of a row's visual tokens and the text after them, counted from the end of its prefix: [1, V + T]
        (0, 1, 2, ...), or [3, V + T] under multimodal RoPE (as Qwen2-VL's get_rope_index:
        visual tokens at (0, row, column) of the grid, the text from max(rows, columns) on in all three)."""
        if self.layout.visual_grid is None:
            return torch.arange(visual_tokens + text_tokens).unsqueeze(0)
        rows, columns = self.layout.visual_grid
        if rows * columns != visual_tokens:
            raise ValueError(f"{visual_tokens} visual tokens do not fill the {rows} x {columns} grid")
        grid = torch.stack([torch.zeros(visual_tokens, dtype=torch.long), torch.arange(rows).repeat_interleave(columns),
                            torch.arange(columns).repeat(rows)])
        return torch.cat([grid, (max(rows, columns) + torch.arange(text_tokens)).expand(3, -1)], dim=1)

    def attention(self, mask: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The attention mask of a forward pass over new columns. `mask` [rows, keys]: 1 where a column is real;
        `prompt` [rows, new columns]: the new columns that are prompt (image and the text after it; not answer, not
        padding). A causal LM takes `mask` as it is; a prefix LM (PaliGemma) an additive [rows, 1, new, keys] one:
        prompt columns see every prompt column of their row, the others the real columns up to themselves, and every
        column itself: a padding column with an empty prefix (PaliGemma's) would otherwise see nothing, and a row of
        nothing but the dtype's minimum turns to -inf and NaN where float16 adds scores and mask in float16, a NaN
        that reaches the real rows through the next layer's keys and values."""
        if not self.layout.prefix_lm:
            return mask
        rows, keys = mask.shape
        start = keys - prompt.shape[1]
        query = torch.arange(start, keys, device=mask.device)[:, None]
        key = torch.arange(keys, device=mask.device)[None, :]
        prompt_keys = torch.cat([prompt.new_zeros(rows, start), prompt], dim=1)
        allowed = ((key <= query) | (prompt[:, :, None] & prompt_keys[:, None, :])) & mask[:, None, :].bool()
        allowed |= key == query
        additive = torch.zeros(rows, 1, *allowed.shape[1:], dtype=self.dtype, device=mask.device)
        return additive.masked_fill(~allowed[:, None], torch.finfo(self.dtype).min)

    def answer_ids(self, answer: str) -> list[int]:
        return self.encode(answer) + [self.eos_id]

    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.model.get_input_embeddings()(torch.tensor(ids, dtype=torch.long, device=self.device))

    def prompt_embeddings(self, visual: torch.Tensor, instructions: Sequence[str]) -> list[torch.Tensor]:
        """Per row: the whole prompt's embeddings [L, H], visual tokens in place."""
        rows = []
        for i, instruction in enumerate(instructions):
            pre, post = self.prompt_ids(instruction)
            rows.append(torch.cat([self.embed(pre), visual[i].to(self.dtype), self.embed(post)]))
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
        """Logits [T, vocab] (float32) at every position that predicts an answer token, and those tokens [T] (row order).

        The prompt before the image is the same for every row with the same instruction: its keys and values come
        from the prefix cache, and only image + answer positions run, for all rows in one pass (prefixes of
        different instructions left-padded to one width, suffixes right-padded).
        """
        from transformers import DynamicCache

        prefix_of: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        prefixes, suffixes, prompt_lengths = [], [], []
        for row, instruction in enumerate(instructions):
            pre, post = self.prompt_ids(instruction)
            if instruction not in prefix_of:
                prefix_of[instruction] = self.prefix(pre, lora)
            prefixes.append(prefix_of[instruction])
            ans = self.answer_ids(answers[row])
            prompt_lengths.append(visual.shape[1] + len(post))
            suffixes.append((torch.cat([visual[row], self.embed(post + ans)]), [-100] * prompt_lengths[-1] + ans))
        rows, lengths = len(suffixes), [p[0][0].shape[2] for p in prefixes]
        width, length = max(lengths), max(len(lab) for _, lab in suffixes)
        emb = torch.zeros(rows, length, self.hidden_size, dtype=self.dtype, device=self.device)  # `visual` cast in
        labels = torch.full((rows, length), -100, dtype=torch.long)
        mask = torch.zeros(rows, width + length, dtype=torch.long)
        for i, ((e, lab), n) in enumerate(zip(suffixes, lengths)):
            emb[i, : len(lab)], labels[i, : len(lab)] = e, torch.tensor(lab)
            mask[i, width - n : width + len(lab)] = 1
        prompt = torch.zeros(rows, length, dtype=torch.bool)  # the image and the text after it, not the answer
        for i, own in enumerate(prompt_lengths):
            prompt[i, :own] = True
        labels, mask, prompt = labels.to(self.device), mask.to(self.device), prompt.to(self.device)
        kv = [tuple(torch.cat([pad_left(p[layer][part], width - n) for p, n in zip(prefixes, lengths)])
                    for part in (0, 1)) for layer in range(len(prefixes[0]))]
        relative = self.image_text_positions(visual.shape[1], length - visual.shape[1])  # [axes, length]
        positions = unaxed(torch.tensor(lengths).view(1, -1, 1) + relative.unsqueeze(1)).to(self.device)
        with self.loras.rows([lora] * rows):
            hidden = self.model.model(inputs_embeds=emb, attention_mask=self.attention(mask, prompt), position_ids=positions,
                                      cache=DynamicCache(kv, config=self.model.config), use_cache=True).last_hidden_state
        # Logits only where an answer token is predicted: the 49k-wide head is a fifth of the model's compute.
        targets = labels[:, 1:]
        keep = targets != -100
        return self.model.get_output_embeddings()(hidden[:, :-1][keep]).float(), targets[keep]

    def prefix(self, ids: list[int], lora: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [1, heads, len, dim] of a prompt prefix; an LRU of the latest prefixes.
        A LoRA being trained changes the prefix at every step: it is recomputed, with gradients, each time."""
        if not ids:  # a prompt that starts with the image (PaliGemma's): no keys, no values
            config = self.model.config
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            empty = torch.zeros(1, config.num_key_value_heads, 0, dim, dtype=self.dtype, device=self.device)
            return [(empty, empty)] * config.num_hidden_layers
        if self.loras.training(lora):
            with self.loras.rows([lora]):
                out = self.model.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
            return [(k, v) for k, v, *_ in out.cache]
        key = (lora, *ids)
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return self._prefixes[key]
        # Plain tensors even when first asked under inference mode: later training steps save them for backward.
        with torch.inference_mode(False), torch.no_grad(), self.loras.rows([lora]):
            out = self.model.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
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

    def advance(self, state: RowState, token: int, params: Sampling) -> None:
        """Add a sampled token to a row (sampling.advance with this LM's tokenizer and end-of-turn tokens)."""
        advance(state, token, params, lambda ids: str(self.tokenizer.decode(ids, skip_special_tokens=True)), self.stop_ids)


def pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """n zero columns before the sequence axis of keys/values [rows, heads, seq, dim] or a mask [rows, seq]."""
    if n == 0:
        return t
    axis = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[axis] = n
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def unaxed(positions: torch.Tensor) -> torch.Tensor:
    """Positions [axes, rows, L] as the LM takes them: [rows, L] for plain RoPE, all axes for multimodal RoPE."""
    return positions[0] if positions.shape[0] == 1 else positions


class MultimodalRotary(torch.nn.Module):
    """Qwen2-VL's multimodal RoPE over a plain LM's rotary embedding: with positions [3, rows, L] (temporal,
    height, width) each section of the head's frequencies turns with its own axis (`sections`: frequencies per
    axis, cycling); positions [rows, L] are text, the same on every axis, which is plain RoPE."""

    def __init__(self, rotary: torch.nn.Module, sections: list[int]) -> None:
        super().__init__()
        self.rotary, self.sections = rotary, list(sections) * 2  # cos / sin repeat their frequencies in two halves

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 2:
            return self.rotary(x, position_ids)
        cos, sin = zip(*(self.rotary(x, axis) for axis in position_ids))  # [rows, L, dim] per axis
        return self._mix(cos), self._mix(sin)

    def _mix(self, per_axis: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Section i of the frequencies from axis i mod 3."""
        chunks = [part.split(self.sections, dim=-1) for part in per_axis]
        return torch.cat([chunks[i % 3][i] for i in range(len(self.sections))], dim=-1)
