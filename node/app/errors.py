"""The node application's errors, and the errors a command reports to its user.

Apart from :mod:`node.app.runtime` so that the services the runtime builds (consults,
guests, alerts) raise them without importing the runtime.
"""

from __future__ import annotations

from consult.errors import ConsultError
from crypto.errors import CryptoError
from node.core.errors import NodeError
from peer_transport.errors import TransportError
from registry.errors import RegistryError


class RuntimeError_(NodeError):
    """The node could not start or do what was asked; the message says why."""


# What a command (the CLI, the control socket) reports as one readable line; anything
# else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    CryptoError,
    NodeError,
    RegistryError,
    TransportError,
    ConsultError,
)

__all__ = ["USER_ERRORS", "RuntimeError_"]
