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


def read_varuint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(offset, min(len(data), offset + 5)):
        byte = data[index]
        value |= (byte & 127) << shift
        shift += 7
        if byte < 128:
            return value, index + 1
    raise MalformedMessage("live message has a bad length field")
