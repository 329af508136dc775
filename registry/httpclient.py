"""The one way registry code makes an HTTP client session: redirects are refused.

A registry or a peer's LAN endpoint answering ``302 Location: http://127.0.0.1:8042/...``
would otherwise make this node request an address of the other side's choosing
(aiohttp follows redirects by default, ``ws_connect`` included).
"""

from __future__ import annotations

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

REDIRECTS = (301, 302, 303, 307, 308)


class RedirectRefused(aiohttp.ClientError):
    """The server answered with a redirect; radmesh never follows one."""


async def refuse_redirects(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    response = await handler(request)
    if response.status in REDIRECTS:
        response.release()
        raise RedirectRefused(
            f"{request.url.host}:{request.url.port} answered with a redirect "
            f"(HTTP {response.status}); radmesh does not follow redirects: "
            "use the final URL in the configuration"
        )
    return response


def client_session(timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout), middlewares=(refuse_redirects,)
    )
