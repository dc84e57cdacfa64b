"""Where a request's instruction and visual tokens go in the LM's prompt, and what ends an answer.

cit's default backbone writes its own ChatML prompt (`CIT_CHATML`): the image ends the user turn, after the
instruction, and no system prompt (24 constant tokens a row that teach the connector nothing). Everything before the
image is then the same for every row of a task, so training and decoding take it from the prefix cache.

A Hugging Face checkpoint's backbone writes what its own chat template writes (`from_chat_template`), with the image
where its family puts it: first in the user turn (LLaVA, Qwen2-VL, Idefics3 all do). The text before the image is
then the template's constant markup (one prefix-cache entry for every request), and the instruction runs with the
image and the assistant markup in each row's own prefill: the running batch pads those per-row parts to a common
width (decode_batch.DecodeBatch.join), so rows of different instructions still batch. PaliGemma has no template:
its processor's prompt starts with the image (nothing before it: an empty prefix).
"""
from __future__ import annotations

from dataclasses import dataclass

INSTRUCTION = "\x00cit-instruction\x00"  # markers no template writes and no tokenizer merges with markup
IMAGE = "\x00cit-image\x00"
ANSWER = "\x00cit-answer\x00"


@dataclass(frozen=True)
class PromptFormat:
    """A prompt around the visual tokens: `before` the image and `after` it, the instruction's place (INSTRUCTION)
    in exactly one of them; `end_of_turn`: the text the LM writes after an answer (its first token ends decoding
    and ends every training label)."""

    before: str
    after: str
    end_of_turn: str

    def __post_init__(self) -> None:
        if (self.before + self.after).count(INSTRUCTION) != 1:
            raise ValueError("a prompt format has exactly one place for the instruction")
        if not self.end_of_turn:
            raise ValueError("a prompt format needs the text that ends an answer")

    @property
    def image_first(self) -> bool:
        """The instruction follows the image: the text before the image is the same for every request."""
        return INSTRUCTION in self.after

    def texts(self, instruction: str) -> tuple[str, str]:
        """The text before and after a request's visual tokens."""
        return self.before.replace(INSTRUCTION, instruction), self.after.replace(INSTRUCTION, instruction)

    @classmethod
    def from_chat_template(cls, tokenizer, around_image: tuple[str, str] = ("", ""),
                           separator: str = "\n") -> PromptFormat:
        """The format a tokenizer's chat template writes for one user turn holding the image, `separator` (a line
        break; Qwen2-VL's processor writes none) and the instruction, followed by the assistant's turn;
        `around_image`: markup the family writes just before and after the image's tokens. ValueError when it has no
        template or the template does not keep the user's text as given (a template that, say, strips or escapes it
        cannot place the image)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the checkpoint's tokenizer has no chat template: cit writes prompts with it")
        user = {"role": "user", "content": f"{IMAGE}{separator}{INSTRUCTION}"}
        prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        answered = tokenizer.apply_chat_template([user, {"role": "assistant", "content": ANSWER}], tokenize=False)
        if prompt.count(IMAGE) != 1 or prompt.count(INSTRUCTION) != 1 or answered.count(ANSWER) != 1:
            raise ValueError("the checkpoint's chat template does not keep the user's text as given, so cit cannot "
                             "place the image in it")
        before, after = prompt.split(IMAGE)
        end_of_turn = answered.split(ANSWER)[1] or (tokenizer.eos_token or "")
        return cls(before + around_image[0], around_image[1] + after, end_of_turn)


# cit's own prompt for its default backbone (SmolLM2's ChatML without the system prompt); changing it changes what
# every registered task was trained on.
CIT_CHATML = PromptFormat(f"<|im_start|>user\n{INSTRUCTION}\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")
