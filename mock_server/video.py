"""The videos the mock's `video_url`s serve: valid MP4 files (ISO BMFF boxes `ftyp`, `moov`/`mvhd`,
`mdat`) of a size that follows the clip's duration and resolution, with deterministic content per task,
generated on the fly in chunks, so a 200 MB video costs no more memory than a small one, and any byte
range can be served without producing the bytes before it.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True, slots=True)
class Video:
    """The MP4 file of one task: `size` bytes, the same bytes every time for the same task id."""

    task_id: str
    size: int
    duration_s: int

    @property
    def header(self) -> bytes:
        ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 0x200) + b"isomiso2mp41")
        timescale = 1000
        mvhd = _box(
            b"mvhd",
            struct.pack(">I", 0)  # version 0, no flags
            + struct.pack(">IIII", 0, 0, timescale, self.duration_s * timescale)
            + struct.pack(">IH", 0x00010000, 0x0100)  # rate 1.0, volume 1.0
            + b"\x00" * 10
            + struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)  # unity matrix
            + b"\x00" * 24
            + struct.pack(">I", 1),
        )
        moov = _box(b"moov", mvhd)
        mdat_head = struct.pack(">I", self.size - len(ftyp) - len(moov)) + b"mdat"
        return ftyp + moov + mdat_head

    def read(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes from `start` to `end` (exclusive; default: the end of the file), in chunks."""
        header = self.header
        stop = self.size if end is None else min(end, self.size)
        position = start
        if position < len(header):
            piece = header[position:stop]
            position += len(piece)
            yield piece
        while position < stop:
            offset = position - len(header)
            index, skip = divmod(offset, CHUNK)
            chunk = _payload(self.task_id, index)[skip : skip + (stop - position)]
            position += len(chunk)
            yield chunk


def size_for(duration_s: int, pixels: float, bytes_per_second: int) -> int:
    """File size of a clip: its seconds x bytes per second x its pixels relative to 720p (at least 256)."""
    return max(256, round(duration_s * bytes_per_second * pixels))


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The [start, end) of a single `Range: bytes=...` header; None to send the whole file (no header, or
    several ranges, which a server may ignore); "unsatisfiable" for a range outside the file."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        count = int(last)
        return (max(0, size - count), size) if count > 0 else "unsatisfiable"
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


def _box(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", 8 + len(body)) + kind + body


def _payload(task_id: str, index: int) -> bytes:
    return hashlib.shake_128(f"{task_id}:{index}".encode()).digest(CHUNK)
