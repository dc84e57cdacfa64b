"""The gRPC servicer (grpc.aio): convert protobuf -> engine call -> protobuf. Errors map to status codes in one place.

The server is asyncio: a request waiting for its tokens holds no thread, so the only bound on requests in flight is
the engine's admission (--max-requests), and health and reflection are answered on the event loop whatever the load
— the loop itself never runs blocking work (decoding, registry reads and generation run on the engine's threads).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import threading
from collections.abc import Callable

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cit_backbone.sampling import Sampling
from cit_proto import cit_pb2, cit_pb2_grpc
from cit_registry.lifecycle import Action, Change
from cit_registry.store import InvalidCard, LifecycleError, TaskNotFound, TaskVersion

from .adapter_cache import CacheFull
from .config import ServerConfig
from .engine import Cancelled, Completion, Delta, Engine, Request, RouteDecision
from .scheduler import Overloaded
from .security import TokenAuth, public_card, server_credentials
from .vllm_engine import WorkerError

log = logging.getLogger("cit.server")
SERVICE_NAME = cit_pb2.DESCRIPTOR.services_by_name["Cit"].full_name
MAX_ROUTE_CANDIDATES = 50
HEALTH_POLL_S = 0.25  # how often health follows the engine's readiness (a vLLM worker being restarted)


def status_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, Cancelled):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, (Overloaded, CacheFull)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, TaskNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, LifecycleError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, WorkerError):  # the vLLM worker went away: a retry reaches the new one
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, InvalidCard):  # the registry's fault (a damaged card), not the caller's
        return grpc.StatusCode.INTERNAL
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


def add_servicer(servicer: CitServicer, server: grpc.aio.Server) -> None:
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
    """Bad input -> INVALID_ARGUMENT, unknown task -> NOT_FOUND, overload -> RESOURCE_EXHAUSTED, anything else ->
    INTERNAL with a log line."""

    async def fail(self, context: grpc.aio.ServicerContext, exc: Exception):
        code = status_of(exc)
        self.engine.metrics.requests.labels(method.__name__, code.name).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.error("internal error in %s", method.__name__, exc_info=exc)
        await context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else
                            f"internal error: {type(exc).__name__}")

    if method.__name__.endswith("Stream"):
        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                _check_decoded(request)
                async for response in method(self, request, context):
                    yield response
            except Exception as exc:  # noqa: BLE001 - every error gets a status
                await fail(self, context, exc)
            else:
                self.engine.metrics.requests.labels(method.__name__, "OK").inc()
        return stream_wrapper

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            _check_decoded(request)
            response = await method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            await fail(self, context, exc)
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
        fell_back=d.fell_back is not None, forced=d.forced, margin=d.margin,
        fell_back_because=f"FALL_BACK_{d.fell_back.name}" if d.fell_back else "FALL_BACK_NONE",
        nearer=d.nearer or "",
        candidates=[cit_pb2.Candidate(task_id=c.task_id, version=c.version, score=c.score,
                                      image_similarity=c.image, instruction_similarity=c.instruction,
                                      image_floor=c.image_floor, instruction_floor=c.instruction_floor)
                    for c in d.candidates],
    )


# The proto's TaskChange values are the registry's lifecycle actions by name (TASK_CHANGE_RETIRE -> Action.RETIRE):
# a value added to the proto without its action fails here, at import, not on a request.
LIFECYCLE_CHANGES = {value: Action(name.removeprefix("TASK_CHANGE_").lower())
                     for name, value in cit_pb2.TaskChange.items() if value != cit_pb2.TASK_CHANGE_UNSPECIFIED}


def to_history_pb(c: Change) -> cit_pb2.HistoryEntry:
    return cit_pb2.HistoryEntry(at=c.at, who=c.who, action=c.action.value, task_id=c.task or "", version=c.version,
                                detail_json=json.dumps(c.detail, sort_keys=True))


def to_summary_pb(t: TaskVersion, residency: str) -> cit_pb2.TaskSummary:
    """A task's summary (reads its key file's header: call it off the event loop); `residency` as
    Engine.residency says."""
    try:
        centroids = t.centroids()
    except Exception:  # noqa: BLE001 - a damaged key is verify's finding; the listing goes on
        log.warning("task %s v%d: its key cannot be read", t.task_id, t.version)
        centroids = 0
    return cit_pb2.TaskSummary(
        task_id=t.task_id, version=t.version, adapter_kind=t.card.adapter_kind,
        decision=t.card.decision.get("action", ""), created_at=t.card.created_at, centroids=centroids,
        residency=f"RESIDENCY_{residency.upper()}",
    )


class CitServicer(cit_pb2_grpc.CitServicer):
    def __init__(self, engine: Engine, auth: TokenAuth) -> None:
        self.engine, self.auth = engine, auth

    def _request(self, r: cit_pb2.GenerateRequest) -> Request:
        return Request(r.image, r.instruction, to_sampling(r.sampling, self.engine.config.default_max_new_tokens),
                       r.task_id if r.HasField("task_id") else None)

    @_abort_on_error
    async def Generate(self, request, context):
        # A client that cancels or whose deadline passes cancels this coroutine: generation stops at the next step.
        decision, done = await self.engine.agenerate(self._request(request))
        return cit_pb2.GenerateResponse(text=done.text, route=to_route_pb(decision), finish_reason=done.finish_reason,
                                        prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)

    @_abort_on_error
    async def GenerateStream(self, request, context):
        async for output in self.engine.astream(self._request(request)):
            if isinstance(output, RouteDecision):
                yield cit_pb2.GenerateStreamResponse(route=to_route_pb(output))
            elif isinstance(output, Delta):
                yield cit_pb2.GenerateStreamResponse(delta=output.text)
            elif isinstance(output, Completion):
                yield cit_pb2.GenerateStreamResponse(finish_reason=output.finish_reason,
                                                     prompt_tokens=output.prompt_tokens,
                                                     completion_tokens=output.completion_tokens)

    @_abort_on_error
    async def Route(self, request, context):
        k = request.top_k or 5
        if k > MAX_ROUTE_CANDIDATES:
            raise ValueError(f"top_k must be at most {MAX_ROUTE_CANDIDATES}, got {k}")
        with self.engine.admission.slot():  # it runs the vision tower and the embedder: it counts as a request
            decision = await self.engine.call(
                lambda: self.engine.front.route(self.engine.front.embed(request.image, request.instruction), k=k))
        return cit_pb2.RouteResponse(route=to_route_pb(decision))

    @_abort_on_error
    async def ListTasks(self, request, context):
        with self.engine.admission.slot():
            summaries = await self.engine.call(
                lambda: [to_summary_pb(t, self.engine.residency(t)) for t in self.engine.tasks()])
            return cit_pb2.ListTasksResponse(tasks=summaries)

    @_abort_on_error
    async def GetTask(self, request, context):
        with self.engine.admission.slot():
            task, summary = await self.engine.call(
                lambda: (t := self.engine.task(request.task_id), to_summary_pb(t, self.engine.residency(t))))
        # What the trainer read its data from (paths on its machine) is for operators: the admin token only.
        card = task.card if self.auth.is_admin(context.invocation_metadata()) else public_card(task.card)
        return cit_pb2.GetTaskResponse(task=summary, card_json=card.to_json())

    @_abort_on_error
    async def ReloadRegistry(self, request, context):  # admin: TokenAuth lets only the admin token through
        tasks, changed = await self.engine.call(self.engine.front.reload)
        return cit_pb2.ReloadRegistryResponse(tasks=tasks, changed=changed)

    @_abort_on_error
    async def ChangeTask(self, request, context):  # admin
        if request.change not in LIFECYCLE_CHANGES:
            raise ValueError("change must be one of " + ", ".join(cit_pb2.TaskChange.Name(c) for c in LIFECYCLE_CHANGES))
        version = request.version if request.HasField("version") else None
        change, serving = await self.engine.call(lambda: self.engine.change_task(
            request.task_id, LIFECYCLE_CHANGES[request.change], version, f"admin-rpc {context.peer()}"))
        return cit_pb2.ChangeTaskResponse(changed=change is not None, serving_version=serving or 0,
                                          entry=to_history_pb(change) if change else None)

    @_abort_on_error
    async def GetHistory(self, request, context):  # admin
        changes = await self.engine.call(self.engine.registry.history)
        if request.task_id:
            changes = [c for c in changes if c.task == request.task_id]
        if request.limit:
            changes = changes[-request.limit:]
        return cit_pb2.GetHistoryResponse(entries=[to_history_pb(c) for c in changes])


class CitServer:
    """cit, health checking and reflection on one grpc.aio server; health follows the engine's readiness."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        options = [("grpc.max_receive_message_length", config.max_message_bytes),
                   ("grpc.max_send_message_length", config.max_message_bytes)]
        self.engine, self.config = engine, config
        self.auth = auth = TokenAuth(config, SERVICE_NAME)
        self.server = grpc.aio.server(options=options, interceptors=[auth])
        add_servicer(CitServicer(engine, auth), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        credentials = server_credentials(config)
        address = f"{config.host}:{config.port}"
        try:
            self.port = (self.server.add_secure_port(address, credentials) if credentials
                         else self.server.add_insecure_port(address))
        except RuntimeError as exc:  # grpc.aio raises where the sync server returns 0
            raise OSError(f"could not bind {address}: {exc}") from None
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self._serving: bool | None = None
        self._follow: asyncio.Task | None = None

    async def start(self) -> None:
        await self._set_health(self.engine.ready())
        await self.server.start()
        self._follow = asyncio.create_task(self._follow_engine())

    async def _set_health(self, serving: bool) -> None:
        if serving == self._serving:
            return
        if self._serving is not None:
            log.warning("health: %s", "SERVING" if serving else "NOT_SERVING (the engine cannot serve now)")
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _follow_engine(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await self._set_health(self.engine.ready())

    async def stop(self, grace: float) -> None:
        """Graceful stop, as vLLM's gRPC server does: health says NOT_SERVING first, new RPCs are refused,
        in-flight ones get `grace` seconds."""
        if self._follow is not None:
            self._follow.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


class BackgroundServer:
    """A started CitServer on an event loop of its own thread, for benchmarks and tests that drive an in-process
    engine: `with BackgroundServer(engine, config) as server: CitClient(f"127.0.0.1:{server.port}")`."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cit-grpc", daemon=True)
        self._thread.start()

        async def start() -> CitServer:
            server = CitServer(engine, config)
            await server.start()
            return server
        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        self.port = self.server.port

    def stop(self, grace: float = 0.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
