"""Serving benchmarks: each prints a ratio measured in this one run (this machine is shared and noisy; compare
only numbers from the same run).

    python bench/serving.py [--tokens 16] [--repeats 3]

Builds a throw-away registry of 8 tasks on the real backbone (projections perturbed from the base connector,
every other one with a random LoRA: speed does not depend on what they learnt) and measures:
  1. routing overhead: instruction embedding + FAISS as a share of one end-to-end request of --tokens tokens
     (goal <= 2 %; the image features routing uses are computed for generation anyway);
  2. mixed adapters: tokens/s of 8 requests on 8 tasks in one batch vs 8 on one task (goal >= 0.9);
  3. server vs in-process: tokens/s of 8 concurrent requests over gRPC vs one batched generate (goal >= 0.85);
  4. concurrency scaling: tokens/s over gRPC at concurrency 1, 4, 8, 16;
  5. cold adapter load (EProj and LoRA) as a share of one request (goal <= 5 %), and the part of it running rows
     wait for (the files are read on the adapter store's loader thread);
  7. with --vllm: tokens/s of 8 concurrent mixed-task requests through the engine on vLLM vs embedded (needs
     vLLM's environment, scripts/setup_vllm.sh).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cit_backbone.adapters import TaskAdapter
from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.sampling import Sampling
from cit_registry.router import Router
from cit_registry.store import Registry, TaskCard, TaskKey
from cit_server.adapter_cache import AdapterId
from cit_server.config import ServerConfig
from cit_server.engine import Engine, Request
from cit_server.service import BackgroundServer

TASKS = 8
INSTRUCTION = "Describe the image in detail."


def best_of(repeats: int, fn) -> float:
    """The fastest of several timed runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mean_batch(engine: Engine) -> float:
    """Mean batch size so far, from the server's own cit_batch_size histogram."""
    sample = engine.metrics.registry.get_sample_value
    return sample("cit_batch_size_sum") / max(sample("cit_batch_size_count"), 1)


