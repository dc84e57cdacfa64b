"""Memory under the worst prompts the server admits: 64 distinct instructions, each as long in tokens as
--max-prompt-tokens allows (rare characters: several tokens each), against one cit-server with its defaults.

    python scripts/prompt_memory.py [--variants 64] [--unbounded]

Prints the server's resident memory after a warm-up request, after the 64 requests and its peak, for three
servers: the defaults; the prefix cache off (--prefix-cache-bytes 0), which leaves what full batches of the
longest prompts cost by themselves (their keys and values, prefill activations, allocator pools); and, with
--unbounded, the cache bound lifted (what the byte bound prevents: the cache used to be bounded by entry count
only). The check: the defaults grow by at most the cache-off growth plus the prefix cache's bytes
(--prefix-cache-bytes) plus 64 MiB of slack. Exit status 1 when the bound is exceeded.
"""
from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from transformers import AutoTokenizer

from cit_backbone.conversion import converted_lm_dir
from cit_backbone.language_model import PREFIX_CACHE_BYTES, prompt_length
from cit_client import CitClient
from cit_registry.store import Registry
from cit_server.config import ServerConfig

KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M: layers x (keys, values) x kv heads x head dim x fp32
RARE = "\U0001f9ec\u9f98\u7f4e\u29d7\U0001f6f8\u0b8a"  # emoji and rare scripts: several tokens a character


def memory(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def worst_instructions(count: int, max_tokens: int, visual: int = 1) -> list[str]:
    """`count` distinct instructions whose prompts have exactly `max_tokens` tokens (as the server counts them)."""
    tokenizer = AutoTokenizer.from_pretrained(converted_lm_dir())
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731 - as the LM encodes
    tokens = lambda text: prompt_length(encode, text, visual)  # noqa: E731
    out = []
    for i in range(count):
        text = f"{i}:"
        while tokens(text + RARE[len(text) % len(RARE)]) <= max_tokens:
            text += RARE[len(text) % len(RARE)]
        assert tokens(text) <= max_tokens and len(text) <= ServerConfig.max_instruction_chars, (tokens(text), len(text))
        out.append(text)
    return out


def run(registry: Path, instructions: list[str], extra: list[str]) -> tuple[float, float, float, int]:
    proc = subprocess.Popen(["cit-server", "--registry", str(registry), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = None
    for line in proc.stdout:
        m = re.search(r"listening on ([\d.]+:\d+)", line)
        if m:
            target = m.group(1)
            break
    ThreadPoolExecutor(1).submit(lambda: [None for _ in proc.stdout])  # keep draining its log
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 40, 200)).save(buf, format="PNG")
    try:
        with CitClient(target, timeout=600) as client:
            client.generate(buf.getvalue(), "Describe the image.", max_new_tokens=1)
            before, _ = memory(proc.pid)
            with ThreadPoolExecutor(ServerConfig.max_batch_size) as pool:
                answered = sum(1 for r in pool.map(
                    lambda text: client.generate(buf.getvalue(), text, max_new_tokens=1), instructions)
                    if r.completion_tokens >= 1)
            time.sleep(1)
            after, peak = memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return before, after, peak, answered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=64)
    parser.add_argument("--unbounded", action="store_true", help="also run with the prefix cache bound lifted")
    args = parser.parse_args()
    limit = ServerConfig.max_prompt_tokens
    instructions = worst_instructions(args.variants, limit)
    print(f"{len(instructions)} distinct instructions of {min(map(len, instructions))}-{max(map(len, instructions))} "
          f"characters, each a prompt of {limit} tokens (--max-prompt-tokens)")
    batch = ServerConfig.max_batch_size * (limit + 1) * KV_BYTES_PER_TOKEN

    def report(label, before, after, peak, answered):
        grew = max(after, peak) - before
        print(f"{label}: {answered} answered; resident {before:.0f} MiB after warm-up, {after:.0f} MiB after, "
              f"peak {peak:.0f} MiB: grew {grew:.0f} MiB")
        return grew, answered

    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry.open(Path(tmp) / "reg", create=True).root
        off, _ = report("prefix cache off", *run(registry, instructions, ["--prefix-cache-bytes", "0"]))
        print(f"  (a full batch's keys and values alone: {batch / 2**20:.0f} MiB; the rest is prefill activations "
              "and allocator pools)")
        grew, answered = report(f"defaults (prefix cache {PREFIX_CACHE_BYTES / 2**20:.0f} MiB)",
                                *run(registry, instructions, []))
        bound = off + PREFIX_CACHE_BYTES / 2**20 + 64
        print(f"  bound {bound:.0f} MiB = cache-off growth {off:.0f} + prefix cache "
              f"{PREFIX_CACHE_BYTES / 2**20:.0f} + 64 MiB")
        if args.unbounded:
            report("prefix cache unbounded", *run(registry, instructions, ["--prefix-cache-bytes", str(1 << 40)]))
            print(f"  ({args.variants} x {limit} tokens x {KV_BYTES_PER_TOKEN / 1024:.0f} KiB = "
                  f"{args.variants * limit * KV_BYTES_PER_TOKEN / 2**20:.0f} MiB of cached prefixes)")
    ok = grew <= bound and answered == len(instructions)
    print("within the bound" if ok else "OVER THE BOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
