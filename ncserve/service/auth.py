"""Bearer-token check on every RPC except health checking.

The token is compared in constant time (digests of equal length through
``hmac.compare_digest``) and never logged or echoed in a message.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import grpc

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
AUTH_METADATA_KEY = "authorization"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._expected = _digest(f"Bearer {token}".encode())
        self._on_reject = on_reject

    def authorized(self, metadata: Any) -> bool:
        values = [v for k, v in (metadata or ()) if k == AUTH_METADATA_KEY]
        if len(values) != 1:
            return False
        value = values[0]
        raw = value if isinstance(value, bytes) else str(value).encode()
        return hmac.compare_digest(_digest(raw), self._expected)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES) or self.authorized(
            handler_call_details.invocation_metadata
        ):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_reject is not None:
            self._on_reject(method)
        return _rejecting(handler)


_MESSAGE = (
    "missing or invalid bearer token: send metadata 'authorization: Bearer <token>' "
    "with the token of the server's --token-file"
)


def _rejecting(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with UNAUTHENTICATED."""

    def reject(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(reject, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(reject, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(reject, **kwargs)
    return grpc.stream_stream_rpc_method_handler(reject, **kwargs)
