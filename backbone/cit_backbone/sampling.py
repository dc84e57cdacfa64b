"""How one request decodes: its sampling parameters, its row state, and the choice and bookkeeping of each token.
Shared by the embedded running batch (decode_batch.py) and the vLLM engine's batch, so a row ends for the same
reasons on either."""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

# vLLM's rule: a temperature this small is greedy decoding (dividing logits by it overflows).
GREEDY_BELOW = 1e-5
MAX_NEW_TOKENS_LIMIT = 512


@dataclass(frozen=True)
class Sampling:
    """How to decode one request. A temperature below GREEDY_BELOW (0 included) is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Decode max_new_tokens tokens whatever the model says (vLLM's ignore_eos): for benchmarks, which must fix
    # the work per row. Stop strings still end a row.
    ignore_eos: bool = False

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


def advance(state: RowState, token: int, params: Sampling, detokenize: Callable[[list[int]], str],
            stop_ids: Collection[int]) -> None:
    """Add a sampled token to a row: it ends on an end-of-turn token, a stop string (cut off) or its length."""
    if token in stop_ids and not params.ignore_eos:
        state.finish_reason = "stop"
        return
    state.token_ids.append(token)
    state.text = detokenize(state.token_ids)
    for stop in params.stop:
        at = state.text.find(stop)
        if at >= 0:
            state.text, state.finish_reason = state.text[:at], "stop"
            return
    if len(state.token_ids) >= params.max_new_tokens:
        state.finish_reason = "length"


def sample_token(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's logits [vocab]: argmax when greedy, else temperature, top-k and top-p."""
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
