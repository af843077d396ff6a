"""Checks on the `image` / `last_image` fields of a submit request.

The API takes an http(s) URL or a data URI `data:image/<fmt>;base64,<data>`. For a data URI it requires a
known format, each side strictly inside (300, 6000) px, an aspect ratio strictly inside (0.4, 2.5) and a
decoded size under 30 MB. The size follows from the base64 length alone; the pixel size needs the image
header, so only a prefix of the payload is decoded (more only when a JPEG or TIFF keeps its header deep in
the file). Messages never quote the payload.
"""

from __future__ import annotations

import binascii
import re
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOWED_FORMATS = frozenset({"jpeg", "png", "webp", "bmp", "tiff", "gif"})
MIN_SIDE_EXCLUSIVE = 300
MAX_SIDE_EXCLUSIVE = 6000
MIN_RATIO_EXCLUSIVE = 0.4
MAX_RATIO_EXCLUSIVE = 2.5
MAX_BYTES = 30 * 1024 * 1024

_DATA_URI = re.compile(r"data:image/([A-Za-z0-9.+-]+);base64,", re.ASCII)
_BASE64_TAIL = re.compile(rb"[A-Za-z0-9+/]*={0,2}", re.ASCII)
_FIRST_CHUNK = 4096  # base64 characters: 3 KiB decoded covers every header but deep JPEG/TIFF ones


class ImageError(ValueError):
    """The image field breaks a documented rule; the message says which, without quoting the data."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the header of an inline image says."""

    format: str
    width: int
    height: int
    size_bytes: int


def check_image_field(value: str) -> str:
    """Return `value` unchanged when it is a usable URL or data URI; raise ImageError otherwise."""
    if value.startswith("data:"):
        inspect_data_uri(value)
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ImageError("must be an http(s) URL or a data:image/<format>;base64,<data> URI")
    if not parts.hostname:
        raise ImageError("URL has no host")
    return value


def inspect_data_uri(value: str) -> ImageInfo:
    """Check a data URI against the API's image rules and return what its header says."""
    match = _DATA_URI.match(value)
    if match is None:
        raise ImageError("data URI must look like data:image/<format>;base64,<data>")
    declared = match.group(1).lower()
    if declared not in ALLOWED_FORMATS:
        raise ImageError(f"format {declared!r} is not one of {', '.join(sorted(ALLOWED_FORMATS))}")
    payload = value[match.end() :]
    size = _decoded_size(payload)
    if size == 0:
        raise ImageError("data URI carries no data")
    if size >= MAX_BYTES:
        raise ImageError(f"image is {size} bytes; it must be under {MAX_BYTES} bytes (30 MB)")
    fmt, width, height = _read_dimensions(payload)
    if not (MIN_SIDE_EXCLUSIVE < width < MAX_SIDE_EXCLUSIVE and MIN_SIDE_EXCLUSIVE < height < MAX_SIDE_EXCLUSIVE):
        raise ImageError(
            f"image is {width}x{height} px; each side must be between {MIN_SIDE_EXCLUSIVE} and "
            f"{MAX_SIDE_EXCLUSIVE} px (exclusive)"
        )
    ratio = width / height
    if not MIN_RATIO_EXCLUSIVE < ratio < MAX_RATIO_EXCLUSIVE:
        raise ImageError(
            f"image aspect ratio {ratio:.3f} must be between {MIN_RATIO_EXCLUSIVE} and "
            f"{MAX_RATIO_EXCLUSIVE} (exclusive)"
        )
    return ImageInfo(format=fmt, width=width, height=height, size_bytes=size)


def _decoded_size(payload: str) -> int:
    if len(payload) % 4:
        raise ImageError("base64 data length is not a multiple of 4")
    padding = len(payload) - len(payload.rstrip("="))
    if padding > 2:
        raise ImageError("base64 data has too much padding")
    return len(payload) // 4 * 3 - padding


