"""Errors raised by :mod:`registry`.

Local errors are our own mistakes or refusals (a record that does not verify, a
limit we enforce); remote errors come from a registry or peer that answered
badly or not at all. Every message says what happened and what to do.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every error raised by the registry package."""


class RecordError(RegistryError):
    """A node record is malformed, badly signed, expired or stale."""


class BadEndpoint(RecordError):
    """A record's LAN or registry URL is not the bare ``http(s)://host:port`` it must be."""


class StaleRecord(RecordError):
    """A record's sequence number is not newer than the one already held."""

    def __init__(self, message: str, held: int | None = None) -> None:
        super().__init__(message)
        self.held = held  # the sequence already held, when known for sure
        self.held_wire = b""  # the record a registry says it holds (unverified)


class LimitExceeded(RegistryError):
    """An input is over a size, count or rate limit."""


class AuthError(RegistryError):
    """A WebSocket peer failed the challenge (bad signature, wrong registry, wrong key)."""


class TrustError(RegistryError):
    """The trust store refused an operation (unknown peer, key mismatch, revoked)."""


class TlsSetupError(RegistryError):
    """A certificate, key or CA file named for registry TLS cannot be used."""


class RegistryUnavailable(RegistryError):
    """A registry or LAN endpoint could not be reached."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"registry {url} is unreachable ({reason}): check the URL and that it is running; "
            "known peers stay reachable from remembered records"
        )
        self.url = url


class KeyInUse(RegistryError):
    """A registry closed this node's socket because another socket authenticated with the
    same node key: the node stops using that registry rather than fight over it."""

    def __init__(self, url: str) -> None:
        super().__init__(
            f"another process is connected to registry {url} with this node's key, so the "
            "registry closed this socket and this node stopped using that registry (LAN peers and "
            "open connections still work). Started twice? Stop the other copy, then restart "
            "this one. If not, the key may be stolen: note it (`radmesh id --show-key`), have "
            "your organisation revoke it (`radmesh org revoke ORG_DIR --node-key KEY`), then make "
            "a new identity with `radmesh init --force` (it rewrites the config: keep a copy; "
            "peers verify the new id again)"
        )
        self.url = url


class RemoteRegistryError(RegistryError):
    """A registry answered with an error status."""

    def __init__(self, url: str, status: int, error: str, hint: str = "") -> None:
        text = f"registry {url} refused the request (HTTP {status}): {error}"
        if hint:
            text += f"; {hint}"
        super().__init__(text)
        self.url = url
        self.status = status
        self.error = error
        self.hint = hint


class RemoteRecordError(RegistryError):
    """A registry or peer returned a record that does not verify: it is lying or broken."""
