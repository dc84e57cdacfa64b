"""The serving path, like for like, in interleaved rounds: what routing costs on a real request, time to first
token against the plain library pipeline, gRPC against in-process, and the embedded engine against cit's vLLM path.

    python bench/serving.py [--rounds 7] [--vllm]

A throw-away registry of 8 tasks on the real backbone (projections perturbed from the base connector, every other
one with a random LoRA; speed does not depend on what they learnt), keyed on the requests' own images and one
instruction per task, so a request with no task_id routes to the task it would be forced to. A cit server runs
in this process (BackgroundServer: the real gRPC path, the engine's scheduler and batch). Every configuration
runs once per round in an order rotated from round to round; ratios are taken within a round and reported as
median [min, max] over rounds. Sampled at temperature 1 with a seed, so a routed request and the same request
forced generate the same tokens (asserted) and rows rarely end early; token counts are asserted equal where
compared.

Configurations:
  routed / forced    8 requests one after another over gRPC, 2 tokens each (real answers are 1-3 tokens), with no
                     task_id (embed the instruction, FAISS, floors) / with the task_id the router picks
  ttft-cit           time to the first streamed token over gRPC at concurrency 1 (an EProj task, resident)
  ttft-plain         the plain pipeline for the same request, called directly: decode the PNG, vision tower,
                     the task's projection, one prefill of the whole prompt by transformers (an untouched LM copy),
                     argmax
  grpc-8 / inproc-8  8 requests on 8 tasks at once, 16 tokens: over gRPC / one batched backbone.generate
  embedded-8 / vllm-8  (--vllm) 8 concurrent requests on 8 tasks, 16 tokens, through the engine (Engine.generate
                     from 8 threads): embedded / on cit's vLLM worker (a second engine with its own backbone)
After the rounds: tokens/s over gRPC at concurrency 1, 4, 8, 16, and the cold load of an EProj and a LoRA adapter
(medians of 5).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cit_backbone.backbone import Backbone
from cit_backbone.embedder import TextEmbedder
from cit_backbone.sampling import Sampling
from cit_client import CitClient
from cit_registry.router import Router
from cit_registry.store import Registry, TaskCard, TaskKey
from cit_server.adapter_cache import AdapterId
from cit_server.config import ServerConfig
from cit_server.engine import Engine, Request
from cit_server.service import BackgroundServer

TASKS = 8
INSTRUCTIONS = [f"Task {i}: describe what the picture number {i} shows." for i in range(TASKS)]


def summary(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):.3f}{unit} [{min(values):.3f}, {max(values):.3f}]"


def build_registry(root: Path, backbone: Backbone, embedder: TextEmbedder, images: list[Image.Image]) -> Registry:
    """Task i: a projection near the base connector (a random LoRA on odd i), keyed on image i (four slightly
    jittered copies of its features) and INSTRUCTIONS[i]."""
    reg = Registry.open(root, create=True)
    rng = np.random.default_rng(0)
    features = backbone.routing_features(backbone.encode_images(images[:TASKS])).numpy()
    for i in range(TASKS):
        connector = backbone.base_connector().clone()
        with torch.no_grad():
            connector.proj.weight.add_(torch.from_numpy(rng.normal(0, 1e-3, connector.proj.weight.shape).astype(np.float32)))
        image = features[i] + rng.normal(0, 1e-3, (4, features.shape[1])).astype(np.float32)
        key = TaskKey.from_embeddings(image, embedder.embed([INSTRUCTIONS[i]] * 4), rng.normal(size=(4, 384)))
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


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--vllm", action="store_true", help="also cit's vLLM worker path (.venv-vllm)")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone, embedder = Backbone(), TextEmbedder()
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(TASKS)]
    png = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        png.append(buf.getvalue())
    from transformers import AutoModelForCausalLM

    plain_lm = AutoModelForCausalLM.from_pretrained(backbone.lm.path, dtype=torch.float32).eval()
    sampled: dict = {"temperature": 1.0, "seed": 0}  # the client's keyword arguments; Sampling's below

    with tempfile.TemporaryDirectory() as tmp:
        reg = build_registry(Path(tmp) / "reg", backbone, embedder, images)
        config = ServerConfig(registry=reg.root, adapter_cache_size=TASKS + 1, max_batch_size=8)
        engine = Engine(config, backbone, embedder)
        ids = [AdapterId(f"task{i}", 1) for i in range(TASKS)]
        adapters = [engine.adapters.get(a) for a in ids]  # resident: rounds compare compute, not loading
        server = BackgroundServer(engine, config)
        client = CitClient(f"127.0.0.1:{server.port}", timeout=600)
        routes = [client.route(png[i], INSTRUCTIONS[i]).route for i in range(TASKS)]
        assert all(r.task_id == f"task{i}" and not r.fell_back for i, r in enumerate(routes)), routes
        on_vllm = None
        if args.vllm:
            on_vllm = Engine(replace(config, engine="vllm"), Backbone(), embedder)
        pool = ThreadPoolExecutor(16)

        def sequential(routed: bool) -> tuple[int, ...]:
            return tuple(client.generate(png[i], INSTRUCTIONS[i], None if routed else f"task{i}", max_new_tokens=2,
                                         **sampled).completion_tokens for i in range(TASKS))

        def ttft_cit() -> float:
            start, first = time.perf_counter(), None
            for message in client.generate_stream(png[0], INSTRUCTIONS[0], "task0", max_new_tokens=1):
                if first is None and (message.delta or message.finish_reason):
                    first = time.perf_counter() - start
            assert first is not None  # a stream ends with its finish_reason
            return first

        def ttft_plain() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                features = backbone.encode_images([Image.open(io.BytesIO(png[0])).convert("RGB")])
                visual = adapters[0].connector(features)
                prompt = backbone.lm.prompt_embeddings(visual, [INSTRUCTIONS[0]])[0]
                int(plain_lm(inputs_embeds=prompt[None]).logits[0, -1].argmax())
            return time.perf_counter() - start

        def grpc_8() -> int:
            return sum(pool.map(lambda i: client.generate(png[i], INSTRUCTIONS[i], f"task{i}", max_new_tokens=16,
                                                          **sampled).completion_tokens, range(TASKS)))

        features = backbone.encode_images(images)

        def inproc_8() -> int:
            states = backbone.generate(features, adapters, INSTRUCTIONS, [Sampling(max_new_tokens=16, temperature=1.0, seed=0)] * 8)
            return sum(len(s.token_ids) for s in states)

        def through(e: Engine) -> Callable[[], int]:
            requests = [Request(png[i], INSTRUCTIONS[i], Sampling(max_new_tokens=16, temperature=1.0, seed=0), f"task{i}")
                        for i in range(TASKS)]
            return lambda: sum(c.completion_tokens for _, c in pool.map(e.generate, requests))

        configs: dict[str, Callable[[], object]] = {
            "routed": lambda: sequential(True), "forced": lambda: sequential(False),
            "ttft-cit": ttft_cit, "ttft-plain": ttft_plain, "grpc-8": grpc_8, "inproc-8": inproc_8}
        if on_vllm is not None:
            configs |= {"embedded-8": through(engine), "vllm-8": through(on_vllm)}
        for fn in configs.values():  # warm-up: first calls, caches, the vLLM worker's LoRAs
            fn()
        times: dict[str, list[float]] = {name: [] for name in configs}
        outputs: dict[str, list[object]] = {name: [] for name in configs}
        names = list(configs)
        load = os.getloadavg()[0]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                seconds, out = timed(configs[name])
                if name.startswith("ttft"):
                    seconds = float(out)  # type: ignore[arg-type]  # ttft functions return their own time
                times[name].append(seconds)
                outputs[name].append(out)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in order), flush=True)
        assert outputs["routed"] == outputs["forced"], "a routed request generated other tokens than forced"
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

        def ratio(a: str, b: str, per: Callable[[str, int], float] = lambda n, r: times[n][r]) -> list[float]:
            return [per(a, r) / per(b, r) for r in range(args.rounds)]

        def tokens_per_s(name: str, r: int) -> float:
            return float(outputs[name][r]) / times[name][r]  # type: ignore[arg-type]  # token counts

        print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); load "
              f"average (1 min) {load:.2f} before, {os.getloadavg()[0]:.2f} after; this process used {cpu:.0f} s of "
              f"CPU in {wall:.0f} s")
        print(f"{args.rounds} rounds; median [min, max] over rounds\n")
        print("seconds per configuration")
        for name in names:
            print(f"  {name:<12} {summary(times[name])}")
        print("per-round ratios")
        overhead = [x - 1 for x in ratio("routed", "forced")]
        print(f"  routed / forced - 1        {summary([100 * x for x in overhead], ' %')}   (routing overhead on "
              f"2-token requests over gRPC; goal <= 2 %)")
        print(f"  ttft cit / plain pipeline  {summary(ratio('ttft-cit', 'ttft-plain'))}   (goal <= 1.2)")
        print(f"  grpc-8 / inproc-8          {summary(ratio('grpc-8', 'inproc-8', tokens_per_s))}   (tokens/s: what the "
              f"server adds to one batched generate)")
        if on_vllm is not None:
            print(f"  embedded-8 / vllm-8        {summary(ratio('embedded-8', 'vllm-8', tokens_per_s))}   (tokens/s "
                  f"through the engine; goal >= 1.5)")

        print("\nafter the rounds (medians of 5):")
        for concurrency in (1, 4, 8, 16):
            rates = []
            def one(i: int) -> int:
                return client.generate(png[i % TASKS], INSTRUCTIONS[i % TASKS], f"task{i % TASKS}", max_new_tokens=16,
                                       **sampled).completion_tokens
            for _ in range(5):
                start = time.perf_counter()
                tokens = sum(pool.map(one, range(concurrency)))
                rates.append(tokens / (time.perf_counter() - start))
            print(f"  gRPC at concurrency {concurrency:>2}: {statistics.median(rates):.1f} tokens/s "
                  f"[{min(rates):.1f}, {max(rates):.1f}]")
        client.close()
        server.stop()
        for adapter, kind in ((ids[0], "EProj"), (ids[1], "LoRA")):
            whole, wait = [], []
            for _ in range(5):
                engine.adapters.evict(adapter)
                whole.append(timed(lambda: engine.adapters.get(adapter))[0])  # noqa: B023 - called at once
                engine.adapters.evict(adapter)
                files = engine.adapters.prefetch(adapter)
                assert files is not None  # evicted: it is read from the registry
                ready = files.result()
                wait.append(timed(lambda: engine.adapters.acquire(adapter, ready))[0])  # noqa: B023
                engine.adapters.release(adapter)
            print(f"  cold {kind} adapter: {1000 * statistics.median(whole):.1f} ms to load, of which running rows wait "
                  f"{1000 * statistics.median(wait):.2f} ms (putting it in place after the loader thread read it)")
        pool.shutdown()
        engine.close()
        if on_vllm is not None:
            on_vllm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
