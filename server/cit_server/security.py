"""Who may call: a bearer token checked by an interceptor, and TLS credentials. Health and reflection stay open."""
from __future__ import annotations

import dataclasses
import hmac

import grpc

from cit_registry.store import TaskCard

from .config import ServerConfig

ADMIN_METHODS = frozenset({"ReloadRegistry", "ChangeTask", "GetHistory"})  # RPCs that change what the server does: the admin token only
PRIVATE_DATASET_FIELDS = ("train", "test")  # where the trainer read a data set: paths on its machine


class TokenAuth(grpc.aio.ServerInterceptor):
    """Bearer tokens (metadata `authorization: Bearer <token>`) on the cit service: admin RPCs need the admin
    token, and are refused when the server has none; the other RPCs need the auth token or the admin token when
    an auth token is set, and are open otherwise. Health and reflection are always open."""

    def __init__(self, config: ServerConfig, service: str) -> None:
        self._prefix = f"/{service}/"
        self._admin = [f"Bearer {config.admin_token}".encode()] if config.admin_token else []
        self._user = [f"Bearer {config.auth_token}".encode()] + self._admin if config.auth_token else None

    def is_admin(self, metadata) -> bool:
        """Whether a call's metadata holds the admin token."""
        return _holds(dict(metadata or ()).get("authorization"), self._admin)

    def denied(self, given: str | None, admin: bool) -> str | None:
        """Why a call with the `authorization` value `given` is refused (None: let in), for an admin RPC or not.
        Every front door (gRPC here, the OpenAI HTTP API) asks this."""
        accepted = self._admin if admin else self._user
        if accepted is None or _holds(given, accepted):
            return None
        if admin and not accepted:
            return "admin RPCs are off: start the server with --admin-token (or CIT_ADMIN_TOKEN)"
        if given is None:
            return "missing bearer token: send 'authorization: Bearer <token>'"
        return "wrong bearer token" + (" (this RPC needs the admin token)" if admin else "")

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(self._prefix):
            return await continuation(details)
        admin = details.method[len(self._prefix):] in ADMIN_METHODS
        message = self.denied(dict(details.invocation_metadata).get("authorization"), admin)
        if message is None:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # never reached: makes this an async generator, as a streaming handler must be

        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


def _holds(given: str | None, accepted: list[bytes]) -> bool:
    # compare_digest: constant time; every accepted token is compared, so the time says nothing either
    return given is not None and sum(hmac.compare_digest(given.encode(), token) for token in accepted) > 0


def public_card(card: TaskCard) -> TaskCard:
    """A task card without the trainer's data paths: what callers without the admin token see."""
    datasets = [{k: v for k, v in d.items() if k not in PRIVATE_DATASET_FIELDS} for d in card.datasets]
    return dataclasses.replace(card, datasets=datasets)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from PEM files; with a client CA, clients must present a certificate it signed."""
    if config.tls_cert is None:
        return None
    assert config.tls_key is not None  # ServerConfig asks for both files or neither
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)
