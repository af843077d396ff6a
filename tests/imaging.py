"""Real, minimal image files of a chosen size, for tests: every format the API accepts."""

from __future__ import annotations

import base64
import struct
import zlib


def png(width: int, height: int) -> bytes:
    """A valid grey PNG (decodable by any viewer)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b";"


def bmp(width: int, height: int) -> bytes:
    return b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, width, -height) + b"\x00" * 28


def webp_vp8x(width: int, height: int) -> bytes:
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    body = b"WEBP" + b"VP8L" + struct.pack("<I", 5) + b"\x2f" + bits.to_bytes(4, "little")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg(width: int, height: int, *, app_padding: int = 0) -> bytes:
    """SOI, an APP1 segment of `app_padding` bytes (EXIF often pushes the frame header far in), SOF0."""
    segments = b"\xff\xd8"
    if app_padding:
        segments += b"\xff\xe1" + struct.pack(">H", app_padding + 2) + b"\x00" * app_padding
    segments += b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return segments + b"\xff\xd9"


def tiff(width: int, height: int, *, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8)
    entries = struct.pack(e + "HHII", 256, 4, 1, width) + struct.pack(e + "HHIHH", 257, 3, 1, height, 0)
    return head + struct.pack(e + "H", 2) + entries + b"\x00\x00\x00\x00"


def data_uri(data: bytes, fmt: str = "png") -> str:
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"
