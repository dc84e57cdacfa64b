"""Would int8 weights pay on this CPU? (issue 15: "int8 where it pays"). A first measurement, not a serving mode.

    python bench/int8.py [--rounds 7] [--rows 8] [--tokens 32]

The default LM four ways, decoding in transformers' own loop (`model(input_ids, cache)`, one token a step, batch
`--rows`, after a 64-token prefill): fp32 as loaded (F.linear), fp32 with the weights packed for oneDNN as cit's LM
keeps them (kernels.pack_linears), and PyTorch's dynamic int8 quantisation of every Linear (weights int8 with one
scale per tensor, or one per output row; activations quantised per step: torch.ao.quantization.quantize_dynamic).
Configurations alternate within each round; the median step per round, then median [min, max] over rounds. Then
what int8 does to answers: each row's own chat prompt (text only, a task's training wording; one row at a time, so
no padding) decoded greedily, against fp32's tokens, token by token.
Not measured here: answers of trained tasks (adapters are trained in fp32; the server warns when it serves another
precision than a task was trained in), LoRA on quantised layers (PEFT wraps nn.Linear only).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from cit_backbone.conversion import converted_lm_dir
from cit_backbone.kernels import pack_linears
from cit_trainer.data import TEMPLATES


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    """Median seconds per decode step and the greedy tokens [rows, tokens]."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    ids, steps = [out.logits[:, -1].argmax(-1)], []
    for _ in range(tokens - 1):
        start = time.perf_counter()
        out = model(input_ids=ids[-1][:, None], cache=cache, use_cache=True, logits_to_keep=1)
        ids.append(out.logits[:, -1].argmax(-1))
        steps.append(time.perf_counter() - start)
    return statistics.median(steps), torch.stack(ids, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.ao's quantisation API is deprecated
    path = converted_lm_dir()
    models = {"fp32": load(path), "fp32-packed": load(path)}
    pack_linears(models["fp32-packed"])
    models["int8-dynamic"] = torch.ao.quantization.quantize_dynamic(load(path), {torch.nn.Linear}, dtype=torch.qint8)
    models["int8-channel"] = torch.ao.quantization.quantize_dynamic(  # a scale per output row, not per tensor
        load(path), {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
    tokenizer = AutoTokenizer.from_pretrained(path)
    wordings = [w for t in TEMPLATES.values() for w in t.train][: args.rows]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": w}], tokenize=False,
                                           add_generation_prompt=True) for w in wordings]
    # timing: one 64-token prompt per row (its chat repeated to fill it: no padding, so no mask)
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
    prompt = torch.tensor([(ids * (64 // len(ids) + 1))[-64:] for ids in encoded])
    steps: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        names = list(models)[r % len(models):] + list(models)[: r % len(models)]
        for name in names:
            steps[name].append(decode(models[name], prompt, args.tokens)[0])
    print(f"decode step, batch {args.rows}, {args.tokens} tokens a row, {args.rounds} rounds, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads:")
    for name, s in steps.items():
        print(f"  {name:<13} {1000 * statistics.median(s):6.1f} ms  [{1000 * min(s):.1f}, {1000 * max(s):.1f}]")
    ratios = [p / q for p, q in zip(steps["fp32-packed"], steps["int8-dynamic"])]
    print(f"  fp32-packed / int8-dynamic per round: {statistics.median(ratios):.2f} [{min(ratios):.2f}, "
          f"{max(ratios):.2f}]")
    answers = {name: [decode(models[name], torch.tensor([ids]), args.tokens)[1][0] for ids in encoded]
               for name in models}
    for name in ("fp32-packed", "int8-dynamic", "int8-channel"):
        same = torch.stack(answers[name]) == torch.stack(answers["fp32"])
        first_diff = [int((~row).nonzero()[0]) if (~row).any() else args.tokens for row in same]
        print(f"greedy tokens of {name} equal fp32's: {same.float().mean():.1%} of {same.numel()}; rows equal to "
              f"the end: {sum(d == args.tokens for d in first_diff)} of {args.rows}; first differing token per row: "
              f"{first_diff}")


if __name__ == "__main__":
    main()
