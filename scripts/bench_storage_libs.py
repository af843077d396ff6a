"""The evidence behind the storage library: the worker's copy through obstore next to the same copy
through aiobotocore (botocore's S3 client on aiohttp), both into SeaweedFS.

Both stream the same video from the mock with httpx in 1 MiB chunks, hash it on the way, upload it in
8 MiB parts (obstore: the worker's own `VideoStore`; aiobotocore: create/upload_part/complete by hand),
then read it back and compare size and SHA-256. Each library runs in a process of its own (so peak RSS is
its own), copying the videos 4 at once like the worker; rounds alternate between the libraries.

    pip install aiobotocore     # not a dependency of the project; without it only obstore runs
    python -m scripts.bench_storage_libs [--runs 3] [--videos 8] [--megabytes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

import httpx

from contracts.api import SUBMIT_PATH, TASK_RESULT_PATH, TaskStatus
from tests.servers import SeaweedFS, start_mock, start_seaweedfs

KEY = "bench-key"
CHUNK = 1024 * 1024
PART = 8 * 1024 * 1024
AT_ONCE = 4


def video_url(mock_url: str, megabytes: int) -> str:
    """A finished task's video URL on the mock, `megabytes` long."""
    headers = {"Authorization": f"Bearer {KEY}"}
    httpx.post(f"{mock_url}/_mock/config", json={"video_bytes_per_second": megabytes * 1_000_000 // 5})
    body = {"image": "https://example.com/boat.png", "prompt": "a boat", "duration": 5}
    task_id = httpx.post(f"{mock_url}{SUBMIT_PATH}", json=body, headers=headers).json()["task_id"]
    while True:
        result = httpx.get(f"{mock_url}{TASK_RESULT_PATH}", params={"task_id": task_id}, headers=headers).json()
        if result["task"]["status"] == TaskStatus.SUCCEED:
            return str(result["videos"][0]["video_url"])
        time.sleep(0.05)


async def copy_obstore(source: str, bucket: str, keys: list[str]) -> list[tuple[int, str]]:
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from worker.metrics import Metrics  # noqa: PLC0415
    from worker.storage import VideoStore  # noqa: PLC0415

    async with httpx.AsyncClient(timeout=60) as http:
        store = VideoStore(f"s3://{bucket}/libs", http, Metrics(CollectorRegistry()), timeout_seconds=900)
        gate = asyncio.Semaphore(AT_ONCE)

        async def one(key: str) -> tuple[int, str]:
            async with gate:
                stored = await store.copy(source, key)
                return stored.bytes, stored.sha256

        return await asyncio.gather(*(one(k) for k in keys))


async def copy_aiobotocore(source: str, bucket: str, keys: list[str]) -> list[tuple[int, str]]:
    from aiobotocore.session import get_session  # noqa: PLC0415

    session = get_session()
    async with (
        httpx.AsyncClient(timeout=60) as http,
        session.create_client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]) as s3,
    ):
        gate = asyncio.Semaphore(AT_ONCE)

        async def parts(response: httpx.Response, digest: hashlib._Hash) -> AsyncIterator[bytes]:
            pending = bytearray()
            async for chunk in response.aiter_bytes(CHUNK):
                digest.update(chunk)
                pending += chunk
                if len(pending) >= PART:
                    yield bytes(pending)
                    pending.clear()
            if pending:
                yield bytes(pending)

        async def one(key: str) -> tuple[int, str]:
            key = f"libs/{key}"
            async with gate:
                digest = hashlib.sha256()
                upload = await s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="video/mp4")
                done = []
                async with http.stream("GET", source) as response:
                    number = 0
                    async for part in parts(response, digest):
                        number += 1
                        answer = await s3.upload_part(
                            Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=part
                        )
                        done.append({"PartNumber": number, "ETag": answer["ETag"]})
                await s3.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
                )
                stored, length = hashlib.sha256(), 0
                got = await s3.get_object(Bucket=bucket, Key=key)
                async with got["Body"] as body:
                    while chunk := await body.read(CHUNK):
                        stored.update(chunk)
                        length += len(chunk)
                if stored.hexdigest() != digest.hexdigest():
                    raise RuntimeError(f"{key}: the stored object differs from the video")
                return length, stored.hexdigest()

        return await asyncio.gather(*(one(k) for k in keys))


def child(library: str, source: str, bucket: str, videos: int) -> None:
    """One round in this process: copy `videos` copies of the video, print one JSON line."""
    copy = copy_obstore if library == "obstore" else copy_aiobotocore
    keys = [f"{library}-{uuid.uuid4().hex[:8]}/{i}.mp4" for i in range(videos)]
    started, cpu = time.perf_counter(), time.process_time()
    results = asyncio.run(copy(source, bucket, keys))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    size = results[0][0]
    if any(r != results[0] for r in results):
        raise SystemExit(f"{library}: the copies of one video differ")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mb_per_s": videos * size / seconds / 1e6, "cpu_s": cpu, "peak_mib": peak}))


def round_of(library: str, source: str, store: SeaweedFS, videos: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "scripts.bench_storage_libs", "--child", library, source, store.bucket, str(videos)]
    out = subprocess.run(cmd, env={**os.environ, **store.env()}, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--child", nargs=4, metavar=("LIBRARY", "SOURCE", "BUCKET", "VIDEOS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        library, source, bucket, videos = args.child
        child(library, source, bucket, int(videos))
        return
    libraries = ["obstore"]
    if importlib.util.find_spec("aiobotocore"):
        libraries.append("aiobotocore")
    else:
        print("aiobotocore is not installed (pip install aiobotocore): measuring obstore alone")
    mock = start_mock(time_scale=0.001, api_key=KEY, seed=5)
    try:
        with tempfile.TemporaryDirectory(prefix="seedance-bench-libs-") as directory:
            store = start_seaweedfs(directory)
            try:
                source = video_url(mock.url, args.megabytes)
                figures: dict[str, list[dict[str, float]]] = {lib: [] for lib in libraries}
                for _ in range(args.runs):
                    for library in libraries:
                        figures[library].append(round_of(library, source, store, args.videos))
            finally:
                store.stop()
    finally:
        mock.stop()
    print(
        f"storage libraries: {args.videos} copies of a {args.megabytes} MB video, {AT_ONCE} at once, mock -> "
        f"SeaweedFS, with read-back verification; medians of {args.runs} alternating rounds"
    )
    for library, rounds in figures.items():

        def show(name: str, rounds: list[dict[str, float]] = rounds) -> str:
            values = [r[name] for r in rounds]
            return f"{statistics.median(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})"

        print(f"  {library:12} {show('mb_per_s')} MB/s, CPU {show('cpu_s')} s, peak RSS {show('peak_mib')} MiB")


if __name__ == "__main__":
    main()
