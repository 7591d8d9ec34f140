"""Raw S3 clients side by side: aiobotocore (kvstore's today) against awscrt (AWS's native client).

    .venv/bin/pip install awscrt                  # the bench extra has it
    .venv/bin/python benchmarks/bench_s3_clients.py --reps 5
    .venv/bin/python benchmarks/bench_s3_clients.py --server rgw

Why: kvstore's S3 saves are bound by the client's CPU where the server shares the
machine (moto) and by requests per second everywhere. botocore builds, signs
(SHA-256 of every body over plain HTTP) and sends each request in Python; awscrt
does it in C on threads of its own (LMCache's S3 connector uses it). This
measures what a transport swap could buy, before anyone builds one.

What runs, against one S3 server on 127.0.0.1 (``kvstore.testing.s3servers``, in a
process of its own), each for ``--reps`` repetitions after one warm-up:

- **PUT**: ``--objects`` objects of ``--size`` bytes (default: bench_store's
  small-head chunks, 64 x 4 MiB), ``--concurrency`` at a time;
- **GET**: the same objects back into bytes;
- **small PUT**: ``--objects`` PUTs of 1,000 bytes (a ``zarr.json``'s size).

All clients: path-style URLs over plain HTTP, SigV4 with static credentials, no
flexible checksums (kvstore's ``when_required``), no retries beyond the client's
own. aiobotocore runs twice: as kvstore configures it over HTTP (each body's
SHA-256 in the signature) and with unsigned bodies (``UNSIGNED-PAYLOAD``, what
kvstore sends over HTTPS and what awscrt sends here), which separates the cost of
the hash from that of building requests in Python.
awscrt runs three times: with 64 MiB parts (PUT_OBJECT / GET_OBJECT, one PUT per
object), with its default 8 MiB parts, and sending each request as it is (``DEFAULT``,
what kvstore's crt transport sends: crt then buffers a GET's whole body itself).
The clients take turns within each repetition (the order rotated between repetitions).
Each row prints GB/s (or requests/s) and the client process's CPU seconds per GB
(per 1,000 requests for small PUTs), medians, and the awscrt / aiobotocore ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from kvstore.testing.s3servers import SERVER_NAMES, S3Server, start_s3_server

GB = 1e9
BUCKET = "bench-clients"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Botocore:
    """aiobotocore, configured as kvstore configures it (over HTTP: each body's SHA-256 in the signature)."""

    name = "aiobotocore"
    signed = True

    def __init__(self, server: S3Server, concurrency: int) -> None:
        self.server, self.concurrency = server, concurrency
        self._ctx: Any = None
        self._client: Any = None

    async def __aenter__(self) -> Botocore:
        import aioboto3
        from botocore.config import Config

        session = aioboto3.Session(
            aws_access_key_id=self.server.key, aws_secret_access_key=self.server.secret, region_name=self.server.region
        )
        config = Config(
            max_pool_connections=self.concurrency,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "total_max_attempts": 1},
            s3={"payload_signing_enabled": self.signed},
        )
        self._ctx = session.client("s3", endpoint_url=self.server.endpoint, config=config)
        self._client = await self._ctx.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._ctx.__aexit__(None, None, None)

    async def put(self, key: str, body: bytes) -> None:
        await self._client.put_object(Bucket=BUCKET, Key=key, Body=body)

    async def get(self, key: str) -> bytes:
        resp = await self._client.get_object(Bucket=BUCKET, Key=key)
        async with resp["Body"] as stream:
            data: bytes = await stream.read()
        return data


class UnsignedBotocore(Botocore):
    """aiobotocore sending bodies unsigned, as kvstore does over HTTPS and awscrt does here."""

    name = "aiobotocore unsigned"
    signed = False


class Crt:
    """awscrt's S3Client: requests made and signed in C, completed on its own event-loop threads."""

    name = "awscrt"
    part_size = 64 << 20
    """crt's buffer-pool block: one PUT per object below it (as kvstore's data objects), GETs in parts of it."""
    kind: str | None = None
    """The request type of PUTs and GETs (an ``S3RequestType`` name); None: PUT_OBJECT and GET_OBJECT."""

    def __init__(self, server: S3Server, concurrency: int) -> None:
        from awscrt import auth, io, s3

        self.server = server
        self._s3 = s3
        self._host = urlsplit(server.endpoint).netloc  # host:port, path-style requests
        group = io.EventLoopGroup(min(concurrency, os.cpu_count() or 1))
        bootstrap = io.ClientBootstrap(group, io.DefaultHostResolver(group))
        self._credentials = auth.AwsCredentialsProvider.new_static(server.key, server.secret)
        self._client = s3.S3Client(
            bootstrap=bootstrap,
            region=server.region,
            tls_mode=s3.S3RequestTlsMode.DISABLED,
            credential_provider=self._credentials,
            part_size=self.part_size,
            multipart_upload_threshold=5 << 30,
        )

    async def __aenter__(self) -> Crt:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _request(self, method: str, key: str, body: bytes | None, sink: list[bytes] | None) -> asyncio.Future[Any]:
        import io as pyio

        from awscrt.http import HttpHeaders, HttpRequest

        headers = HttpHeaders([("Host", self._host)])
        stream = None
        if body is not None:
            headers.add("Content-Length", str(len(body)))
            stream = pyio.BytesIO(body)
        request = HttpRequest(method, f"/{BUCKET}/{key}", headers, stream)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        status: dict[str, Any] = {}

        def on_headers(status_code: int, headers: list[tuple[str, str]], **kwargs: Any) -> None:
            status["code"] = status_code

        def on_body(chunk: bytes, offset: int, **kwargs: Any) -> None:
            assert sink is not None
            sink.append(chunk)

        def on_done(error: BaseException | None = None, status_code: int | None = None, **kwargs: Any) -> None:
            code = status_code or status.get("code")
            if error is None and code is not None and code >= 300:
                error = RuntimeError(f"{method} {key}: HTTP {code}")
            loop.call_soon_threadsafe(_settle, done, error)

        kind = getattr(self._s3.S3RequestType, self.kind or f"{method}_OBJECT")
        self._s3.S3Request(
            client=self._client,
            type=kind,
            operation_name={"PUT": "PutObject", "GET": "GetObject"}[method],
            request=request,
            credential_provider=self._credentials,
            region=self.server.region,
            on_headers=on_headers,
            on_body=on_body if sink is not None else None,
            on_done=on_done,
        )
        return done

    async def put(self, key: str, body: bytes) -> None:
        await self._request("PUT", key, body, None)

    async def get(self, key: str) -> bytes:
        parts: list[bytes] = []
        await self._request("GET", key, None, parts)
        return b"".join(parts)


