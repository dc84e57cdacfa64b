"""Would int8 weights pay on this CPU? (issue 15: "int8 where it pays"). A first measurement, not a serving mode.

    python bench/int8.py [--rounds 7] [--rows 8] [--tokens 32]

The default LM five ways, decoding in transformers' own loop (`model(input_ids, cache)`, one token a step, batch
`--rows`, after a 64-token prefill): fp32 as loaded (F.linear), fp32 with the weights packed for oneDNN as cit's LM
keeps them (kernels.pack_linears), PyTorch's dynamic int8 quantisation of every Linear (weights int8 with one
scale per tensor, or one per output row; activations quantised per step: torch.ao.quantization.quantize_dynamic),
and weight-only int8 (weights int8 with one scale per output row, multiplied by aten's _weight_int8pack_mm, the
CPU kernel gpt-fast's int8 mode uses; a quarter of fp32's weight bytes a step) with the activations in float32
(only the weights' rounding can change an answer) or cast to bfloat16 for the matmuls (the kernel's fast path;
the rest of the model stays float32).
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


class WeightOnlyInt8Linear(torch.nn.Module):
    """A Linear with int8 weights, one symmetric scale per output row; the matmul's activations in `compute`."""

    def __init__(self, linear: torch.nn.Linear, compute: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute))
        self.bias, self.compute = linear.bias, compute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.compute).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale).to(x.dtype)
        out = out.view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def weight_only_int8(model, compute: torch.dtype = torch.float32):
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, WeightOnlyInt8Linear(module, compute))
    return model


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
    models["int8-weight"] = weight_only_int8(load(path))
    models["int8-weight-bf16"] = weight_only_int8(load(path), torch.bfloat16)
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
        print(f"  {name:<16} {1000 * statistics.median(s):6.1f} ms  [{1000 * min(s):.1f}, {1000 * max(s):.1f}]")
    for name in ("int8-dynamic", "int8-weight", "int8-weight-bf16"):
        ratios = [p / q for p, q in zip(steps["fp32-packed"], steps[name])]
        print(f"  fp32-packed / {name} per round: {statistics.median(ratios):.2f} [{min(ratios):.2f}, "
              f"{max(ratios):.2f}]")
    answers = {name: [decode(models[name], torch.tensor([ids]), args.tokens)[1][0] for ids in encoded]
               for name in models}
    for name in ("fp32-packed", "int8-dynamic", "int8-channel", "int8-weight", "int8-weight-bf16"):
        same = torch.stack(answers[name]) == torch.stack(answers["fp32"])
        first_diff = [int((~row).nonzero()[0]) if (~row).any() else args.tokens for row in same]
        print(f"greedy tokens of {name} equal fp32's: {same.float().mean():.1%} of {same.numel()}; rows equal to "
              f"the end: {sum(d == args.tokens for d in first_diff)} of {args.rows}; first differing token per row: "
              f"{first_diff}")


if __name__ == "__main__":
    main()
