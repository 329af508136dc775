"""The one way registry code makes an HTTP client session: redirects are refused, and
TLS is verified against the system's CAs plus any CA file the operator named.

A registry or a peer's LAN endpoint answering ``302 Location: http://127.0.0.1:8042/...``
would otherwise make this node request an address of the other side's choosing
(aiohttp follows redirects by default, ``ws_connect`` included).

A registry served with a private CA (``radmesh registry run --tls-cert``, a hospital's
own PKI) is trusted by adding that CA, never by turning verification off: the
certificate chain and the host name are always checked.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse

from registry.errors import TlsSetupError

REDIRECTS = (301, 302, 303, 307, 308)
# CA files every registry connection of this process trusts besides the system's: the
# home's ``[network] registry_ca_file``, set once by the command line (trust_ca_file).
_process_ca_files: list[str] = []


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


def tls_context(ca_files: Sequence[str]) -> ssl.SSLContext:
    """A verifying client context: the system's CAs plus ``ca_files`` (PEM)."""
    context = ssl.create_default_context()  # CERT_REQUIRED, host names checked
    for path in ca_files:
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(
                f"cannot use {path} as the registry CA ({exc}): name a readable PEM "
                "certificate ([network] registry_ca_file in config.toml, or "
                "`radmesh registry add URL --ca FILE`)"
            ) from exc
    return context


def trust_ca_file(path: str | Path) -> None:
    """Trust ``path`` (PEM) for every registry connection this process makes from now on."""
    text = str(Path(path).expanduser())
    tls_context([text])  # refuses an unusable file now, with its name, not at connect time
    if text not in _process_ca_files:
        _process_ca_files.append(text)


def untrusted_certificate(exc: aiohttp.ClientConnectorCertificateError) -> str:
    """Why a registry's certificate was refused, and what the operator does about it."""
    reason = getattr(exc.certificate_error, "verify_message", "") or str(exc.certificate_error)
    return (
        f"its TLS certificate is not trusted: {reason[:200]}; if it is signed by your own "
        "CA, add the CA with `radmesh registry add URL --ca FILE`"
    )


def client_session(timeout: float, *, ca_files: Sequence[str] = ()) -> aiohttp.ClientSession:
    """``ca_files``: CAs to trust besides the system's (and the process's, trust_ca_file)."""
    extra = [*_process_ca_files, *(f for f in ca_files if f not in _process_ca_files)]
    connector = aiohttp.TCPConnector(ssl=tls_context(extra)) if extra else None
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout),
        middlewares=(refuse_redirects,),
        connector=connector,
    )
