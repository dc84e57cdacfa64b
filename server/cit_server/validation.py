"""What a request must be before it reaches the model: the one owner of these checks, used by the engine and by
the fuzzer (scripts/fuzz_requests.py) alike. Every refusal is a ValueError (INVALID_ARGUMENT) that says why."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from cit_backbone.images import decode_image

from .config import ServerConfig


@dataclass(frozen=True)
class RequestLimits:
    config: ServerConfig
    prompt_tokens: Callable[[str], int]  # a whole prompt's length in the LM's tokens, for an instruction

    def instruction(self, instruction: str) -> str:
        """Limits in the units that cost: characters first (cheap), then the prompt's tokens (its keys and values
        are what memory and prefill time grow with; rare scripts and emoji take several tokens a character)."""
        if not instruction.strip():
            raise ValueError("instruction is empty")
        if len(instruction) > self.config.max_instruction_chars:
            raise ValueError(f"instruction has {len(instruction)} characters; the limit is "
                             f"{self.config.max_instruction_chars}")
        tokens = self.prompt_tokens(instruction)
        if tokens > self.config.max_prompt_tokens:
            raise ValueError(f"the prompt has {tokens} tokens; the limit is {self.config.max_prompt_tokens} "
                             "(--max-prompt-tokens): shorten the instruction")
        return instruction

    def image(self, data: bytes) -> Image.Image:
        return decode_image(data, self.config.max_image_bytes, self.config.max_image_pixels)
