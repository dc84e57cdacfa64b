"""The running batch: rows join between decode steps and leave as they finish (continuous batching). `RunningBatch`
is what the server's engine drives; `DecodeBatch` runs it on the embedded LM, the vLLM engine's batch on a worker."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .language_model import LanguageModel, pad_left, unaxed
from .sampling import RowState, Sampling, sample_token


class RunningBatch(Protocol):
    """Rows decoding together. `join` prefills new rows (each with its projected visual tokens and LoRA) and
    returns their states; every `step` advances each row by a token; a row that ended (or was `remove`d) leaves."""

    def __len__(self) -> int: ...

    def join(self, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
             loras: Sequence[str | None] | None = None) -> list[RowState]: ...

    def step(self) -> None: ...

    def remove(self, state: RowState) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Row:
    state: RowState
    sampling: Sampling
    generator: torch.Generator | None
    lora: str | None
    token: int = -1  # sampled last, fed at the next step


class DecodeBatch:
    """Iteration-level (continuous) batching on the embedded LM: rows join between steps after a prefill of their
    own, and leave as soon as they finish or are removed, so a slot never idles until a whole batch ends.

    Keys and values are left-padded: every row's next token goes into the same column, a row that joined later
    has masked columns on its left, and columns no row attends to any more are cut off. They live in buffers with
    free columns on the right (`KvSlab`): a step writes its token's keys and values in place instead of copying the
    whole cache (transformers' DynamicCache concatenates every layer at every step: 17 % of a step at batch 8).
    """

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self._rows: list[_Row] = []
        self._kv = KvSlab([])
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=lm.device)       # [rows, columns in use]
        self._positions = torch.zeros(0, 1, dtype=torch.long, device=lm.device)  # [rows, 1] each row's last position

    def __len__(self) -> int:
        return len(self._rows)

    @torch.inference_mode()
    def join(self, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
             loras: Sequence[str | None] | None = None) -> list[RowState]:
        """Prefill new rows and sample their first token; their states then advance with every `step`.

        The prompt before the image is the same for every request with that instruction (cit's own prompt: chat
        markup + instruction; an image-first chat template: its markup, for every request): its keys and values
        come from the LM's prefix cache, so only the image and the text after it run per row (vLLM's prefix
        caching, at the granularity cit's prompts have)."""
        from transformers import DynamicCache

        lm = self.lm
        loras = list(loras) if loras is not None else [None] * len(instructions)
        n = len(instructions)
        prompts = [lm.prompt_ids(ins) for ins in instructions]  # (before the image, after it), tokenised once
        prefixes = [lm.prefix(before, lora) for (before, _), lora in zip(prompts, loras)]
        lengths = [kv[0][0].shape[2] for kv in prefixes]
        width = max(lengths)
        kv = [(torch.cat([pad_left(p[layer][0], width - length) for p, length in zip(prefixes, lengths)]),
               torch.cat([pad_left(p[layer][1], width - length) for p, length in zip(prefixes, lengths)]))
              for layer in range(len(prefixes[0]))]
        # The text after the image is the same for every row in cit's own prompt; where the instruction follows the
        # image (prompt.PromptFormat.image_first) it differs: each row's image + text is right-aligned, and the
        # columns between its prefix and it are masked (positions run on from the prefix, as if they were not there).
        posts = [tuple(after) for _, after in prompts]
        embedded = {post: lm.embed(list(post)) for post in set(posts)}
        owns = [visual.shape[1] + len(post) for post in posts]
        suffix = max(owns)
        emb = torch.zeros(n, suffix, lm.hidden_size, dtype=lm.dtype, device=lm.device)
        mask = torch.zeros(n, width + suffix, dtype=torch.long)
        relative = [lm.image_text_positions(visual.shape[1], len(post)) for post in posts]  # [axes, own] each
        positions = torch.zeros(relative[0].shape[0], n, suffix, dtype=torch.long)
        prompt = torch.zeros(n, suffix, dtype=torch.bool)  # every row's own columns: all prompt, no answer yet
        for i, (length, own, post) in enumerate(zip(lengths, owns, posts)):
            emb[i, suffix - own :] = torch.cat([visual[i].to(lm.device, lm.dtype), embedded[post]])
            mask[i, width - length : width] = 1
            mask[i, width + suffix - own :] = 1
            prompt[i, suffix - own :] = True
            positions[:, i] = length  # the masked columns' (nothing attends to them)
            positions[:, i, suffix - own :] += relative[i]
        mask, positions = mask.to(lm.device), positions.to(lm.device)
        with lm.loras.rows(loras):
            out = lm.model(inputs_embeds=emb, attention_mask=lm.attention(mask, prompt.to(lm.device)),
                           position_ids=unaxed(positions),
                           cache=DynamicCache(kv, config=lm.model.config), use_cache=True, logits_to_keep=1)
        rows = [_Row(RowState(prompt_tokens=length + own), s,
                     torch.Generator().manual_seed(s.seed) if s.seed is not None else None, lora)
                for length, own, s, lora in zip(lengths, owns, sampling, loras)]
        # Transactional: a row enters the batch only once its first token is sampled; one that fails (or is done
        # after one token) stays out, so no later step can trip over it.
        self._sample(out.logits[:, -1, :], rows)
        live = [i for i, r in enumerate(rows) if not r.state.finish_reason]
        if live:
            index = torch.tensor(live, device=lm.device)
            # a row's last prompt token is text, at one position on every axis: decoding runs on from it
            self._append([(k[index], v[index]) for k, v, *_ in out.cache], mask[index], positions[0, index, -1:],
                         [rows[i] for i in live])
        return [r.state for r in rows]

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every row in the batch."""
        if not self._rows:
            return
        lm = self.lm
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        positions = self._positions + 1
        self._kv.reserve(1)
        with lm.loras.rows([r.lora for r in self._rows]):
            out = lm.model(input_ids=torch.tensor([[r.token] for r in self._rows], device=lm.device), attention_mask=mask,
                           position_ids=positions, cache=self._kv.cache(), use_cache=True, logits_to_keep=1)
        # the batch changes only once the forward pass has succeeded (a failed one wrote only free columns)
        self._kv.used += 1
        self._mask, self._positions = mask, positions
        self._sample(out.logits[:, -1, :], self._rows)
        if any(r.state.finish_reason for r in self._rows):
            self._keep([i for i, r in enumerate(self._rows) if not r.state.finish_reason])

    def close(self) -> None:
        """Nothing to release (the vLLM engine's batch has a connection to close)."""

    def remove(self, state: RowState) -> None:
        """Stop decoding a row (its client went away); its slot is free at once."""
        self._keep([i for i, r in enumerate(self._rows) if r.state is not state])

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """The next token of every row, from float32 logits on the CPU (one copy per step); a row whose sampling
        fails (e.g. its adapter made the logits NaN) ends with its own error and the others go on."""
        logits = logits.float().cpu()
        for i, row in enumerate(rows):
            try:
                row.token = sample_token(logits[i], row.sampling, row.generator)
                self.lm.advance(row.state, row.token, row.sampling)
            except Exception as exc:  # noqa: BLE001 - this row's failure, reported to its request only
                row.state.fail(exc)

    def _append(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, positions: torch.Tensor,
                rows: list[_Row]) -> None:
        if self._rows:  # left-pad the shorter side so the last columns line up
            width = max(mask.shape[1], self._mask.shape[1])
            old, new = self._mask.shape[1], mask.shape[1]
            self._kv = KvSlab.stacked([self._kv.layers(), kv], width)
            mask = torch.cat([pad_left(self._mask, width - old), pad_left(mask, width - new)])
            positions = torch.cat([self._positions, positions])
            rows = self._rows + rows
        else:
            self._kv = KvSlab.stacked([kv], mask.shape[1])
        self._mask, self._positions, self._rows = mask, positions, rows

    def _keep(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device)
        mask = self._mask[index]
        used = mask.any(dim=0).nonzero()  # columns before the first one any row still attends to are dropped
        start = int(used[0]) if len(used) else mask.shape[1]
        self._mask = mask[:, start:]
        self._kv = KvSlab.stacked([[(k[index, :, start:], v[index, :, start:]) for k, v in self._kv.layers()]],
                                  mask.shape[1] - start)
        self._positions = self._positions[index]
        self._rows = [self._rows[i] for i in keep]


class KvSlab:
    """The running batch's keys and values: per layer one buffer [rows, heads, capacity, dim] whose first `used`
    columns hold the cache and whose other columns are free for the next tokens. Rows joining or leaving build a
    new slab (a copy per event); a step writes in place, and the slab grows by SPARE columns when it is full."""

    SPARE = 64  # free columns a new slab gets: a copy every 64 steps instead of every step

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor]], used: int = 0) -> None:
        self.buffers = buffers
        self.used = used

    @classmethod
    def stacked(cls, parts: list[list[tuple[torch.Tensor, torch.Tensor]]], width: int) -> KvSlab:
        """A slab holding the rows of each part (per layer keys/values [rows, heads, columns, dim], columns <=
        width), right-aligned at `width` columns (left-padded with zeros, which the mask hides)."""
        buffers = []
        for layer in zip(*parts):
            rows, (_, heads, _, dim) = sum(k.shape[0] for k, _ in layer), layer[0][0].shape
            keys = layer[0][0].new_zeros(rows, heads, width + cls.SPARE, dim)
            values = torch.zeros_like(keys)
            at = 0
            for k, v in layer:
                keys[at : at + len(k), :, width - k.shape[2] : width] = k
                values[at : at + len(v), :, width - v.shape[2] : width] = v
                at += len(k)
            buffers.append((keys, values))
        return cls(buffers, width)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the keys and values in use (views)."""
        return [(k[:, :, : self.used], v[:, :, : self.used]) for k, v in self.buffers]

    def reserve(self, columns: int) -> None:
        """Make room for `columns` more tokens."""
        if self.buffers and self.used + columns > self.buffers[0][0].shape[2]:
            self.buffers = KvSlab.stacked([self.layers()], self.used).buffers

    def cache(self) -> Cache:
        """A transformers cache over the slab for one forward pass; its writes go into the free columns."""
        return Cache(layers=[_SlabLayer(k, v, self.used) for k, v in self.buffers])


class _SlabLayer(DynamicLayer):
    """One layer of KvSlab as transformers' cache layer: `update` writes the new tokens' keys and values into the
    buffer's free columns and returns views of the columns in use."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, used: int) -> None:
        super().__init__()
        self.buffers, self.used = (keys, values), used
        self.keys, self.values = keys[:, :, :used], values[:, :, :used]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.buffers
        end = self.used + key_states.shape[2]
        keys[:, :, self.used : end] = key_states
        values[:, :, self.used : end] = value_states
        self.used = end
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.used


def generate(lm: LanguageModel, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
             loras: Sequence[str | None] | None = None) -> list[RowState]:
    """Decode a batch to its end in one call (row i through LoRA loras[i]; None or absent: the plain LM)."""
    batch = DecodeBatch(lm)
    states = batch.join(visual, instructions, sampling, loras)
    while len(batch):
        batch.step()
    return states
