"""Keeping the video: copy a finished task's video from the gateway's URL into `SEEDANCE_STORAGE_URL`.

The copy streams: the download (httpx) feeds a multipart upload (obstore) chunk by chunk while the bytes
are counted and hashed, so memory does not grow with the video. It is then verified: the stored object is
read back and must have the same size and SHA-256 as what was downloaded (and the download as many bytes
as the source announced). The object's key is `<prefix>/<job_id>/<task_id>.mp4`: a repeated copy (after
a crash, or by another replica) overwrites it rather than adding a second one.

Store URLs, all through obstore (Rust `object_store`): `file:///absolute/dir`, `s3://bucket/prefix` (AWS
or any S3-compatible store), `gs://bucket/prefix`, `az://container/prefix`. Credentials, region and
endpoint are read by obstore from the standard environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP` for an http:// endpoint; `GOOGLE_*`; `AZURE_*`), never
from a setting of ours, so they cannot reach a log line or an error message of the worker.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import obstore
from obstore.exceptions import BaseError, PermissionDeniedError, UnauthenticatedError
from obstore.store import ObjectStore, from_url

from contracts.messages import StoredVideo
from worker.errors import CopyFailed, StoreRefused, VideoGone
from worker.metrics import Metrics

SCHEMES = ("file", "s3", "gs", "az")
CONTENT_TYPE = "video/mp4"
DOWNLOAD_CHUNK = 1024 * 1024
# Multipart upload: parts of 8 MiB, two in flight: at most about 16 MiB of video in memory per copy.
PART_SIZE = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 2
CHECK_KEY = ".seedance-write-check"
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def check_url(url: str) -> str:
    """`url` when it names a store this worker can write to; ValueError saying what is wrong otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in SCHEMES)}")
    if parts.scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
        raise ValueError("a directory must be given as file:///absolute/path")
    if parts.scheme != "file" and not parts.netloc:
        raise ValueError(f"names no bucket or container: {parts.scheme}://<bucket>/<prefix>")
    if parts.query or parts.fragment:
        raise ValueError("takes no query or fragment; credentials and options come from the environment")
    return url


class VideoStore:
    """Copies videos into one store. `http` downloads (it must send no API key: the URLs are pre-signed)."""

    def __init__(self, url: str, http: httpx.AsyncClient, metrics: Metrics, *, timeout_seconds: float) -> None:
        self.url = check_url(url).rstrip("/")
        self._local = self.url.startswith("file:")
        self._store = self._open()
        self._http = http
        self._metrics = metrics
        self._timeout = timeout_seconds

    @staticmethod
    def key(job_id: str, task_id: str) -> str:
        """The object's key under the store's prefix: deterministic, so a second copy overwrites the first."""
        return f"{_segment(job_id)}/{_segment(task_id)}.mp4"

    async def copy(self, source: str, key: str) -> StoredVideo:
        """Copy the video at `source` to `key`, verify it, and say what was stored.

        Raises VideoGone (the source refuses for good), StoreRefused (credentials) or CopyFailed.
        """
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                size, digest = await self._stream(source, key)
                await self._verify(key, size, digest)
        except TimeoutError:
            raise CopyFailed("timeout", f"the copy took longer than {self._timeout:.0f} s") from None
        self._metrics.video_store_seconds.observe(time.perf_counter() - started)
        return StoredVideo(url=f"{self.url}/{key}", bytes=size, sha256=digest, content_type=CONTENT_TYPE)

    async def check_write(self) -> None:
        """Raise while the store refuses to take an object (the probe after StoreRefused).

        The store is opened afresh first: credentials come from the environment (or files it names), which
        may have been rotated since.
        """
        self._store = self._open()
        await self._put(CHECK_KEY, b"seedance-worker write check\n")

    def _open(self) -> ObjectStore:
        options: dict[str, Any] = {"mkdir": True, "automatic_cleanup": True} if self._local else {}
        try:
            return from_url(self.url, **options)
        except (BaseError, ValueError) as exc:
            raise StoreRefused("config", f"cannot use the video store: {_first_line(exc)}") from None

    async def _stream(self, source: str, key: str) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._http.stream("GET", source) as response:
                if response.status_code in (403, 404, 410):
                    raise VideoGone("source_gone", f"the video URL answered {response.status_code}")
                if response.status_code != 200:
                    raise CopyFailed("source_error", f"the video URL answered {response.status_code}")
                announced = response.headers.get("content-length")

                async def chunks() -> AsyncIterator[bytes]:
                    nonlocal size
                    async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        yield chunk

                await self._put(key, chunks())
        except httpx.HTTPError as exc:
            raise CopyFailed("source_error", f"downloading the video failed: {type(exc).__name__}") from None
        if announced is not None and announced.isdigit() and int(announced) != size:
            raise CopyFailed("source_error", f"the video URL announced {announced} bytes and sent {size}")
        return size, digest.hexdigest()

    async def _verify(self, key: str, size: int, digest: str) -> None:
        """Read the stored object back: it must be exactly the bytes that were downloaded."""
        stored = hashlib.sha256()
        length = 0
        try:
            result = await obstore.get_async(self._store, key)
            async for chunk in result.stream(min_chunk_size=DOWNLOAD_CHUNK):
                stored.update(chunk)
                length += len(chunk)
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise StoreRefused("refused", _first_line(exc)) from None
        except BaseError as exc:
            raise CopyFailed("store_error", f"reading the stored video back failed: {_first_line(exc)}") from None
        if (length, stored.hexdigest()) != (size, digest):
            raise CopyFailed("verify", f"the stored object has {length} bytes and another SHA-256 than the video")

    async def _put(self, key: str, data: bytes | AsyncIterator[bytes]) -> None:
        # Local files take no attributes; object stores get the content type for browsers and CDNs.
        attributes = None if self._local else {"Content-Type": CONTENT_TYPE}
        try:
            await obstore.put_async(
                self._store,
                key,
                data,
                attributes=attributes,
                chunk_size=PART_SIZE,
                max_concurrency=PARTS_IN_FLIGHT,
            )
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise StoreRefused("refused", _first_line(exc)) from None
        except BaseError as exc:
            text = _first_line(exc)
            if "BadScheme" in str(exc):  # reqwest refuses http:// unless allowed: a configuration fault
                raise StoreRefused("config", "the store's endpoint is http://: set AWS_ALLOW_HTTP=true") from None
            raise CopyFailed("store_error", f"writing to the store failed: {text}") from None


def _segment(text: str) -> str:
    cleaned = _UNSAFE.sub("_", text)
    return cleaned if cleaned.strip(".") else cleaned.replace(".", "_")  # never "." or ".." as a path part


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
