"""The y-protocols variable-length unsigned integer, read with bounds checks."""

from __future__ import annotations

from consult.errors import MalformedMessage


def varuint(num: int) -> bytes:
    out = bytearray()
    while num > 127:
        out.append(128 | (num & 127))
        num >>= 7
    out.append(num)
    return bytes(out)


def read_varuint(
    data: bytes,
    offset: int,
    *,
    max_bytes: int = 5,
    error: str = "live message has a bad length field",
) -> tuple[int, int]:
    """(value, offset after it); at most ``max_bytes`` bytes (5 for lengths, 8 for the
    53-bit awareness client ids), else MalformedMessage(``error``)."""
    value = shift = 0
    for index in range(offset, min(len(data), offset + max_bytes)):
        byte = data[index]
        value |= (byte & 127) << shift
        shift += 7
        if byte < 128:
            return value, index + 1
    raise MalformedMessage(error)
