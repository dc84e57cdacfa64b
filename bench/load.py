"""Load: many mixed requests at high concurrency against one cit-server over loopback.

    python bench/load.py --registry cit-registry --tasks tasks/fashion-mnist tasks/digits tasks/words \
        --requests 10000 --concurrency 64 [--max-new-tokens 4]
    python bench/load.py --registry cit-registry --tasks ... --overload 4 --max-requests 64 --requests 4000

Overload mode (--overload F): the server admits --max-requests requests, and F times as many clients send requests
without pause; a refused client backs off as gRPC's retry policy does (--retry-backoff; 0 makes a retry storm), and
the clients' first requests go out at once or spread over --ramp seconds. Goals: every call succeeds or is refused
with RESOURCE_EXHAUSTED, each refusal within 100 ms; a health probe every 0.2 s (deadline 1 s) is answered SERVING
throughout; resident memory within 10 %.

Starts its own cit-server on the registry, warms it up at full concurrency (so caches, resident adapters and the
allocator's pools for full batches exist before memory is first read), then sends the requests (test samples of
the given tasks, round robin, plus one unroutable request in 16) as `concurrency` concurrent calls from one
asyncio client (grpc.aio) over one channel.
Prints errors by status (goal 0), latency percentiles, throughput, and the server's resident memory after warm-up,
after every tenth of the run and at the end (goal: the end within 10 % of the start). Exit status 1 when a goal is
missed.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cit_client import CitClient
from cit_proto import cit_pb2_grpc
from cit_registry.taskdata import read_jsonl
from cit_server.process import ServerProcess


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


def health_probes(target: str, stop: threading.Event, seconds: list[float], failures: Counter) -> None:
    """Probe health every 0.2 s with a 1 s deadline, as an orchestrator's liveness check would."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.wait(0.2):
            t0 = time.perf_counter()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service="cit.v1.Cit"), timeout=1.0).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    failures[health_pb2.HealthCheckResponse.ServingStatus.Name(status)] += 1
            except grpc.RpcError as exc:
                failures[exc.code().name] += 1
            seconds.append(time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--tasks", type=Path, nargs="*", default=[])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=None,
                        help="the server's admission bound (default: --concurrency)")
    parser.add_argument("--overload", type=float, default=None,
                        help="overload mode: this many clients per admitted request")
    parser.add_argument("--retry-backoff", type=float, default=0.1, metavar="S",
                        help="overload mode: a refused client waits random(0, S) before its next request, S growing "
                             "x1.6 per refusal up to 2 s (gRPC's retry policy); 0: retry at once (a retry storm)")
    parser.add_argument("--ramp", type=float, default=0.0, metavar="S",
                        help="clients send their first request spread evenly over S seconds (0: all at once)")
    args = parser.parse_args()
    bound = args.max_requests or args.concurrency
    clients = round(args.overload * bound) if args.overload else args.concurrency

    requests = workload(args.tasks)
    server = ServerProcess(args.registry, "--max-requests", str(bound))
    proc, target = server.proc, server.target
    stop_probes, health_seconds, health_failures = threading.Event(), [], Counter()
    try:
        with CitClient(target, timeout=3600) as client:
            with ThreadPoolExecutor(min(clients, bound)) as pool:  # warm-up: every task, at full admission
                list(pool.map(lambda r: client.generate(*r, max_new_tokens=args.max_new_tokens),
                              [requests[i % len(requests)] for i in range(4 * min(clients, bound))]))
            rss_start = rss_mib(proc.pid)
            rss_series: list[float] = []
            latencies: list[float] = []
            refused: list[float] = []
            errors: Counter = Counter()

            # The measured calls come from one asyncio loop (grpc.aio), `clients` of them in flight at once: 256
            # blocking threads on 2 cores would time their own GIL convoy as much as the server's answer.
            async def send_all() -> None:
                sent = iter(range(args.requests))
                rng = np.random.default_rng(0)
                async with grpc.aio.insecure_channel(target) as channel:
                    stub = cit_pb2_grpc.CitStub(channel)

                    async def one_client(k: int) -> None:
                        await asyncio.sleep(k * args.ramp / clients)
                        backoff = args.retry_backoff
                        for i in sent:
                            image, instruction = requests[i % len(requests)]
                            request = CitClient.request(image, instruction, max_new_tokens=args.max_new_tokens)
                            t0 = time.perf_counter()
                            try:
                                await stub.Generate(request, timeout=3600)
                                latencies.append(time.perf_counter() - t0)
                                backoff = args.retry_backoff
                            except grpc.aio.AioRpcError as exc:
                                if args.overload and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                                    refused.append(time.perf_counter() - t0)
                                    # gRPC's retry policy (A6): wait random(0, backoff), backoff grows x1.6 to 2 s
                                    await asyncio.sleep(rng.uniform(0, backoff))
                                    backoff = min(backoff * 1.6, 2.0)
                                else:
                                    errors[exc.code().name] += 1
                            if (i + 1) % max(1, args.requests // 10) == 0:
                                rss_series.append(rss_mib(proc.pid))

                    await asyncio.gather(*(one_client(k) for k in range(clients)))

            probes = threading.Thread(target=health_probes, args=(target, stop_probes, health_seconds,
                                                                   health_failures))
            probes.start()
            start = time.perf_counter()
            asyncio.run(send_all())
            wall = time.perf_counter() - start
            stop_probes.set()
            probes.join()
            rss_end = rss_mib(proc.pid)
    finally:
        stop_probes.set()
        server.stop()

    p = np.percentile(latencies, [50, 90, 99]) if latencies else [float("nan")] * 3
    growth = rss_end / rss_start - 1
    mode = f"overload x{args.overload:g}: {clients} clients, admission bound {bound}" if args.overload else \
        f"concurrency {clients}"
    mode += f", first requests over {args.ramp:g} s" if args.ramp else ", first requests at once"
    print(f"{args.requests} requests, {mode}, max_new_tokens {args.max_new_tokens}, "
          f"{len(args.tasks)} task(s) + unroutable: {wall:.0f} s, {len(latencies) / wall:.1f} answered/s")
    print(f"errors: {sum(errors.values())} {dict(errors) if errors else ''}")
    print(f"answered {len(latencies)}: latency p50 {p[0]:.2f} s, p90 {p[1]:.2f} s, p99 {p[2]:.2f} s, "
          f"max {max(latencies, default=float('nan')):.2f} s")
    ok = not errors and abs(growth) <= 0.10
    if args.overload:
        r = np.percentile(refused, [50, 99]) * 1000 if refused else [float("nan")] * 2
        slowest = max(refused, default=0.0)
        print(f"refused {len(refused)} (RESOURCE_EXHAUSTED, {len(refused) / wall:.0f}/s, retry backoff "
              f"{args.retry_backoff:g} s): p50 {r[0]:.1f} ms, p99 {r[1]:.1f} ms, max {slowest * 1000:.1f} ms "
              f"(goal: every refusal <= 100 ms)")
        ok = ok and bool(refused) and slowest <= 0.100
    h = max(health_seconds, default=float("nan"))
    print(f"health: {len(health_seconds)} probes, {sum(health_failures.values())} not SERVING in 1 s "
          f"{dict(health_failures) if health_failures else ''}, slowest {h * 1000:.0f} ms")
    print(f"server resident memory: {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end ({growth:+.1%}); "
          f"every tenth of the run: {', '.join(f'{r:.0f}' for r in rss_series)} MiB")
    return 0 if ok and not health_failures else 1


if __name__ == "__main__":
    sys.exit(main())
