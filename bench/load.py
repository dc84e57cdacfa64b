"""Load: many mixed requests at high concurrency against one cit-server over loopback.

    python bench/load.py --registry cit-registry --tasks tasks/fashion-mnist tasks/digits tasks/words \
        --requests 10000 --concurrency 64 [--max-new-tokens 4]

Starts its own cit-server on the registry, warms it up at full concurrency (so caches, resident adapters and the
allocator's pools for full batches exist before memory is first read), then sends the requests (test samples of
the given tasks, round robin, plus one unroutable request in 16) from `concurrency` threads over one channel.
Prints errors by status (goal 0), latency percentiles, throughput, and the server's resident memory after warm-up,
after every tenth of the run and at the end (goal: the end within 10 % of the start). Exit status 1 when a goal is
missed.
"""
from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from cit_client import CitClient
from cit_registry.taskdata import read_jsonl


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def workload(tasks: list[Path]) -> list[tuple[bytes, str]]:
    rows = []
    for task in tasks:
        rows += [(s.image.read_bytes(), s.instruction) for s in read_jsonl(task / "test.jsonl")]
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (250, 120, 30)).save(buf, format="PNG")
    unroutable = (buf.getvalue(), "Compose a limerick about tax law in medieval Venice.")
    if not rows:
        return [unroutable]
    mixed = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    return [unroutable if i % 16 == 15 else mixed[i % len(mixed)] for i in range(len(mixed) + len(mixed) // 15)]


def start_server(registry: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(["cit-server", "--registry", str(registry), "--port", "0", "--workers", "96"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on ([\d.]+:\d+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError("cit-server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--tasks", type=Path, nargs="*", default=[])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    args = parser.parse_args()

    requests = workload(args.tasks)
    proc, target = start_server(args.registry)
    # The server's log goes to a pipe nobody reads during the run: drain it so it can never block the server.
    drain = ThreadPoolExecutor(1)
    drain.submit(lambda: [None for _ in proc.stdout])
    try:
        with CitClient(target, timeout=3600) as client:
            with ThreadPoolExecutor(args.concurrency) as pool:  # warm-up: every task, at full concurrency
                list(pool.map(lambda r: client.generate(*r, max_new_tokens=args.max_new_tokens),
                              [requests[i % len(requests)] for i in range(4 * args.concurrency)]))
            rss_start = rss_mib(proc.pid)
            rss_series: list[float] = []
            latencies: list[float] = []
            errors: Counter = Counter()

            def one(i: int) -> None:
                image, instruction = requests[i % len(requests)]
                t0 = time.perf_counter()
                try:
                    client.generate(image, instruction, max_new_tokens=args.max_new_tokens)
                    latencies.append(time.perf_counter() - t0)
                except grpc.RpcError as exc:
                    errors[exc.code().name] += 1
                if (i + 1) % max(1, args.requests // 10) == 0:
                    rss_series.append(rss_mib(proc.pid))

            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - start
            rss_end = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        drain.shutdown()

    p = np.percentile(latencies, [50, 90, 99]) if latencies else [float("nan")] * 3
    growth = rss_end / rss_start - 1
    print(f"{args.requests} requests, concurrency {args.concurrency}, max_new_tokens {args.max_new_tokens}, "
          f"{len(args.tasks)} task(s) + unroutable: {wall:.0f} s, {args.requests / wall:.1f} requests/s")
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"latency p50 {p[0]:.2f} s, p90 {p[1]:.2f} s, p99 {p[2]:.2f} s, max {max(latencies, default=float('nan')):.2f} s")
    print(f"server resident memory: {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end ({growth:+.1%}); "
          f"every tenth of the run: {', '.join(f'{r:.0f}' for r in rss_series)} MiB")
    return 0 if not errors and abs(growth) <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