class CrtPooled(Crt):
    """awscrt with its default 8 MiB parts: a GET of an object up to that size is one request into a pool block."""

    name = "awscrt-8MiB-parts"
    part_size = 8 << 20


class CrtDefault(Crt):
    """awscrt sending each request as it is (``DEFAULT``), as kvstore's crt transport does: crt buffers the body."""

    name = "awscrt-DEFAULT"
    kind = "DEFAULT"


def _settle(done: asyncio.Future[Any], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


async def fan(calls: list[Callable[[], Awaitable[Any]]], limit: int) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await call()

    await asyncio.gather(*(one(c) for c in calls))


async def measure(
    clients: list[Any], args: argparse.Namespace, body: bytes, small: bytes
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per client and operation: (wall seconds, client CPU seconds) of each repetition.

    The clients take turns within each repetition, in an order rotated from one repetition
    to the next, so that a server or machine that drifts weighs on all of them alike.
    """
    n = args.objects

    def ops(client: Any) -> dict[str, Callable[[], Awaitable[None]]]:
        def fan_of(make: Callable[[int], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
            return lambda: fan([lambda i=i: make(i) for i in range(n)], args.concurrency)

        return {
            "PUT": fan_of(lambda i: client.put(f"{client.name}/o{i}", body)),
            "GET": fan_of(lambda i: client.get(f"{client.name}/o{i}")),
            "small PUT": fan_of(lambda i: client.put(f"{client.name}/s{i}", small)),
        }

    out: dict[str, dict[str, list[tuple[float, float]]]] = {c.name: {} for c in clients}
    for op in ("PUT", "GET", "small PUT"):
        for client in clients:
            await ops(client)[op]()  # warm-up (and, for GET, the objects it reads)
        for rep in range(args.reps):
            turn = clients[rep % len(clients) :] + clients[: rep % len(clients)]
            for client in turn:
                c0, t0 = cpu_seconds(), time.perf_counter()
                await ops(client)[op]()
                out[client.name].setdefault(op, []).append((time.perf_counter() - t0, cpu_seconds() - c0))
        for client in clients:
            print(f"  .. {client.name} {op}: " + ", ".join(f"{w:.3f} s" for w, _ in out[client.name][op]), flush=True)
    for client in clients:
        got = await client.get(f"{client.name}/o0")
        assert got == body, "GET returned other bytes than were PUT"
    return out


def report(results: dict[str, dict[str, list[tuple[float, float]]]], args: argparse.Namespace, server: str) -> None:
    nbytes = args.objects * args.size
    print(
        f"\n{args.objects} objects x {args.size} bytes, concurrency {args.concurrency}, server {server},"
        f" {os.cpu_count()} CPUs; medians of {args.reps}\n"
    )
    print("| operation | client | rate | client CPU | rate / aiobotocore | CPU / aiobotocore |")
    print("| --- | --- | --- | --- | --- | --- |")
    for op in ("PUT", "GET", "small PUT"):
        rates, cpus = {}, {}
        for name, ops in results.items():
            wall = statistics.median(w for w, _ in ops[op])
            cpu = statistics.median(c for _, c in ops[op])
            if op == "small PUT":
                rates[name], cpus[name] = args.objects / wall, cpu / args.objects * 1000
                unit = (f"{rates[name]:.0f} req/s", f"{cpus[name]:.2f} s per 1,000")
            else:
                rates[name], cpus[name] = nbytes / wall / GB, cpu / (nbytes / GB)
                unit = (f"{rates[name]:.3f} GB/s", f"{cpus[name]:.2f} s/GB")
            first = name == "aiobotocore"
            ratio = "" if first else f"{rates[name] / rates['aiobotocore']:.2f}"
            cpu_ratio = "" if first else f"{cpus[name] / cpus['aiobotocore']:.2f}"
            print(f"| {op} | {name} | {unit[0]} | {unit[1]} | {ratio} | {cpu_ratio} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=SERVER_NAMES, default="moto")
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--size", type=int, default=4 << 20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, server: S3Server) -> None:
    server.client().create_bucket(Bucket=BUCKET)
    body, small = os.urandom(args.size), os.urandom(1000)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(cls(server, args.concurrency))
            for cls in (Botocore, UnsignedBotocore, Crt, CrtPooled, CrtDefault)
        ]
        results = await measure(clients, args, body, small)
    report(results, args, server.name)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import awscrt.s3  # noqa: F401
    except ImportError:
        raise SystemExit("bench_s3_clients needs awscrt: .venv/bin/pip install awscrt") from None
    with start_s3_server(args.server) as server:
        asyncio.run(run(args, server))


if __name__ == "__main__":
    main()
