"""Python clients for cit-server: `CitClient` (synchronous) and `AsyncCitClient` (asyncio, on grpc.aio), with the
same methods, options and errors (grpc.RpcError / grpc.aio.AioRpcError carrying the server's status)."""
from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from cit_proto import cit_pb2, cit_pb2_grpc


def fell_back_reason(route: cit_pb2.RouteDecision) -> str:
    """Why the base connector answered, in words ("image unlike", "nearer another question: background", ...)."""
    reason = cit_pb2.FallBack.Name(route.fell_back_because).removeprefix("FALL_BACK_").lower().replace("_", " ")
    return f"{reason}: {route.nearer}" if route.nearer else reason


def _image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _open_channel(grpc_module: Any, target: str, max_message_bytes: int, tls_ca: str | Path | None,
                  tls_cert: str | Path | None, tls_key: str | Path | None) -> Any:
    """A channel of `grpc_module` (grpc or grpc.aio, which open channels alike): TLS when a CA or a client
    certificate is given, else plaintext."""
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes)]
    if tls_ca is None and tls_cert is None:
        return grpc_module.insecure_channel(target, options=options)
    read = lambda p: Path(p).read_bytes() if p is not None else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
    return grpc_module.secure_channel(target, credentials, options=options)


def generate_request(
    image: bytes | str | Path,
    instruction: str,
    task_id: str | None = None,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> cit_pb2.GenerateRequest:
    """A GenerateRequest: the image as bytes or a file path, task_id to skip routing, sampling left unset where
    None (the server's defaults apply)."""
    params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                              "top_k": top_k, "seed": seed}
    sampling = cit_pb2.SamplingParams(**{k: v for k, v in params.items() if v is not None}, stop=stop or [])
    return cit_pb2.GenerateRequest(image=_image_bytes(image), instruction=instruction, task_id=task_id,
                                   sampling=sampling)


# the proto's TaskChange values, as the words the CLI and callers use ("retire", "restore", ...)
TASK_CHANGES = tuple(name.removeprefix("TASK_CHANGE_").lower() for name in cit_pb2.TaskChange.keys()
                     if name != "TASK_CHANGE_UNSPECIFIED")


def change_request(task_id: str, change: str, version: int | None = None) -> cit_pb2.ChangeTaskRequest:
    """A ChangeTask request; `change` is one of TASK_CHANGES."""
    if change not in TASK_CHANGES:
        raise ValueError(f"change must be one of {', '.join(TASK_CHANGES)}, not {change!r}")
    return cit_pb2.ChangeTaskRequest(task_id=task_id, change=cit_pb2.TaskChange.Value(f"TASK_CHANGE_{change.upper()}"),
                                     version=version)


class CitClient:
    """CitClient("127.0.0.1:50051").generate("cat.png", "What is this?") -> GenerateResponse.

    token: sent as `authorization: Bearer <token>`. tls_ca: PEM of the CA (or self-signed certificate) the server's
    certificate must chain to, which switches the channel to TLS; tls_cert/tls_key: this client's certificate.
    """

    request = staticmethod(generate_request)

    def __init__(self, target: str, timeout: float | None = 120.0, max_message_bytes: int = 9 * 1024 * 1024,
                 token: str | None = None, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None) -> None:
        self.channel = _open_channel(grpc, target, max_message_bytes, tls_ca, tls_cert, tls_key)
        if token is not None:
            self.channel = grpc.intercept_channel(self.channel, _BearerToken(token))
        self.stub = cit_pb2_grpc.CitStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CitClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, image: bytes | str | Path, instruction: str, task_id: str | None = None, **sampling) -> cit_pb2.GenerateResponse:
        return self.stub.Generate(self.request(image, instruction, task_id, **sampling), timeout=self.timeout)

    def generate_stream(self, image: bytes | str | Path, instruction: str, task_id: str | None = None,
                        **sampling) -> Iterator[cit_pb2.GenerateStreamResponse]:
        return self.stub.GenerateStream(self.request(image, instruction, task_id, **sampling), timeout=self.timeout)

    def route(self, image: bytes | str | Path, instruction: str, top_k: int = 5) -> cit_pb2.RouteResponse:
        return self.stub.Route(cit_pb2.RouteRequest(image=_image_bytes(image), instruction=instruction, top_k=top_k),
                               timeout=self.timeout)

    def list_tasks(self) -> list[cit_pb2.TaskSummary]:
        return list(self.stub.ListTasks(cit_pb2.ListTasksRequest(), timeout=self.timeout).tasks)

    def get_task(self, task_id: str) -> cit_pb2.GetTaskResponse:
        return self.stub.GetTask(cit_pb2.GetTaskRequest(task_id=task_id), timeout=self.timeout)

    def reload_registry(self) -> cit_pb2.ReloadRegistryResponse:
        """Admin (the admin token): the server reads its registry now."""
        return self.stub.ReloadRegistry(cit_pb2.ReloadRegistryRequest(), timeout=self.timeout)

    def change_task(self, task_id: str, change: str, version: int | None = None) -> cit_pb2.ChangeTaskResponse:
        """Admin: "retire", "restore", "rollback" (to `version`; None: the newest again), "promote" or "reject" a
        task's version; routing follows before the answer."""
        return self.stub.ChangeTask(change_request(task_id, change, version), timeout=self.timeout)

    def history(self, task_id: str | None = None, limit: int = 0) -> list[cit_pb2.HistoryEntry]:
        """Admin: the registry's history, oldest first (one task's; the newest `limit`)."""
        return list(self.stub.GetHistory(cit_pb2.GetHistoryRequest(task_id=task_id or "", limit=limit),
                                         timeout=self.timeout).entries)


