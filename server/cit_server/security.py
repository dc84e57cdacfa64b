"""Who may call: a bearer token checked by an interceptor, and TLS credentials. Health and reflection stay open."""
from __future__ import annotations

import hmac

import grpc

from .config import ServerConfig


ADMIN_METHODS = frozenset({"ReloadRegistry"})  # RPCs that change what the server does: the admin token only


class TokenAuth(grpc.ServerInterceptor):
    """Bearer tokens (metadata `authorization: Bearer <token>`) on the cit service: admin RPCs need the admin
    token, and are refused when the server has none; the other RPCs need the auth token or the admin token when
    an auth token is set, and are open otherwise. Health and reflection are always open."""

    def __init__(self, config: ServerConfig, service: str) -> None:
        self._prefix = f"/{service}/"
        self._admin = [f"Bearer {config.admin_token}".encode()] if config.admin_token else []
        self._user = [f"Bearer {config.auth_token}".encode()] + self._admin if config.auth_token else None

    def intercept_service(self, continuation, details):
        if not details.method.startswith(self._prefix):
            return continuation(details)
        admin = details.method[len(self._prefix):] in ADMIN_METHODS
        accepted = self._admin if admin else self._user
        if accepted is None:
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization")
        # compare_digest: constant time; every accepted token is compared, so the time says nothing either
        if given is not None and sum(hmac.compare_digest(given.encode(), token) for token in accepted):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        if admin and not accepted:
            message = "admin RPCs are off: start the server with --admin-token (or CIT_ADMIN_TOKEN)"
        elif given is None:
            message = "missing bearer token: send metadata 'authorization: Bearer <token>'"
        else:
            message = "wrong bearer token" + (" (this RPC needs the admin token)" if admin else "")

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        def deny_stream(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # never reached: makes this a generator, as a streaming handler must be

        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from PEM files; with a client CA, clients must present a certificate it signed."""
    if config.tls_cert is None:
        return None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)
