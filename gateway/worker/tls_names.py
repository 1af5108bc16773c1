"""A pool worker that requires client certificates may also require a name in them
(pools[].tls.allowed_client_names): the mesh's CA may sign certificates for more than its gateways.
The handshake already proved the certificate is the CA's and unexpired; this checks the name, per
request (aiohttp has no per-connection hook), and answers 403 in OpenAI's error shape."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.core.tls import peer_names

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def client_name_middleware(allowed: frozenset[str]) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
        if sslobj is None or not (peer_names(sslobj.getpeercert()) & allowed):
            return web.json_response({"error": {
                "message": "this pool serves only the mesh's gateways: the client certificate's name is not allowed",
                "type": "permission_error", "param": None, "code": "client_certificate_not_allowed"}}, status=403)
        return await handler(request)

    return check
