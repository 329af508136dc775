"""Canonical msgpack: one byte string for one value, so signatures are reproducible.

The canonical form:
- allowed types: None, bool, int (64-bit range), str (UTF-8), bytes, list, dict;
  floats are refused because their encodings are ambiguous across platforms;
- ints and lengths use msgpack's shortest form (msgpack-python does this);
- map keys are str and sorted by their UTF-8 bytes; duplicate keys are refused;
- str and bytes are distinct types (``use_bin_type``).

``decode`` refuses anything that does not re-encode to the same bytes, so two
encodings of one value can never both carry a valid signature.
"""

from __future__ import annotations

from typing import Any

import msgpack

from crypto.errors import EncodingError

DEFAULT_MAX_SIZE = 1 << 20

Value = None | bool | int | str | bytes | list["Value"] | dict[str, "Value"]


def _normalise(value: Any, depth: int = 0) -> Any:
    if depth > 32:
        raise EncodingError("value nests deeper than 32 levels")
    if value is None or isinstance(value, bool | str | bytes):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise EncodingError(f"integer out of 64-bit range: {value}")
        return value
    if isinstance(value, list | tuple):
        return [_normalise(v, depth + 1) for v in value]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise EncodingError(f"map keys must be str, not {type(key).__name__}")
        return {k: _normalise(value[k], depth + 1) for k in sorted(value, key=lambda s: s.encode())}
    raise EncodingError(f"type {type(value).__name__} has no canonical encoding")


def encode(value: Any) -> bytes:
    """Encode ``value`` canonically. Tuples encode as lists."""
    packed: bytes = msgpack.packb(_normalise(value), use_bin_type=True)
    return packed


def _no_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise EncodingError("map has duplicate keys")
    return result


def decode(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Any:
    """Decode canonical bytes; the size cap is checked before any parsing."""
    if len(data) > max_size:
        raise EncodingError(f"encoded value is {len(data)} bytes, limit is {max_size}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_no_duplicates,
        )
    except EncodingError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise EncodingError(f"malformed msgpack: {exc}") from exc
    except Exception as exc:  # msgpack raises several undocumented types
        raise EncodingError(f"malformed msgpack: {exc}") from exc
    try:
        again = encode(value)
    except EncodingError as exc:
        raise EncodingError(f"not canonical: {exc}") from exc
    if again != data:
        raise EncodingError("not canonical: re-encoding gives different bytes")
    return value