def build_registry(root: Path, backbone: Backbone, embedder: TextEmbedder) -> Registry:
    reg = Registry.open(root, create=True)
    rng = np.random.default_rng(0)
    for i in range(TASKS):
        connector = backbone.base_connector().clone()
        with torch.no_grad():
            connector.proj.weight.add_(torch.from_numpy(rng.normal(0, 1e-3, connector.proj.weight.shape).astype(np.float32)))
        image = rng.random((4, 1280)).astype(np.float32)
        key = TaskKey.from_embeddings(image, embedder.embed([f"task {i} instruction"] * 4), rng.normal(size=(4, 384)))
        parts = {"adapter": connector.save}
        if i % 2:
            backbone.lm.loras.add("bench")
            with torch.no_grad():
                for n, p in backbone.lm.model.named_parameters():
                    if "lora_B" in n and p.requires_grad:
                        p.normal_(0, 0.02)
            parts["lora"] = lambda d: backbone.lm.loras.save("bench", d)
        reg.commit(TaskCard(f"task{i}", 1, "lora" if i % 2 else "eproj", {"action": "expanded"}), key, parts)
        if i % 2:
            backbone.lm.loras.unload("bench")
    Router.build(reg).save(reg)
    return reg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm", action="store_true", help="also run 7: the vLLM engine vs the embedded one")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone, embedder = Backbone(), TextEmbedder()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(16)]
    png = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png.append(buf.getvalue())
    # min_new_tokens is not a knob here: a high temperature keeps rows from ending early, so every row generates
    # --tokens tokens and tokens/s compares like with like.
    sampling = Sampling(max_new_tokens=args.tokens, temperature=1.0, seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        reg = build_registry(Path(tmp) / "reg", backbone, embedder)
        config = ServerConfig(registry=reg.root, adapter_cache_size=TASKS + 1, max_batch_size=8)
        engine = Engine(config, backbone, embedder)
        ids = [AdapterId(f"task{i}", 1) for i in range(TASKS)]
        adapters = [engine.adapters.get(a) for a in ids]  # resident: batches compare compute, not loading
        request = Request(png[0], INSTRUCTION, sampling, task_id="task1")

        # 1. routing overhead: what routing adds to a request. The image features it uses are the ones generation
        # needs anyway (computed once per request), so they count in the request, not in the overhead.
        image = Image.open(io.BytesIO(png[0]))
        vision = best_of(args.repeats * 3, lambda: backbone.encode_images([image]))
        query = engine.front.embed(png[0], INSTRUCTION).query
        instruction = best_of(args.repeats * 3, lambda: embedder.embed([INSTRUCTION]))
        search = best_of(args.repeats * 3, lambda: engine.front.router().search(query, 5))
        cached = best_of(args.repeats * 3, lambda: engine.front.instruction_embeddings([INSTRUCTION]))
        end_to_end = best_of(args.repeats, lambda: engine.generate(request))
        print(f"1. routing overhead: instruction embedding {instruction * 1000:.1f} ms (a repeated instruction: "
              f"{cached * 1000:.2f} ms from the cache) + FAISS {search * 1000:.2f} ms of a {args.tokens}-token request "
              f"{end_to_end * 1000:.0f} ms = {(instruction + search) / end_to_end:.1%} for a new instruction, "
              f"{(cached + search) / end_to_end:.1%} for a repeated one (goal <= 2 %); the vision tower's "
              f"{vision * 1000:.1f} ms serve routing and generation alike (counted as routing too: "
              f"{(vision + instruction + search) / end_to_end:.1%})")

        # 2. mixed adapters in one batch
        features = backbone.encode_images(images[:8])

        def batch_tokens_per_s(rows: list[TaskAdapter]) -> float:
            states: list = []
            t = best_of(args.repeats, lambda: states.__setitem__(slice(None), backbone.generate(
                features, rows, [INSTRUCTION] * 8, [sampling] * 8)))
            return sum(len(s.token_ids) for s in states) / t
        mixed = batch_tokens_per_s(adapters)
        lora_only, eproj_only = batch_tokens_per_s([adapters[1]] * 8), batch_tokens_per_s([adapters[0]] * 8)
        print(f"2. mixed adapters: 8 tasks in one batch {mixed:.1f} tokens/s vs one LoRA task {lora_only:.1f} "
              f"tokens/s = {mixed / lora_only:.2f}, vs one EProj task {eproj_only:.1f} tokens/s = "
              f"{mixed / eproj_only:.2f} (goal >= 0.9)")

        # 3 and 4. over gRPC vs in-process
        server = BackgroundServer(engine, config)
        port = server.port
        from cit_client import CitClient

        def grpc_tokens_per_s(concurrency: int) -> float:
            with CitClient(f"127.0.0.1:{port}") as client:
                def one(i: int) -> int:
                    return client.generate(png[i % 16], INSTRUCTION, task_id=f"task{i % TASKS}",
                                           max_new_tokens=args.tokens, temperature=1.0, seed=0).completion_tokens
                with ThreadPoolExecutor(concurrency) as pool:
                    list(pool.map(one, range(concurrency)))  # warm-up
                    best = 0.0
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        tokens = sum(pool.map(one, range(concurrency)))
                        best = max(best, tokens / (time.perf_counter() - start))
                return best
        over_grpc = grpc_tokens_per_s(8)
        print(f"3. server vs in-process: 8 concurrent requests over gRPC {over_grpc:.1f} tokens/s vs one batched "
              f"generate {mixed:.1f} tokens/s = {over_grpc / mixed:.2f} (goal >= 0.85)")
        scaling = {c: grpc_tokens_per_s(c) for c in (1, 4, 8, 16)}
        print("4. concurrency scaling over gRPC: " + ", ".join(f"{c}: {v:.1f} tokens/s" for c, v in scaling.items())
              + f" (batches so far: mean size {mean_batch(engine):.1f})")
        server.stop()

        # 5. cold adapter load: all of it, and the part running rows wait for (the read is on the loader thread)
        def cold(adapter: AdapterId) -> tuple[float, float]:
            def load():
                engine.adapters.get(adapter)
                engine.adapters.evict(adapter)
            files = []

            def install():
                engine.adapters.acquire(adapter, files.pop())
                engine.adapters.release(adapter)
                engine.adapters.evict(adapter)
            best_install = float("inf")
            for _ in range(args.repeats):
                files.append(engine.adapters.prefetch(adapter).result())
                best_install = min(best_install, best_of(1, install))
            return best_of(args.repeats, load), best_install
        for a in ids[:2]:
            engine.adapters.evict(a)
        (eproj, eproj_wait), (lora, lora_wait) = cold(ids[0]), cold(ids[1])
        print(f"5. cold adapter load: EProj {eproj * 1000:.1f} ms = {eproj / end_to_end:.1%}, LoRA {lora * 1000:.1f} ms "
              f"= {lora / end_to_end:.1%} of a {args.tokens}-token request (goal <= 5 %); running rows wait only "
              f"for putting it in place after the loader thread read it: EProj {eproj_wait * 1000:.2f} ms, "
              f"LoRA {lora_wait * 1000:.2f} ms")

        # 7. the vLLM engine vs the embedded one, through the same request path
        def engine_tokens_per_s(e: Engine) -> float:
            requests = [Request(png[i], INSTRUCTION, sampling, task_id=f"task{i}") for i in range(TASKS)]
            with ThreadPoolExecutor(TASKS) as pool:
                list(pool.map(e.generate, requests))  # warm-up (and, on vLLM, its LoRAs loaded)
                best = 0.0
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    tokens = sum(c.completion_tokens for _, c in pool.map(e.generate, requests))
                    best = max(best, tokens / (time.perf_counter() - start))
            return best
        embedded = engine_tokens_per_s(engine) if args.vllm else 0.0
        engine.close()
        if args.vllm:
            for a in engine.adapters.resident():  # their LoRAs leave the shared LM before the next engine loads them
                engine.adapters.evict(a)
            from dataclasses import replace

            on_vllm = Engine(replace(config, engine="vllm"), backbone, embedder)
            try:
                vllm = engine_tokens_per_s(on_vllm)
            finally:
                on_vllm.close()
            print(f"7. vLLM vs embedded engine: 8 concurrent requests on 8 tasks {vllm:.1f} tokens/s vs "
                  f"{embedded:.1f} tokens/s = {vllm / embedded:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
