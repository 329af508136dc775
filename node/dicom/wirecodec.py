"""Lossless wire codec for DICOM instances: what goes over the link decides the speed.

``encode(original)`` gives a :class:`WireInstance`; ``decode(wire)`` gives the
original file back, byte for byte. Three encodings:

- ``jpegls``: the pixel value bytes of an eligible instance (uncompressed little
  endian, 8 or 16 bits allocated, one sample per pixel) are coded per frame with
  JPEG-LS lossless (CharLS); everything else (preamble, meta, every element, the
  pixel element's header) is the *residual*, coded with zstd, and the position
  of the pixel values in the original file is recorded.
- ``zstd``: the whole file with zstd, for everything else (already-compressed
  transfer syntaxes, big endian, colour, odd layouts) and for any instance whose
  JPEG-LS form does not round-trip.
- ``raw``: the file as it is, when zstd does not make it smaller.

Pixel values are mapped to JPEG-LS samples as ``(value - minimum) mod 2**bits``
in the pixel's own width, so signed data, garbage high bits beyond BitsStored
and any value range are all representable; a range that fits 8 bits is coded as
8-bit samples. CharLS runs through imagecodecs, which releases the GIL while it
codes, so decoding on the receiver does not stall the event loop that runs SCTP.
``encode`` always decodes its own output and compares SHA-256 before trusting
it; the hash also travels with the instance so the receiver checks it too. With
a :class:`PixelCache`, pixel codings verified before (keyed by the hash of the
pixel bytes and their shape) are reused and only the new residual is checked.

Why JPEG-LS and slice by slice: ``python -m bench codec`` measures the alternatives.
JPEG-XL lossless saves a median 8% at effort 3 (decoding slower than loopback
delivers) and 10% at effort 5 (encoding slower than a 20 Mbit/s link drains);
HTJ2K is larger; coding a slice as its difference to the previous one is larger on
every noisy series, since the two slices' noise adds up. None reaches the 15% that
would pay for a second decoder path, let alone for instances that depend on others.

Why one module: The three encodings, their framing and the byte-exact verification are
one format: a reader checks what a writer of the same module wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import threading
import warnings
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import imagecodecs
import msgpack
import numpy as np
import pydicom
import pydicom.encaps
import zstandard
from pydicom.tag import BaseTag

from node.core.errors import NodeError

WIRE_VERSION = 1
CACHE_VERSION = 1  # of the pixel mapping and the cached coding: bump to orphan old entries
PIXEL_DATA_TAG = 0x7FE00010
UNCOMPRESSED_LE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
#: Transfer syntaxes whose pixel data is not compressed (zstd may still help).
UNCOMPRESSED = UNCOMPRESSED_LE | {"1.2.840.10008.1.2.2"}
MAX_WIRE_SIZE = 2 << 30  # 2 GiB: the largest instance a node accepts
ZSTD_LEVEL = 3
ZSTD_FAST_LEVEL = 1
#: Below this ratio of coded to original size, compression is not worth its CPU.
WORTH_IT = 0.97


class WireCodecError(NodeError):
    """An instance could not be encoded or decoded."""


class CorruptInstance(WireCodecError):
    """A wire instance does not decode to the bytes it claims to carry."""


class Oversized(CorruptInstance):
    """A wire instance declares more output (zstd content size, JPEG-LS dimensions) than
    the size it must decode to: a decompression bomb, refused before anything is
    allocated for it. Only a faulty or hostile sender makes one."""


class BadInstance(WireCodecError):
    """A file is not a DICOM instance the node can send (unreadable or truncated)."""


class Encoding(StrEnum):
    JPEGLS = "jpegls"
    ZSTD = "zstd"
    RAW = "raw"


@dataclass(frozen=True)
class PixelLayout:
    """Where the pixel values sit in the original file and how they were mapped."""

    offset: int
    length: int
    rows: int
    columns: int
    frames: int
    bytes_per_sample: int  # 1 or 2
    shift: int  # subtracted (mod 2**(8*bytes_per_sample)) before coding
    precision: int  # bits per JPEG-LS sample, 2..16

    def to_list(self) -> list[int]:
        return [
            self.offset,
            self.length,
            self.rows,
            self.columns,
            self.frames,
            self.bytes_per_sample,
            self.shift,
            self.precision,
        ]

    @classmethod
    def from_list(cls, raw: Any) -> PixelLayout:
        if not (isinstance(raw, list) and len(raw) == 8 and all(type(v) is int for v in raw)):
            raise CorruptInstance("wire instance: malformed pixel layout")
        layout = cls(*raw)
        samples = layout.rows * layout.columns * layout.frames
        if (
            layout.bytes_per_sample not in (1, 2)
            or not 2 <= layout.precision <= 8 * layout.bytes_per_sample
            or min(layout.offset, layout.rows, layout.columns, layout.frames, layout.shift) < 0
            or samples * layout.bytes_per_sample != layout.length
        ):
            raise CorruptInstance("wire instance: inconsistent pixel layout")
        return layout


@dataclass(frozen=True)
class CodedPixels:
    """A verified JPEG-LS coding of one instance's pixel values, as a cache keeps it.

    ``frames`` empty means JPEG-LS does not pay for (or does not round-trip) these
    pixels: the instance goes plainly.
    """

    shift: int
    precision: int
    frames: tuple[bytes, ...]


NOT_WORTH_IT = CodedPixels(0, 2, ())


class PixelCache(Protocol):
    """Verified pixel codings by :func:`pixel_key`; ``node.dicom.wirecache.WireCache`` fits.

    ``get`` returns None for a missing or damaged entry, never a damaged one.
    """

    def get(self, key: bytes) -> CodedPixels | None: ...

    def put(self, key: bytes, coded: CodedPixels) -> None: ...


@dataclass(frozen=True)
class WireInstance:
    encoding: Encoding
    original_size: int
    sha256: bytes
    body: bytes  # zstd residual (jpegls), zstd file (zstd) or the file (raw)
    layout: PixelLayout | None = None
    frames: tuple[bytes, ...] = ()  # one JPEG-LS codestream per frame

    @property
    def wire_size(self) -> int:
        return len(self.body) + sum(len(f) for f in self.frames)

    def to_wire(self) -> bytes:
        packed: bytes = msgpack.packb(
            [
                WIRE_VERSION,
                self.encoding.value,
                self.original_size,
                self.sha256,
                self.body,
                self.layout.to_list() if self.layout else None,
                list(self.frames),
            ],
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_wire(cls, data: bytes, max_size: int = MAX_WIRE_SIZE) -> WireInstance:
        if len(data) > max_size:
            raise CorruptInstance(f"wire instance of {len(data)} bytes exceeds {max_size}")
        try:
            raw = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                max_bin_len=max_size,
                max_str_len=64,
                max_array_len=1 << 20,
                max_map_len=0,
                max_ext_len=0,
            )
        except (ValueError, msgpack.UnpackException) as exc:
            raise CorruptInstance(f"wire instance is not valid msgpack: {exc}") from exc
        if not (isinstance(raw, list) and len(raw) == 7):
            raise CorruptInstance("wire instance: wrong shape")
        version, encoding, size, sha, body, layout, frames = raw
        if version != WIRE_VERSION:
            raise CorruptInstance(f"wire instance version {version!r} is not supported")
        if encoding not in {e.value for e in Encoding}:
            raise CorruptInstance(f"wire instance: unknown encoding {encoding!r}")
        if not (
            type(size) is int
            and 0 <= size <= MAX_WIRE_SIZE
            and isinstance(sha, bytes)
            and len(sha) == 32
            and isinstance(body, bytes)
            and isinstance(frames, list)
            and all(isinstance(f, bytes) for f in frames)
        ):
            raise CorruptInstance("wire instance: wrong field types")
        parsed_layout = None if layout is None else PixelLayout.from_list(layout)
        if (encoding == Encoding.JPEGLS) != (parsed_layout is not None):
            raise CorruptInstance("wire instance: pixel layout does not match encoding")
        if parsed_layout is not None and len(frames) != parsed_layout.frames:
            raise CorruptInstance("wire instance: frame count does not match layout")
        return cls(Encoding(encoding), size, sha, body, parsed_layout, tuple(frames))


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- decoding -----------------------------------------------------------------------------

_SOI, _SOF55, _LSE, _SOS = 0xD8, 0xF7, 0xF8, 0xDA
_LSE_OVERSIZE = 4  # an LSE segment that sets image dimensions beyond the frame header's
# Frame headers of the JPEG family (ITU T.81 SOF0-15 but DHT, JPG, DAC; T.87 SOF55).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE})
_JPEG_SOF |= {0xCF, _SOF55}


def jpegls_header(stream: bytes) -> tuple[int, int, int, int]:
    """(rows, columns, components, bits) from a JPEG-LS codestream's frame header, read
    without decoding. Raises :class:`CorruptInstance` for a stream without exactly one
    readable frame header before its scan, or one that sets its size elsewhere."""
    return _jpeg_header(stream, frozenset({_SOF55}))


def _jpeg_header(stream: bytes, frame_markers: frozenset[int]) -> tuple[int, int, int, int]:
    if stream[:2] != b"\xff\xd8":
        raise CorruptInstance("JPEG-LS frame does not start with a start-of-image marker")
    found: tuple[int, int, int, int] | None = None
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            raise CorruptInstance("JPEG-LS frame has a damaged marker segment")
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        segment = stream[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            raise CorruptInstance("JPEG-LS frame has a truncated marker segment")
        if marker == _SOS:
            if found is None:
                break
            return found
        if marker in frame_markers:
            if found is not None or len(segment) < 6:
                raise CorruptInstance("JPEG-LS frame has a repeated or short frame header")
            found = (
                int.from_bytes(segment[1:3], "big"),
                int.from_bytes(segment[3:5], "big"),
                segment[5],
                segment[0],
            )
        elif marker == _LSE and segment[:1] == bytes([_LSE_OVERSIZE]):
            raise CorruptInstance("JPEG-LS frame sets its dimensions outside the frame header")
        pos += 2 + length
    raise CorruptInstance("JPEG-LS frame has no frame header before its scan")


def _j2k_header(stream: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ segment."""
    siz = stream[6:42]
    if len(siz) != 36:
        raise CorruptInstance("JPEG 2000 frame has a truncated SIZ segment")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", siz[2:18])
    return ysiz - yosiz, xsiz - xosiz, int.from_bytes(siz[34:36], "big")


