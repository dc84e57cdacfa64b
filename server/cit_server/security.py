"""Who may call: a bearer token checked by an interceptor, and TLS credentials. Health and reflection stay open."""
from __future__ import annotations

import hmac

import grpc

from .config import ServerConfig


class TokenAuth(grpc.ServerInterceptor):
    """Every RPC whose full name starts with `prefix` needs metadata `authorization: Bearer <token>`."""

    def __init__(self, token: str, prefix: str) -> None:
        self._expected = f"Bearer {token}".encode()
        self._prefix = prefix

    def intercept_service(self, continuation, details):
        if not details.method.startswith(self._prefix):
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization")
        if given is not None and hmac.compare_digest(given.encode(), self._expected):  # constant time
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None
        message = ("missing bearer token: send metadata 'authorization: Bearer <token>'" if given is None
                   else "wrong bearer token")

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
