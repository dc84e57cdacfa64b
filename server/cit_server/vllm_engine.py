"""The vLLM engine, server side: a running batch whose rows decode in an LM worker (vllm_worker.py) instead of the
embedded LM. It has the embedded DecodeBatch's interface (join / step / remove), so the scheduler and the request
path stay the same: only the last arrow, backbone -> tokens, crosses a process boundary.

Each row is one streaming LmWorker.Generate call: the prompt's embeddings (visual tokens from the task's
projection, text rows from the LM's own embedding table) and the task's LoRA directory go out, token ids come
back, and this side turns them into text with the same tokenizer, stop strings and limits as the embedded engine.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from cit_backbone.language_model import LanguageModel
from cit_backbone.sampling import RowState, Sampling
from cit_proto import lm_worker_pb2 as pb
from cit_proto import lm_worker_pb2_grpc as pb_grpc

from .config import ServerConfig

log = logging.getLogger("cit.server")
WORKER_START_TIMEOUT_S = 600.0  # vLLM's import and engine start take ~30-45 s on 2 cores; a cold disk more
WORKER_RETRY_S = 5.0  # a vLLM worker that failed to start is tried again after this long


class WorkerError(RuntimeError):
    """The LM worker failed or went away."""


@dataclass(eq=False)
class _Row:
    state: RowState
    sampling: Sampling
    call: grpc.Future  # the streaming Generate call (also an iterator of LmTokens)


class VllmBatch:
    """Rows decoding in an LM worker. `lora_dir(name)` gives a LoRA's directory in PEFT's format."""

    def __init__(self, target: str, lm: LanguageModel, lora_dir: Callable[[str], Path]) -> None:
        self.lm, self.lora_dir = lm, lora_dir
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self._stub = pb_grpc.LmWorkerStub(self._channel)
        self._rows: list[_Row] = []
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # (row, LmTokens | Exception)

    def __len__(self) -> int:
        return len(self._rows)

    def info(self, timeout: float) -> pb.InfoResponse:
        return self._stub.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True)

    def join(self, visual: torch.Tensor, instructions: Sequence[str], sampling: Sequence[Sampling],
             loras: Sequence[str | None] | None = None) -> list[RowState]:
        loras = list(loras) if loras is not None else [None] * len(instructions)
        with torch.inference_mode():
            prompts = self.lm.prompt_embeddings(visual, instructions)
        rows = []
        for prompt, params, lora in zip(prompts, sampling, loras):
            request = pb.LmRequest(
                prompt_embeds=prompt.float().cpu().numpy().astype("<f4", copy=False).tobytes(), rows=prompt.shape[0],
                lora_name=lora or "", lora_path=str(self.lora_dir(lora)) if lora else "",
                max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k, seed=params.seed, ignore_eos=params.ignore_eos)
            row = _Row(RowState(prompt_tokens=prompt.shape[0]), params, self._stub.Generate(request))
            threading.Thread(target=self._read, args=(row,), daemon=True, name="cit-vllm-reader").start()
            rows.append(row)
        self._rows += rows
        return [r.state for r in rows]

    def _read(self, row: _Row) -> None:
        try:
            for message in row.call:
                self._events.put((row, message))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # this request, e.g. a prompt over max_model_len
                self._events.put((row, ValueError(f"the vLLM worker refused the request: {exc.details()}")))
            elif exc.code() != grpc.StatusCode.CANCELLED:
                self._events.put((row, WorkerError(f"LM worker: {exc.code().name}: {exc.details()}")))

    def step(self, wait_s: float = 0.05) -> None:
        """Apply whatever the worker sent since the last step (waiting up to `wait_s` for the first of it)."""
        if not self._rows:
            return
        events = []
        try:
            events.append(self._events.get(timeout=wait_s))
            while True:
                events.append(self._events.get_nowait())
        except queue.Empty:
            pass
        for row, message in events:
            if row not in self._rows or row.state.finish_reason:  # gone already: late messages are dropped
                continue
            if isinstance(message, Exception):  # this row's call failed: it ends alone, the others go on
                row.state.fail(message)
                continue
            for token in message.token_ids:
                if row.state.finish_reason:
                    break
                self.lm.advance(row.state, token, row.sampling)
            if message.finished and not row.state.finish_reason:
                row.state.finish_reason = "stop"  # the worker saw an end-of-sequence token of its own
        for row in [r for r in self._rows if r.state.finish_reason]:
            self._drop(row)  # a stop string ends a row here before the worker knows: cancel its call

    def remove(self, state: RowState) -> None:
        for row in [r for r in self._rows if r.state is state]:
            self._drop(row)

    def _drop(self, row: _Row) -> None:
        self._rows.remove(row)
        row.call.cancel()

    def close(self) -> None:
        for row in list(self._rows):
            self._drop(row)
        self._channel.close()


class WorkerProcess:
    """An LM worker started by this server in vLLM's environment (`python` of that environment), and stopped
    with it. It leads a process group of its own: vLLM's engine-core process is stopped with it, even when the
    worker itself died. It exits by itself when this server's process is gone (--parent-pid), so that not even a
    SIGKILL of the server leaves it running."""

    def __init__(self, python: str, model: Path, max_loras: int,
                 max_model_len: int = ServerConfig.vllm_max_model_len, timeout: float = WORKER_START_TIMEOUT_S,
                 dtype: str = ServerConfig.dtype, tensor_parallel_size: int = ServerConfig.vllm_tensor_parallel_size,
                 gpu_memory_utilization: float = ServerConfig.vllm_gpu_memory_utilization,
                 data_parallel_size: int = ServerConfig.vllm_data_parallel_size) -> None:
        """The defaults are the server's (ServerConfig owns them)."""
        # Its log (stderr) goes where the server's goes.
        self.proc = subprocess.Popen(
            [python, "-m", "cit_server.vllm_worker", "--model", str(model), "--port", "0",
             "--max-loras", str(max_loras), "--max-model-len", str(max_model_len), "--dtype", dtype,
             "--tensor-parallel-size", str(tensor_parallel_size), "--data-parallel-size", str(data_parallel_size),
             "--gpu-memory-utilization", str(gpu_memory_utilization), "--parent-pid", str(os.getpid())],
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        try:
            self.target = self._wait_for_port(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_port(self, timeout: float) -> str:
        """The address the worker prints once it serves; WorkerError when it exits or is silent past `timeout`."""
        lines: queue.SimpleQueue[bytes] = queue.SimpleQueue()

        def drain() -> None:  # reads all its output, for as long as it runs, so its pipe never fills
            assert self.proc.stdout is not None  # started with stdout=PIPE
            for line in iter(self.proc.stdout.readline, b""):
                lines.put(line)
            lines.put(b"")

        threading.Thread(target=drain, daemon=True, name="cit-vllm-output").start()
        deadline, why = time.monotonic() + timeout, ""
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                raise WorkerError(f"the vLLM worker exited while starting (code {self.proc.wait()})"
                                  + (f": {why}" if why else "") + "; see its log")
            if failed := re.search(rb"cit-vllm-worker failed: (.*)", line):
                why = failed.group(1).decode(errors="replace").strip()
            elif match := re.search(rb"cit-vllm-worker listening on (\S+)", line):
                return match.group(1).decode()
        raise WorkerError(f"the vLLM worker did not start within {timeout:.0f} s; see its log")

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass


class WorkerSupervisor:
    """The vLLM worker this server started, started again on a thread of its own when it exits: the scheduler
    goes on meanwhile (new requests get UNAVAILABLE, health says NOT_SERVING) and takes the new worker, from
    `up`, once it serves. `close` stops whichever worker is current, one being started included."""

    def __init__(self, start: Callable[[], WorkerProcess]) -> None:
        self._start = start
        self.worker = start()
        self._ready = threading.Event()  # set while the current worker is up
        self._ready.set()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="cit-vllm-supervisor", daemon=True)
        self._thread.start()

    def up(self) -> WorkerProcess | None:
        """The worker, when it is started and alive; None while it is down or being started again."""
        worker = self.worker
        return worker if self._ready.is_set() and worker.proc.poll() is None else None

    def _supervise(self) -> None:
        while not self._closing.wait(0.25):
            if self.worker.proc.poll() is None:
                continue
            self._ready.clear()
            log.error("the vLLM worker exited (code %s); starting a new one", self.worker.proc.returncode)
            self.worker.stop()  # what is left of its process group
            try:
                self.worker = self._start()
            except Exception:
                log.exception("starting a new vLLM worker failed; trying again in %.0f s", WORKER_RETRY_S)
                self._closing.wait(WORKER_RETRY_S)
                continue
            self._ready.set()

    def retire(self) -> None:
        """Start no new worker from now on (the server is stopping); the current one keeps serving its rows."""
        self._closing.set()

    def close(self) -> None:
        self.retire()
        self._thread.join(timeout=WORKER_START_TIMEOUT_S)  # it may be starting a worker: that one too
        self.worker.stop()


def default_worker_python() -> str:
    """vLLM's interpreter: $CIT_VLLM_PYTHON, else the repository's .venv-vllm, else this one."""
    if os.environ.get("CIT_VLLM_PYTHON"):
        return os.environ["CIT_VLLM_PYTHON"]
    local = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return str(local) if local.exists() else sys.executable