def _decode_prefix(payload: str, chars: int) -> bytes:
    chunk = payload[: min(len(payload), chars) // 4 * 4]
    raw = chunk.encode("ascii", errors="replace")
    if _BASE64_TAIL.fullmatch(raw) is None:
        raise ImageError("data is not valid base64")
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error as exc:
        raise ImageError("data is not valid base64") from exc


def _read_dimensions(payload: str) -> tuple[str, int, int]:
    chars = _FIRST_CHUNK
    while True:
        data = _decode_prefix(payload, chars)
        whole = chars >= len(payload)
        found = _parse_header(data, complete=whole)
        if found is not None:
            return found
        if whole:
            raise ImageError("image data is not a readable jpeg, png, webp, bmp, tiff or gif")
        chars *= 4


def _parse_header(data: bytes, *, complete: bool) -> tuple[str, int, int] | None:
    """Return (format, width, height), or None when more bytes are needed.

    Raises ImageError when the bytes are no supported image at all.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        if len(data) < 24:
            return _need_more(complete)
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data[:6] in (b"GIF87a", b"GIF89a"):
        if len(data) < 10:
            return _need_more(complete)
        width, height = struct.unpack("<HH", data[6:10])
        return "gif", width, height
    if data.startswith(b"BM"):
        if len(data) < 26:
            return _need_more(complete)
        header_size = struct.unpack("<I", data[14:18])[0]
        if header_size == 12:
            width, height = struct.unpack("<HH", data[18:22])
        else:
            width, height = struct.unpack("<ii", data[18:26])
        return "bmp", abs(width), abs(height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _parse_webp(data, complete)
    if data[:2] == b"\xff\xd8":
        return _parse_jpeg(data, complete)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _parse_tiff(data, complete)
    if len(data) < 12 and not complete:
        return None
    raise ImageError("image data is not a readable jpeg, png, webp, bmp, tiff or gif")


def _need_more(complete: bool) -> tuple[str, int, int] | None:
    """None asks the caller for more bytes; with the whole payload in hand, the image is truncated."""
    if complete:
        raise ImageError("image data is truncated")
    return None


def _parse_webp(data: bytes, complete: bool) -> tuple[str, int, int] | None:
    chunk = data[12:16]
    if len(data) < (25 if chunk == b"VP8L" else 30):
        return _need_more(complete)
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return "webp", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return "webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return "webp", width, height
    raise ImageError("webp data has an unknown chunk layout")


_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _parse_jpeg(data: bytes, complete: bool) -> tuple[str, int, int] | None:
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos + 3 > len(data):
            return _need_more(complete)
        marker = data[pos]
        pos += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker in {0xD9, 0xDA}:
            raise ImageError("jpeg data has no frame header before its scan data")
        length = struct.unpack(">H", data[pos : pos + 2])[0]
        if marker in _JPEG_SOF:
            if pos + 7 > len(data):
                return _need_more(complete)
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return "jpeg", width, height
        if length < 2:
            raise ImageError("jpeg data has a malformed segment")
        pos += length


def _parse_tiff(data: bytes, complete: bool) -> tuple[str, int, int] | None:
    endian = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return _need_more(complete)
    offset = struct.unpack(endian + "I", data[4:8])[0]
    if offset + 2 > len(data):
        return _need_more(complete)
    (count,) = struct.unpack(endian + "H", data[offset : offset + 2])
    end = offset + 2 + 12 * count
    if end > len(data):
        return _need_more(complete)
    dims: dict[int, int] = {}
    for i in range(count):
        entry = data[offset + 2 + 12 * i : offset + 14 + 12 * i]
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if tag in (256, 257):
            fmt = "H" if kind == 3 else "I"
            (dims[tag],) = struct.unpack(endian + fmt, entry[8 : 8 + struct.calcsize(fmt)])
    if 256 not in dims or 257 not in dims:
        raise ImageError("tiff data has no image width or length")
    return "tiff", dims[256], dims[257]


def to_data_uri(data: bytes) -> str:
    """A data URI for raw image bytes, its format read from the bytes; ImageError when unreadable."""
    fmt, _, _ = _parse_header(data, complete=True) or ("", 0, 0)
    return f"data:image/{fmt};base64,{binascii.b2a_base64(data, newline=False).decode('ascii')}"
