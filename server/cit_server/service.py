"""The gRPC servicer: convert protobuf -> engine call -> protobuf. Errors map to status codes in one place."""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from concurrent import futures

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cit_proto import cit_pb2, cit_pb2_grpc
from cit_backbone.language_model import Sampling
from cit_registry.store import TaskNotFound, TaskVersion

from .adapter_cache import CacheFull
from .config import ServerConfig
from .engine import Cancelled, Engine, Request, RouteDecision
from .scheduler import Overloaded
from .security import TokenAuth, server_credentials
from .vllm_engine import WorkerError

log = logging.getLogger("cit.server")
SERVICE_NAME = cit_pb2.DESCRIPTOR.services_by_name["Cit"].full_name
MAX_ROUTE_CANDIDATES = 50


def _status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, Cancelled):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, (Overloaded, CacheFull)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, TaskNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, WorkerError):  # the vLLM worker went away: a retry reaches the new one
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ValueError):  # InvalidImage and every validation error are ValueErrors
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class Undecodable:
    """A request whose bytes protobuf refused (e.g. a string field that is not UTF-8): answered INVALID_ARGUMENT
    by the servicer, where grpc itself would answer INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(parse: Callable) -> Callable:
    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(exc)
    return deserialize


def add_servicer(servicer: "CitServicer", server: grpc.Server) -> None:
    """Like the generated add_CitServicer_to_server, with requests decoded by `_lenient`."""
    service = cit_pb2.DESCRIPTOR.services_by_name["Cit"]
    handlers = {}
    for m in service.methods:
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=_lenient(message_factory.GetMessageClass(m.input_type).FromString),
            response_serializer=message_factory.GetMessageClass(m.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _check_decoded(request) -> None:
    if isinstance(request, Undecodable):
        raise ValueError(f"the request could not be decoded (strings must be UTF-8): {request.error}")


def _abort_on_error(method: Callable) -> Callable:
    """Bad input -> INVALID_ARGUMENT, unknown task -> NOT_FOUND, anything else -> INTERNAL with a log line."""

    def fail(self, context: grpc.ServicerContext, exc: Exception):
        code = _status_of(exc)
        self.engine.metrics.requests.labels(method.__name__, code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method.__name__)
        context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else f"internal error: {type(exc).__name__}")

    if method.__name__.endswith("Stream"):
        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                _check_decoded(request)
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error gets a status
                fail(self, context, exc)
            else:
                self.engine.metrics.requests.labels(method.__name__, "OK").inc()
        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            _check_decoded(request)
            response = method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            fail(self, context, exc)
        else:
            self.engine.metrics.requests.labels(method.__name__, "OK").inc()
            return response
    return wrapper


def to_sampling(p: cit_pb2.SamplingParams, default_max_new_tokens: int) -> Sampling:
    return Sampling(
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else default_max_new_tokens,
        temperature=p.temperature if p.HasField("temperature") else 0.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
    )


def to_route_pb(d: RouteDecision) -> cit_pb2.RouteDecision:
    finite = lambda x: x if math.isfinite(x) else 0.0  # noqa: E731 - no score when the registry is empty
    return cit_pb2.RouteDecision(
        task_id=d.adapter.task_id, version=d.adapter.version, score=finite(d.score),
        below_threshold=d.below_threshold, forced=d.forced, threshold=d.threshold,
        candidates=[cit_pb2.Candidate(task_id=c.task_id, version=c.version, score=c.score) for c in d.candidates],
    )


def to_summary_pb(t: TaskVersion) -> cit_pb2.TaskSummary:
    return cit_pb2.TaskSummary(
        task_id=t.task_id, version=t.version, adapter_kind=t.card.adapter_kind,
        decision=t.card.decision.get("action", ""), created_at=t.card.created_at, centroids=len(t.card.datasets),
    )


class CitServicer(cit_pb2_grpc.CitServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _request(self, r: cit_pb2.GenerateRequest) -> Request:
        return Request(r.image, r.instruction, to_sampling(r.sampling, self.engine.config.default_max_new_tokens),
                       r.task_id if r.HasField("task_id") else None)

    @_abort_on_error
    def Generate(self, request, context):
        # A client that cancels or whose deadline passes stops the generation at the next step.
        decision, done = self.engine.generate(self._request(request), cancelled=lambda: not context.is_active())
        return cit_pb2.GenerateResponse(text=done.text, route=to_route_pb(decision), finish_reason=done.finish_reason,
                                        prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)

    @_abort_on_error
    def GenerateStream(self, request, context):
        for decision, delta, done in self.engine.stream(self._request(request), lambda: not context.is_active()):
            if decision is not None:
                yield cit_pb2.GenerateStreamResponse(route=to_route_pb(decision))
            elif done is not None:
                yield cit_pb2.GenerateStreamResponse(delta=delta, finish_reason=done.finish_reason,
                                                     prompt_tokens=done.prompt_tokens,
                                                     completion_tokens=done.completion_tokens)
            else:
                yield cit_pb2.GenerateStreamResponse(delta=delta)

    @_abort_on_error
    def Route(self, request, context):
        k = request.top_k or 5
        if k > MAX_ROUTE_CANDIDATES:
            raise ValueError(f"top_k must be at most {MAX_ROUTE_CANDIDATES}, got {k}")
        decision = self.engine.route(self.engine.embed(request.image, request.instruction), k=k)
        return cit_pb2.RouteResponse(route=to_route_pb(decision))

    @_abort_on_error
    def ListTasks(self, request, context):
        return cit_pb2.ListTasksResponse(tasks=[to_summary_pb(t) for t in self.engine.tasks()])

    @_abort_on_error
    def GetTask(self, request, context):
        task = self.engine.task(request.task_id)
        return cit_pb2.GetTaskResponse(task=to_summary_pb(task), card_json=task.card.to_json())

    @_abort_on_error
    def ReloadRegistry(self, request, context):  # admin: TokenAuth lets only the admin token through
        tasks, changed = self.engine.reload()
        return cit_pb2.ReloadRegistryResponse(tasks=tasks, changed=changed)


def build_server(engine: Engine, config: ServerConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready gRPC server with cit, health checking and reflection; returns it, its bound port and its
    health servicer (set NOT_SERVING before a graceful stop)."""
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=options,
                         interceptors=[TokenAuth(config, SERVICE_NAME)])
    add_servicer(CitServicer(engine), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    credentials = server_credentials(config)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port, health_servicer