def check_pixels(ds: pydicom.Dataset, limit: int) -> None:
    """Refuse (:class:`Oversized`) an instance whose pixels would decode to more than
    ``limit`` bytes, or whose compressed frames (JPEG, JPEG-LS, JPEG 2000) claim more
    rows, columns or samples than the data set declares: a viewer allocates what they
    claim. Checked on what a peer sends before it is stored, without decoding."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        width = max(1, (int(ds.get("BitsAllocated") or 8) + 7) // 8)
    except (TypeError, ValueError):
        return  # no image a viewer could allocate for
    declared = rows * columns * max(frames, 1) * max(samples, 1) * width
    if declared > limit:
        raise Oversized(f"its pixels would decode to {declared} bytes, over the {limit} limit")
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if "PixelData" not in ds or syntax is None or not syntax.is_encapsulated:
        return
    try:
        fragments = list(pydicom.encaps.generate_fragments(ds.PixelData))
    except Exception as exc:  # pydicom raises several types for damaged items
        raise CorruptInstance(f"encapsulated pixel data is damaged: {exc}") from exc
    for fragment in fragments:
        if fragment[:2] == b"\xff\xd8":
            height, width_, components, _bits = _jpeg_header(fragment, _JPEG_SOF)
        elif fragment[:4] == b"\xff\x4f\xff\x51":
            height, width_, components = _j2k_header(fragment)
        else:
            continue  # a continuation fragment, or a format whose header is not read here
        if height > rows or width_ > columns or components > max(samples, 3):
            raise Oversized(
                f"a compressed frame claims {width_}x{height}x{components} where the data set "
                f"declares {columns}x{rows}x{samples}"
            )


def _zstd_declared(data: bytes) -> int:
    try:
        declared: int = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise CorruptInstance(f"zstd frame is damaged: {exc}") from exc
    return declared


def check_declared(wire: WireInstance, size: int) -> None:
    """Check every size ``wire`` declares against ``size``, the bytes it must decode to
    (the manifest's), before anything is decompressed or allocated.

    Raises :class:`Oversized` when the declarations do not add up to ``size``: zstd
    output (whatever the frame says), JPEG-LS frames (whatever their headers say, so a
    2 KB stream claiming 65535x65535 costs nothing), the pixel layout.
    """
    if wire.original_size != size:
        raise Oversized(f"wire instance declares {wire.original_size} bytes, expected {size}")
    if wire.encoding is Encoding.RAW:
        if len(wire.body) != size:
            raise Oversized(f"raw instance has {len(wire.body)} bytes, expected {size}")
        return
    layout = wire.layout
    residual = size if layout is None else size - layout.length
    if residual < 0 or (layout is not None and layout.offset > residual):
        raise Oversized("wire instance: its pixel layout does not fit its declared size")
    declared = _zstd_declared(wire.body)
    if declared != residual:
        raise Oversized(f"zstd frame declares {declared} bytes, expected {residual}")
    if layout is None:
        return
    if len(wire.frames) != layout.frames:  # a missing frame would leave pixels unwritten
        raise CorruptInstance(
            f"wire instance carries {len(wire.frames)} frames where its layout has {layout.frames}"
        )
    bits = 16 if layout.precision > 8 else 8
    for i, stream in enumerate(wire.frames):
        rows, columns, components, precision = jpegls_header(stream)
        if (rows, columns, components) != (layout.rows, layout.columns, 1) or not (
            bits - 7 <= precision <= bits
        ):
            raise Oversized(
                f"JPEG-LS frame {i} declares {columns}x{rows}x{components} of {precision} bits "
                f"where the layout says {layout.columns}x{layout.rows}x1 of {bits}"
            )


def _unzstd(data: bytes, expected: int) -> bytes:
    # The declared content size is checked before anything is allocated: no zip bombs.
    declared = _zstd_declared(data)
    if declared != expected:
        raise Oversized(f"zstd frame declares {declared} bytes, expected {expected}")
    try:
        out: bytes = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CorruptInstance(f"zstd frame is damaged: {exc}") from exc
    if len(out) != expected:
        raise CorruptInstance("zstd frame decoded to the wrong size")
    return out


def _decode_pixels(
    layout: PixelLayout, frames: tuple[bytes, ...], out: np.ndarray[Any, Any]
) -> None:
    """Decode ``frames`` into ``out``: the pixel bytes of the file (``layout.length``
    unsigned bytes), written in place, each frame straight from CharLS, then shifted back."""
    dtype = np.dtype("<u2") if layout.bytes_per_sample == 2 else np.dtype("u1")
    coded = np.dtype("<u2") if layout.precision > 8 else np.dtype("u1")
    pixels = out.view(dtype)
    per_frame = layout.rows * layout.columns
    shift = dtype.type(layout.shift)
    for i, stream in enumerate(frames):
        # CharLS spends about 5 s of CPU on a stream cut short before its end-of-image
        # marker, whatever the image size: a peer's truncated frames would each cost that.
        if stream[-2:] != b"\xff\xd9":
            raise CorruptInstance(f"JPEG-LS frame {i} does not end with an end-of-image marker")
        target = pixels[i * per_frame : (i + 1) * per_frame]
        # Into the file's own buffer when the samples are the file's (no copy), else into
        # a frame of its own; CharLS refuses a buffer of another shape or sample size.
        direct = coded == dtype and target.flags.aligned
        into = target.reshape(layout.rows, layout.columns) if direct else None
        try:  # imagecodecs' CharLS releases the GIL: the event loop feeding SCTP keeps running
            decoded = imagecodecs.jpegls_decode(stream, out=into)
        except Exception as exc:  # CharLS raises its own error types
            raise CorruptInstance(f"JPEG-LS frame {i} is damaged: {exc}") from exc
        if (
            decoded.shape != (layout.rows, layout.columns)
            or decoded.dtype.itemsize != coded.itemsize
        ):
            raise CorruptInstance(f"JPEG-LS frame {i} has the wrong dimensions or sample size")
        if not direct:
            target[:] = decoded.reshape(-1).astype(coded, copy=False)  # widened, or aligned
        if shift:
            np.add(target, shift, out=target, casting="unsafe")  # wraps mod 2**bits


def decode(wire: WireInstance) -> bytes:
    """Rebuild the original file and check its SHA-256; raise :class:`CorruptInstance`
    (:class:`Oversized` before decoding anything, for declarations that do not add up)."""
    check_declared(wire, wire.original_size)
    if wire.encoding is Encoding.RAW:
        data = wire.body
    elif wire.encoding is Encoding.ZSTD:
        data = _unzstd(wire.body, wire.original_size)
    else:
        layout = wire.layout
        if layout is None:
            raise CorruptInstance("wire instance: JPEG-LS encoding without a pixel layout")
        residual = _unzstd(wire.body, wire.original_size - layout.length)
        if layout.offset > len(residual):
            raise CorruptInstance("wire instance: pixel offset is past the end of the file")
        # One buffer the size of the file, its pixels decoded in place, copied once into
        # bytes: no per-frame arrays, no joining (half a megabyte each for a CT slice).
        start, end = layout.offset, layout.offset + layout.length
        whole = np.empty(wire.original_size, dtype=np.uint8)
        head = np.frombuffer(residual, dtype=np.uint8)
        whole[:start] = head[:start]
        whole[end:] = head[start:]
        _decode_pixels(layout, wire.frames, whole[start:end])
        data = whole.tobytes()
    if len(data) != wire.original_size or sha256(data) != wire.sha256:
        raise CorruptInstance("instance does not match its hash after decoding")
    return data


# -- encoding -----------------------------------------------------------------------------


# warnings.catch_warnings swaps the process's filter list and puts back what it saw:
# two threads in it at once (the receiver's decoders, the sender's encoders) left an
# "ignore every warning" filter behind for good. Parsing holds the GIL anyway.
_PARSING = threading.Lock()


def parse_dicom(data: bytes) -> pydicom.Dataset:
    with _PARSING, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(io.BytesIO(data), defer_size=256, force=False)
        except Exception as exc:  # pydicom raises many types for damaged files
            raise BadInstance(f"not a readable DICOM file: {exc}") from exc


def _pixel_layout(ds: pydicom.Dataset, size: int) -> tuple[PixelLayout, np.dtype[Any]] | None:
    """The layout of eligible pixel data, or None when the instance is not eligible."""
    try:
        return _eligible_layout(ds, size)
    except (ValueError, TypeError, AttributeError, KeyError):  # malformed attribute values
        return None


def _eligible_layout(ds: pydicom.Dataset, size: int) -> tuple[PixelLayout, np.dtype[Any]] | None:
    syntax = transfer_syntax(ds)
    raw = ds._dict.get(BaseTag(PIXEL_DATA_TAG))
    if syntax not in UNCOMPRESSED_LE or raw is None:
        return None
    tell = getattr(raw, "value_tell", None)
    length = getattr(raw, "length", None)
    if not isinstance(tell, int) or not isinstance(length, int) or tell + length > size:
        return None
    bits = ds.get("BitsAllocated")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    frames = int(ds.get("NumberOfFrames") or 1)
    if (
        ds.get("SamplesPerPixel", 1) != 1
        or bits not in (8, 16)
        or ds.get("PixelRepresentation", 0) not in (0, 1)
        or not rows
        or not columns
        or frames < 1
    ):
        return None
    width = bits // 8
    if rows * columns * frames * width != length:  # odd padding, short data: not for us
        return None
    dtype = np.dtype("<u2") if width == 2 else np.dtype("u1")
    return PixelLayout(tell, length, rows, columns, frames, width, 0, 2), dtype


def pixel_key(data: bytes, layout: PixelLayout) -> bytes:
    """The cache key of an instance's pixel coding: SHA-256 of everything that decides it.

    That is the pixel value bytes and their shape (rows, columns, frames, sample
    width), under a version that changes with the mapping below; the minimum and
    precision follow from those, and the rest of the file plays no part.
    """
    digest = hashlib.sha256(
        struct.pack(
            ">6I",
            CACHE_VERSION,
            WIRE_VERSION,
            layout.rows,
            layout.columns,
            layout.frames,
            layout.bytes_per_sample,
        )
    )
    digest.update(memoryview(data)[layout.offset : layout.offset + layout.length])
    return digest.digest()


def _code_pixels(data: bytes, layout: PixelLayout, dtype: np.dtype[Any]) -> CodedPixels:
    values = np.frombuffer(
        data, dtype=dtype, count=layout.length // dtype.itemsize, offset=layout.offset
    )
    ulow, uhigh = int(values.min()), int(values.max())
    # Signed data (or data with garbage high bits) may have a smaller range when read
    # as two's complement: take whichever view has the smaller span.
    signed = values.view(np.dtype("<i2") if dtype.itemsize == 2 else np.dtype("i1"))
    slow, shigh = int(signed.min()), int(signed.max())
    mask = (1 << (8 * dtype.itemsize)) - 1
    if shigh - slow < uhigh - ulow:
        low, span = slow & mask, shigh - slow
    else:
        low, span = ulow, uhigh - ulow
    precision = max(2, int(span).bit_length())
    coded = np.dtype("<u2") if precision > 8 else np.dtype("u1")
    samples = np.subtract(values, dtype.type(low), dtype=dtype)  # wraps mod 2**bits
    if coded != dtype:
        samples = samples.astype(coded)
    per_frame = layout.rows * layout.columns
    frames = []
    total = 0
    for i in range(layout.frames):
        frame = samples[i * per_frame : (i + 1) * per_frame].reshape(layout.rows, layout.columns)
        stream = bytes(imagecodecs.jpegls_encode(frame))  # CharLS, GIL released
        total += len(stream)
        if total > layout.length * WORTH_IT:
            return NOT_WORTH_IT  # noise does not compress: zstd or raw is cheaper to decode
        frames.append(stream)
    return CodedPixels(low, precision, tuple(frames))


def _assemble(data: bytes, digest: bytes, layout: PixelLayout, coded: CodedPixels) -> WireInstance:
    """The wire instance from coded pixels and a freshly zstd-coded residual."""
    residual = data[: layout.offset] + data[layout.offset + layout.length :]
    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(residual)
    final = dataclasses.replace(layout, shift=coded.shift, precision=coded.precision)
    return WireInstance(Encoding.JPEGLS, len(data), digest, body, final, coded.frames)


def _fits(coded: CodedPixels, layout: PixelLayout) -> bool:
    return (
        len(coded.frames) in (0, layout.frames)
        and 0 <= coded.shift < 1 << (8 * layout.bytes_per_sample)
        and 2 <= coded.precision <= 8 * layout.bytes_per_sample
    )


def _residual_round_trips(wire: WireInstance, layout: PixelLayout, data: bytes) -> bool:
    try:
        residual = _unzstd(wire.body, len(data) - layout.length)
    except CorruptInstance:
        return False
    return (
        residual[: layout.offset] == data[: layout.offset]
        and residual[layout.offset :] == data[layout.offset + layout.length :]
    )


def _encode_jpegls(
    data: bytes,
    digest: bytes,
    layout: PixelLayout,
    dtype: np.dtype[Any],
    cache: PixelCache | None,
) -> WireInstance | None:
    """The verified JPEG-LS form of ``data``, or None when it should go plainly.

    A cache hit skips the costly part, coding the pixels and decoding them again
    to check: the entry was verified when stored, its key is the hash of these
    very pixel bytes and their shape, and the cache checks each entry's integrity
    when it reads it. What is new, the residual, is round-tripped here; the
    file's SHA-256 comes from ``data`` itself and the receiver checks it again.
    """
    key = pixel_key(data, layout) if cache is not None else b""
    if cache is not None:
        known = cache.get(key)
        if known is not None and _fits(known, layout):
            if not known.frames:
                return None
            reused = _assemble(data, digest, layout, known)
            if _residual_round_trips(reused, layout, data):
                return reused
    try:
        coded = _code_pixels(data, layout, dtype)
    except (RuntimeError, ValueError):  # CharLS refused the frame: send it plainly
        coded = NOT_WORTH_IT
    wire = _assemble(data, digest, layout, coded) if coded.frames else None
    if wire is not None:
        try:
            if decode(wire) != data:
                wire = None
        except CorruptInstance:
            wire = None
    if cache is not None:
        cache.put(key, coded if wire is not None else NOT_WORTH_IT)
    return wire


def encode_plain(data: bytes, digest: bytes | None = None, level: int = ZSTD_LEVEL) -> WireInstance:
    """zstd of the whole file, or the file itself when zstd does not pay."""
    digest = digest or sha256(data)
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if len(body) < len(data) * WORTH_IT:
        return WireInstance(Encoding.ZSTD, len(data), digest, body)
    return WireInstance(Encoding.RAW, len(data), digest, data)


def transfer_syntax(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", ""))


def encode(data: bytes, cache: PixelCache | None = None) -> WireInstance:
    """Encode a file for the wire; the result is verified to decode to ``data``.

    Any file round-trips: what is not an eligible DICOM image goes as zstd or raw.
    With a ``cache`` of verified pixel codings (``node.dicom.wirecache.WireCache``), an
    instance whose pixel values were coded before (the same file, or a copy with
    other header elements such as its de-identified form) skips the JPEG-LS work.
    Use :func:`describe` to refuse files that should not be sent at all.
    """
    digest = sha256(data)
    try:
        ds = parse_dicom(data)
    except BadInstance:
        return encode_plain(data, digest)
    found = _pixel_layout(ds, len(data))
    if found is not None:
        wire = _encode_jpegls(data, digest, *found, cache)
        if wire is not None:
            return wire
    level = ZSTD_LEVEL if transfer_syntax(ds) in UNCOMPRESSED else ZSTD_FAST_LEVEL
    return encode_plain(data, digest, level)
