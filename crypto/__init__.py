"""radmesh crypto: identities, signatures, sealing, certificates. Pure, no I/O."""

from crypto.errors import CryptoError
from crypto.identity import Identity, NodeId
from crypto.safety import safety_number

__all__ = ["CryptoError", "Identity", "NodeId", "safety_number"]
