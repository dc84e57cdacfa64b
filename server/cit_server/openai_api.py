"""The OpenAI-compatible HTTP front (`cit-server --http-port`): chat completions and the model list, on the same
engine, admission and limits as gRPC, so requests from both front doors batch together.

request JSON -> ChatRequest (checked here: one user turn, one image as a data: URL) -> engine.astream -> JSON or
server-sent events. Routing travels in `cit_route` (body, and each stream chunk that carries it) and in `x-cit-*`
response headers. Errors are OpenAI's error object with the HTTP status of the gRPC status cit gives the same
failure (service.status_of).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from cit_backbone.sampling import Sampling

from .config import ServerConfig
from .engine import Completion, Delta, Engine, Request, RouteDecision
from .security import TokenAuth
from .service import status_of

log = logging.getLogger("cit.server")
T = TypeVar("T")
DISCONNECT_POLL_S = 0.25  # how often a unary request looks whether its client is still there
AUTO = "auto"  # the model name that lets cit route; any other names a task (routing skipped)
# What an OpenAI client may send that cit cannot honour: refused naming the field, never silently dropped.
UNSUPPORTED = {
    "tools": "tool calls are not supported", "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported", "function_call": "function calls are not supported",
    "logprobs": "logprobs are not supported", "top_logprobs": "logprobs are not supported",
    "logit_bias": "logit_bias is not supported", "audio": "audio output is not supported",
    "modalities": "only text output is supported", "prediction": "predicted outputs are not supported",
}
PENALTIES = ("presence_penalty", "frequency_penalty")  # accepted only at 0, their default
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}
ERROR_TYPE = {499: "client_closed_request", 400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
              413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}


class ApiError(Exception):
    """A failure with its HTTP status, the field it is about, and OpenAI's `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def payload(self) -> dict:
        return {"error": {"message": str(self), "type": ERROR_TYPE.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions body reduced to what cit serves: one image, one instruction, sampling, the model."""

    request: Request
    model: str
    stream: bool
    include_usage: bool
    ignored_system: bool  # a system/developer message was sent (and not used: see docs/USAGE.md)


def parse_chat(body: Any, default_max_new_tokens: int) -> ChatRequest:
    """Check a chat-completions body; ApiError(400) names the first field cit cannot serve."""
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    for name, reason in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise _invalid(f"{name}: {reason} by cit", name)
    for name in PENALTIES:
        if body.get(name) not in (None, 0, 0.0):
            raise _invalid(f"{name}: only 0 is supported", name)
    if body.get("n") not in (None, 1):
        raise _invalid("n: cit returns one choice per request", "n")
    if (fmt := body.get("response_format")) is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _invalid("response_format: only {\"type\": \"text\"} is supported", "response_format")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid(f"model: a task id, or {AUTO!r} to let cit route", "model")
    image, instruction, ignored_system = _one_user_turn(body.get("messages"))
    sampling = _sampling(body, default_max_new_tokens)
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise _invalid("stream_options: an object, with stream: true", "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options.include_usage")
    return ChatRequest(Request(image, instruction, sampling, None if model == AUTO else model), model, stream,
                       include_usage, ignored_system)


def _typed(body: dict, name: str, kind: type | tuple[type, ...], default: Any, param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # JSON true is no number
        raise _invalid(f"{param or name}: expected {getattr(kind, '__name__', 'a number')}", param or name)
    return value


def _one_user_turn(messages: Any) -> tuple[bytes, str, bool]:
    """The image and instruction of the one user message; system/developer messages are set aside."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: a non-empty list", "messages")
    user, ignored_system = None, False
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            ignored_system = True
        elif role == "user" and user is None:
            user = (i, message)
        elif role == "user":
            raise _invalid("messages: one user message only (cit answers single-turn requests, no history)",
                           f"messages[{i}]")
        else:
            raise _invalid(f"messages[{i}].role: {role!r} is not supported (one user message, optionally after "
                           "system messages)", f"messages[{i}].role")
    if user is None:
        raise _invalid("messages: a user message with an image and an instruction is required", "messages")
    at, content = f"messages[{user[0]}].content", user[1].get("content")
    if isinstance(content, str):
        raise _invalid(f"{at}: an image is required (an image_url content part with a data: URL)", at)
    if not isinstance(content, list):
        raise _invalid(f"{at}: a list of text and image_url parts", at)
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            images.append((j, part.get("image_url")))
        else:
            raise _invalid(f"{at}[{j}]: a text or image_url part (got {kind!r})", f"{at}[{j}]")
    if len(images) != 1:
        raise _invalid(f"{at}: exactly one image_url part is supported (got {len(images)})", at)
    j, image_url = images[0]
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    return _data_url(url, f"{at}[{j}].image_url.url"), " ".join(t.strip() for t in texts if t.strip()), ignored_system


def _data_url(url: Any, param: str) -> bytes:
    """The bytes of a base64 data: URL; any other URL is refused (the server fetches nothing)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise _invalid(f"{param}: only base64 data: URLs are accepted (cit fetches nothing from the network)", param)
    header, sep, data = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise _invalid(f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{param}: the data: URL's payload is not valid base64", param) from None


def _sampling(body: dict, default_max_new_tokens: int) -> Sampling:
    """OpenAI's sampling fields as cit's Sampling (its own checks give the 400s for values out of range)."""
    number = (int, float)
    tokens = _typed(body, "max_completion_tokens", int, None)
    if tokens is None:
        tokens = _typed(body, "max_tokens", int, default_max_new_tokens)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise _invalid("stop: a string or a list of strings", "stop")
    seed = _typed(body, "seed", int, None)
    if seed is not None and not -(1 << 63) <= seed < (1 << 64):
        raise _invalid("seed: a 64-bit integer", "seed")
    if seed is not None and seed < 0:
        seed &= (1 << 64) - 1  # OpenAI allows negative seeds; cit's are unsigned 64-bit
    try:
        return Sampling(max_new_tokens=tokens, temperature=float(_typed(body, "temperature", number, 0.0)),
                        top_p=float(_typed(body, "top_p", number, 1.0)), seed=seed, stop=tuple(stop or ()))
    except OverflowError:  # float() of an integer with hundreds of digits
        raise _invalid("a sampling value is out of range (temperature, top_p)") from None
    except ValueError as exc:  # Sampling's message names its own field: say which of the request's it was
        tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        param = next((field for own, field in (("max_new_tokens", tokens_field), ("temperature", "temperature"),
                                               ("top_p", "top_p"), ("stop", "stop")) if str(exc).startswith(own)), None)
        message = str(exc).replace("max_new_tokens", tokens_field)
        raise _invalid(f"{param}: {message}" if param and not message.startswith(param) else message, param) from None


def route_json(d: RouteDecision) -> dict:
    """The routing decision as the `cit_route` extension field."""
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731 - no score when the registry is empty
    return {"task_id": d.adapter.task_id or None, "version": d.adapter.version or None, "score": finite(d.score),
            "forced": d.forced, "fell_back": d.fell_back is not None,
            "fell_back_because": d.fell_back.name.lower() if d.fell_back else None, "nearer": d.nearer}


def route_headers(d: RouteDecision, ignored_system: bool) -> dict[str, str]:
    headers = {"x-cit-task": d.adapter.task_id or "", "x-cit-task-version": str(d.adapter.version or ""),
               "x-cit-route-score": f"{d.score:.4f}" if math.isfinite(d.score) else "",
               "x-cit-fell-back": d.fell_back.name.lower() if d.fell_back else "no"}
    if ignored_system:
        headers["x-cit-system-message"] = "ignored"
    return headers


def create_app(engine: Engine, config: ServerConfig, auth: TokenAuth) -> FastAPI:
    app = FastAPI(title="cit", docs_url=None, redoc_url=None, openapi_url=None)
    max_body = 2 * config.max_message_bytes  # base64 adds a third to the image; JSON a little more

    def count(code: str) -> None:
        engine.metrics.requests.labels("ChatCompletions", code).inc()

    def failed(exc: Exception) -> JSONResponse:
        error = _api_error(exc)
        count(_code_name(error.status))
        return error.response()

    def authorise(http: HttpRequest) -> None:
        denied = auth.denied(http.headers.get("authorization"), admin=False)
        if denied is not None:
            raise ApiError(401, denied, code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(http: HttpRequest, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.ready() else 503)

    @app.get("/v1/models")
    async def models(http: HttpRequest) -> JSONResponse:
        try:
            authorise(http)
            with engine.admission.slot():  # it reads the registry: it counts as a request (as ListTasks does)
                tasks = await engine.call(lambda: [(t, engine.residency(t)) for t in engine.tasks()])
        except Exception as exc:  # noqa: BLE001 - every error gets a status
            return _api_error(exc).response()
        created = int(time.time())
        data = [{"id": AUTO, "object": "model", "created": created, "owned_by": "cit"}]
        data += [{"id": t.task_id, "object": "model", "created": created, "owned_by": "cit",
                  "cit": {"version": t.version, "adapter_kind": t.card.adapter_kind, "residency": residency}}
                 for t, residency in tasks]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest) -> Response:
        try:
            authorise(http)
            chat = parse_chat(await _json_body(http, max_body), config.default_max_new_tokens)
            outputs = engine.astream(chat.request)
            decision = await anext(outputs)  # routing and admission errors come here, before any byte is sent
            assert isinstance(decision, RouteDecision)  # a stream starts with its route
        except Exception as exc:  # noqa: BLE001 - every error gets a status
            return failed(exc)
        headers = route_headers(decision, chat.ignored_system)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if chat.stream:
            # the background task closes the engine's stream however the response ends, also when the client
            # left before its first byte (then _events never starts): the engine drops its row at the next step
            return StreamingResponse(_events(outputs, decision, chat, completion_id, created, count),
                                     media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(outputs.aclose))
        try:
            done = await _unless_disconnected(http, _completion(outputs))
        except Exception as exc:  # noqa: BLE001
            return failed(exc)
        count("OK")
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": chat.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(done), "cit_route": route_json(decision)}, headers=headers)

    return app


async def _completion(outputs: AsyncIterator) -> Completion:
    return [o async for o in outputs if isinstance(o, Completion)][-1]


async def _unless_disconnected(http: HttpRequest, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it when the client hangs up: a unary request whose caller is gone frees its row at
    the next decode step instead of generating to the end (a stream's is cancelled by Starlette itself)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise ApiError(499, "the client closed the connection")
    finally:  # the client left, or this handler was cancelled (e.g. at the end of a graceful shutdown)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _json_body(http: HttpRequest, limit: int) -> Any:
    """The request body as JSON, refused (413) past `limit` bytes whether or not the client said its length."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    try:
        async for chunk in http.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the body is over {limit} bytes", code="request_too_large")
    except ClientDisconnect:
        raise ApiError(499, "the client closed the connection while sending the body") from None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise _invalid("the body is not JSON cit reads: nested too deeply") from None


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    code = status_of(exc)
    status = HTTP_STATUS.get(code, 500)
    if status == 500:
        log.error("internal error in ChatCompletions", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}")
    return ApiError(status, str(exc), code="model_not_found" if status == 404 else None)


def _code_name(status: int) -> str:
    return next((code.name for code, s in HTTP_STATUS.items() if s == status), "INVALID_ARGUMENT")


def _usage(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _events(outputs: AsyncGenerator, decision: RouteDecision, chat: ChatRequest, completion_id: str,
                  created: int, count: Callable[[str], None]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: a role chunk (with cit_route), content chunks, a chunk with the
    finish_reason, a usage chunk when asked, then [DONE]. A failure after the first byte is an error event. A
    client that disconnects cancels this generator; the response's background task then closes `outputs`."""
    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def chunk(choices: list[dict], **extra) -> str:
        return event({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": chat.model,
                      "choices": choices, **extra})

    def choice(delta: dict, finish_reason: str | None = None) -> list[dict]:
        return [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]

    try:
        yield chunk(choice({"role": "assistant", "content": ""}), cit_route=route_json(decision))
        async for output in outputs:
            if isinstance(output, Delta):
                yield chunk(choice({"content": output.text}))
            elif isinstance(output, Completion):
                yield chunk(choice({}, output.finish_reason))
                if chat.include_usage:
                    yield chunk([], usage=_usage(output))
        count("OK")
    except asyncio.CancelledError:  # the client went away (Starlette cancels the response)
        count("CANCELLED")
        raise
    except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        error = _api_error(exc)
        count(_code_name(error.status))
        yield event(error.payload())
    yield "data: [DONE]\n\n"


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: cit-server's loop owns SIGTERM/SIGINT and stops both fronts."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The OpenAI HTTP API on the running event loop (the gRPC server's), listening at config.host:http_port."""

    def __init__(self, engine: Engine, config: ServerConfig, auth: TokenAuth) -> None:
        host = config.host.strip("[]")  # gRPC takes an IPv6 address in brackets ("[::]"), sockets without
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, config.http_port or 0), family=family)
        self.port: int = self.socket.getsockname()[1]
        self._server = _Uvicorn(uvicorn.Config(
            create_app(engine, config, auth), log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=max(1, math.ceil(config.grace_seconds)), **ssl_options(config)))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]))
        while not self._server.started:
            if self._task.done():  # it failed to start (e.g. a TLS file it cannot read): say why
                self._task.result()
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Graceful: no new connections, in-flight requests get the server's grace period."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def ssl_options(config: ServerConfig) -> dict:
    """uvicorn's TLS settings from the gRPC server's: the same certificate, and client certificates when asked."""
    if config.tls_cert is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    if config.tls_client_ca is not None:
        options |= {"ssl_ca_certs": str(config.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options
