"""Reading and writing the node's identity key file."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from crypto import keyfile
from crypto.errors import EncodingError, WrongPassphrase
from crypto.identity import Identity
from node.core.errors import KeyFileError
from node.core.private import write_private

PASSPHRASE_ENV = "RADMESH_PASSPHRASE"  # noqa: S105 - an env var name
PLAIN_WARNING = (
    "warning: the identity key is stored WITHOUT a passphrase (file mode 0600). "
    "Anyone who can read {path} can act as this node."
)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, data)


def save_identity(
    path: Path,
    identity: Identity,
    passphrase: str | None,
    cost: keyfile.KdfCost | None = None,
    *,
    warn: bool = True,
) -> None:
    """Write the key file; ``passphrase=None`` is the explicit plain opt-out (warned about)."""
    if passphrase is None:
        _write_private(path, keyfile.plain_seed(identity.seed))
        if warn:
            print(PLAIN_WARNING.format(path=path), file=sys.stderr)
    else:
        _write_private(path, keyfile.encrypt_seed(identity.seed, passphrase, cost))


def passphrase_from_env_or_prompt(prompt: str = "Key file passphrase: ") -> str | None:
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return None


def _rewrap_if_weak(path: Path, data: bytes, identity: Identity, passphrase: str) -> None:
    """A key file written with a cheaper KDF than today's default (an older radmesh used
    Argon2id INTERACTIVE) is written again with the default, now that we have the
    passphrase; the old cost still opened it, as it is stored in the file."""
    cost = keyfile.cost_of(data)
    if cost is None or not cost.weaker_than(keyfile.DEFAULT_COST):
        return
    try:
        save_identity(path, identity, passphrase)
    except OSError as exc:
        print(
            f"warning: {path} uses a weaker key derivation than the default and could not "
            f"be rewritten ({exc}); check the file's permissions",
            file=sys.stderr,
        )


def load_identity(path: Path, passphrase: str | None = None) -> Identity:
    """Unlock the key file; the passphrase comes from the argument, the env or a prompt."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"no key file at {path}: run `radmesh init`") from exc
    try:
        if keyfile.is_encrypted(data) and passphrase is None:
            passphrase = passphrase_from_env_or_prompt()
            if passphrase is None:
                raise KeyFileError(
                    f"{path} is passphrase-protected: set {PASSPHRASE_ENV} or run interactively"
                )
        identity = Identity(keyfile.decrypt_seed(data, passphrase))
        if passphrase is not None:
            _rewrap_if_weak(path, data, identity, passphrase)
        return identity
    except WrongPassphrase as exc:
        raise KeyFileError(str(exc)) from exc
    except EncodingError as exc:
        raise KeyFileError(f"{path} is damaged or not a radmesh key file: {exc}") from exc