class AsyncCitClient:
    """The asyncio client: the same constructor options and methods as CitClient, awaited.

        async with AsyncCitClient("127.0.0.1:50051") as client:
            response = await client.generate("cat.png", "What is this?")
            stream = client.generate_stream("cat.png", "Describe it.", max_new_tokens=64)
            async for message in stream:     # the route first, then text deltas, then finish_reason
                ...
            stream.cancel()                  # to stop early (leaving the loop alone does not cancel the call;
                                             # stream_text's loop does)

    Create it inside the event loop that uses it (grpc.aio binds a channel to its loop).
    """

    request = staticmethod(generate_request)

    def __init__(self, target: str, timeout: float | None = 120.0, max_message_bytes: int = 9 * 1024 * 1024,
                 token: str | None = None, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None) -> None:
        self.channel: grpc.aio.Channel = _open_channel(grpc.aio, target, max_message_bytes, tls_ca, tls_cert, tls_key)
        # per call rather than an interceptor: grpc.aio's interceptors are fixed per channel type and add a task per call
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        self.stub = cit_pb2_grpc.CitStub(self.channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncCitClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, image: bytes | str | Path, instruction: str, task_id: str | None = None,
                       **sampling) -> cit_pb2.GenerateResponse:
        return await self.stub.Generate(self.request(image, instruction, task_id, **sampling), timeout=self.timeout,
                                        metadata=self._metadata)

    def generate_stream(self, image: bytes | str | Path, instruction: str, task_id: str | None = None,
                        **sampling) -> grpc.aio.UnaryStreamCall:
        """An async iterator of GenerateStreamResponse that is also the call: `.cancel()` ends it, and the server
        frees the request's slot in the running batch."""
        call: grpc.aio.UnaryStreamCall = self.stub.GenerateStream(
            self.request(image, instruction, task_id, **sampling), timeout=self.timeout, metadata=self._metadata)
        return call

    async def stream_text(self, image: bytes | str | Path, instruction: str, task_id: str | None = None,
                          **sampling) -> AsyncIterator[str]:
        """Only the text deltas of generate_stream; leaving the loop early cancels the call."""
        call = self.generate_stream(image, instruction, task_id, **sampling)
        try:
            async for message in call:
                if message.delta:
                    yield message.delta
        finally:
            call.cancel()

    async def route(self, image: bytes | str | Path, instruction: str, top_k: int = 5) -> cit_pb2.RouteResponse:
        return await self.stub.Route(cit_pb2.RouteRequest(image=_image_bytes(image), instruction=instruction,
                                                          top_k=top_k), timeout=self.timeout, metadata=self._metadata)

    async def list_tasks(self) -> list[cit_pb2.TaskSummary]:
        response = await self.stub.ListTasks(cit_pb2.ListTasksRequest(), timeout=self.timeout, metadata=self._metadata)
        return list(response.tasks)

    async def get_task(self, task_id: str) -> cit_pb2.GetTaskResponse:
        return await self.stub.GetTask(cit_pb2.GetTaskRequest(task_id=task_id), timeout=self.timeout,
                                       metadata=self._metadata)

    async def reload_registry(self) -> cit_pb2.ReloadRegistryResponse:
        """Admin (the admin token): the server reads its registry now."""
        return await self.stub.ReloadRegistry(cit_pb2.ReloadRegistryRequest(), timeout=self.timeout,
                                              metadata=self._metadata)

    async def change_task(self, task_id: str, change: str, version: int | None = None) -> cit_pb2.ChangeTaskResponse:
        """Admin: as CitClient.change_task."""
        return await self.stub.ChangeTask(change_request(task_id, change, version), timeout=self.timeout,
                                          metadata=self._metadata)

    async def history(self, task_id: str | None = None, limit: int = 0) -> list[cit_pb2.HistoryEntry]:
        """Admin: as CitClient.history."""
        response = await self.stub.GetHistory(cit_pb2.GetHistoryRequest(task_id=task_id or "", limit=limit),
                                              timeout=self.timeout, metadata=self._metadata)
        return list(response.entries)


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details):
        return _CallDetails(details.method, details.timeout, [*(details.metadata or []), self._header],
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)
