"""The vLLM engine as an LM worker process: `python -m cit_server.vllm_worker --model DIR --port N`.

It runs in vLLM's own environment (vLLM pins torch and transformers; see shared/STACK.md) and imports nothing of
cit but the generated LmWorker stubs. cit-server embeds, routes and projects; it sends each request here as prompt
embeddings (image rows + text rows) with its task's LoRA, and vLLM batches everything it holds (continuous
batching, one LoRA per request) and streams token ids back. `cit-server --engine vllm` starts and stops it.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import uuid

import grpc
import numpy as np

from cit_proto import lm_worker_pb2 as pb
from cit_proto import lm_worker_pb2_grpc as pb_grpc

# vLLM must wrap only the layers cit's LoRAs adapt: wrapping embed_tokens breaks prompt-embeds batches.
LORA_TARGETS = ["q_proj", "v_proj"]
log = logging.getLogger("cit.vllm_worker")


class LmWorker(pb_grpc.LmWorkerServicer):
    def __init__(self, engine, model: str, hidden_size: int, max_loras: int, dtype: str = "float32") -> None:
        self.engine, self.model, self.hidden_size, self.max_loras = engine, model, hidden_size, max_loras
        self.dtype = dtype  # the LM's; prompt embeddings arrive as float32 and are cast to it
        self._lora_ids: dict[str, int] = {}  # vLLM wants a positive int per adapter; names are unique per version
        self.dead = asyncio.Event()  # vLLM's engine core died: every later request would fail, so the worker exits

    async def Info(self, request, context):
        return pb.InfoResponse(model=self.model, hidden_size=self.hidden_size, max_loras=self.max_loras,
                               engine="vllm")

    async def Generate(self, request, context):
        import torch
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if request.rows < 1 or len(request.prompt_embeds) != request.rows * self.hidden_size * 4:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt_embeds must hold rows x {self.hidden_size} float32 values")
        embeds = torch.from_numpy(np.frombuffer(request.prompt_embeds, dtype="<f4")
                                  .reshape(request.rows, self.hidden_size).copy()).to(getattr(torch, self.dtype))
        params = SamplingParams(max_tokens=request.max_new_tokens, temperature=request.temperature,
                                top_p=request.top_p or 1.0, top_k=request.top_k,
                                seed=request.seed if request.HasField("seed") else None, ignore_eos=request.ignore_eos,
                                output_kind=RequestOutputKind.DELTA, detokenize=False)
        lora = None
        if request.lora_name:
            lora_id = self._lora_ids.setdefault(request.lora_name, len(self._lora_ids) + 1)
            lora = LoRARequest(request.lora_name, lora_id, request.lora_path)
        # Closing this generator (the client cancelled) aborts the request inside vLLM.
        try:
            async for out in self.engine.generate({"prompt_embeds": embeds}, params, uuid.uuid4().hex,
                                                  lora_request=lora):
                yield pb.LmTokens(token_ids=out.outputs[0].token_ids, finished=out.finished)
        except (VLLMClientError, ValueError) as exc:  # this request's fault (e.g. a prompt over max_model_len)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineDeadError:
            log.error("vLLM's engine core died: this worker exits (cit-server starts a new one)")
            self.dead.set()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the LM worker's engine died; it is being restarted")


async def start_engine(args: argparse.Namespace):
    """vLLM's AsyncLLM over the LM, set up for cit's prompts (embeddings) and LoRAs; and the LM's hidden size."""
    from transformers import AutoConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prompt_embeds=True, enable_lora=True, max_lora_rank=args.max_lora_rank,
        # One slot more than adapters in use: vLLM gives base rows the last slot when all are full (STACK.md).
        max_loras=args.max_loras + 1, max_cpu_loras=args.max_loras + 1, lora_target_modules=LORA_TARGETS))
    return engine, AutoConfig.from_pretrained(args.model).hidden_size


async def serve(args: argparse.Namespace, engine, hidden_size: int) -> None:
    """Serve LmWorker on `engine` (vLLM's AsyncLLM, or anything with its `generate` and `shutdown`) until
    terminated, until the process that started this worker is gone, or until the engine dies (exit code 1: the
    server that started this worker starts a new one)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    worker = LmWorker(engine, args.model, hidden_size, args.max_loras, args.dtype)
    pb_grpc.add_LmWorkerServicer_to_server(worker, server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    print(f"cit-vllm-worker listening on {args.host}:{port}", flush=True)
    ends = [asyncio.ensure_future(server.wait_for_termination()), asyncio.ensure_future(worker.dead.wait())]
    if args.parent_pid:
        ends.append(asyncio.ensure_future(_until_orphaned(args.parent_pid)))
    try:
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        if worker.dead.is_set():
            await server.stop(grace=1)
            raise SystemExit(1)
        if args.parent_pid and ends[2].done():
            log.warning("the process that started this worker (pid %d) is gone: stopping", args.parent_pid)
            await server.stop(grace=1)
    finally:
        for end in ends:
            end.cancel()
        engine.shutdown()


async def _until_orphaned(parent: int) -> None:
    """Returns when this process's parent is no longer `parent` (it died, even by SIGKILL)."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the LM's directory (safetensors, config, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--max-loras", type=int, default=16, help="LoRAs resident in vLLM at once")
    parser.add_argument("--max-lora-rank", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the LM's precision (cit-server passes its --dtype)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the LM over")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="replicas of the LM (each on --tensor-parallel-size GPUs); vLLM spreads requests over them")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of each GPU's memory vLLM may take (ignored by vLLM's CPU build)")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (0: never)")
    return parser


async def warm_up(engine, hidden_size: int, dtype: str) -> None:
    """One token from a two-row prompt, before the worker says it listens: a model vLLM cannot run (a head size its
    attention has no kernel for, a cache that does not fit) fails the start with vLLM's error, not every request."""
    import torch
    from vllm import SamplingParams

    async for _ in engine.generate({"prompt_embeds": torch.zeros(2, hidden_size, dtype=getattr(torch, dtype))},
                                   SamplingParams(max_tokens=1, detokenize=False), "cit-warm-up"):
        pass


async def _main(args: argparse.Namespace) -> None:
    engine, hidden_size = await start_engine(args)
    try:
        await warm_up(engine, hidden_size, args.dtype)
    except Exception as exc:  # noqa: BLE001 - whatever vLLM raises, this worker cannot serve: say why and exit
        # the line WorkerProcess reports when this worker exits while starting
        print(f"cit-vllm-worker failed: {type(exc).__name__}: {exc}", flush=True)
        engine.shutdown()
        raise SystemExit(1) from None
    await serve(args, engine, hidden_size)


def main() -> None:
    args = arguments().parse_args()
    logging.basicConfig(level=logging.INFO)
    # Defaults that make vLLM's CPU build usable on a small machine; a caller's own settings win.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
