"""A synchronous Python client for cit-server."""
from __future__ import annotations

import collections
from collections.abc import Iterator
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


class CitClient:
    """CitClient("127.0.0.1:50051").generate("cat.png", "What is this?") -> GenerateResponse.

    token: sent as `authorization: Bearer <token>`. tls_ca: PEM of the CA (or self-signed certificate) the server's
    certificate must chain to, which switches the channel to TLS; tls_cert/tls_key: this client's certificate.
    """

    def __init__(self, target: str, timeout: float | None = 120.0, max_message_bytes: int = 9 * 1024 * 1024,
                 token: str | None = None, tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None) -> None:
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if tls_ca is not None or tls_cert is not None:
            read = lambda p: Path(p).read_bytes() if p is not None else None  # noqa: E731
            credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
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

    @staticmethod
    def request(
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
        params: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                  "seed": seed}
        sampling = cit_pb2.SamplingParams(**{k: v for k, v in params.items() if v is not None}, stop=stop or [])
        return cit_pb2.GenerateRequest(image=_image_bytes(image), instruction=instruction, task_id=task_id,
                                       sampling=sampling)

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
