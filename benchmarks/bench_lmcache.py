"""LMCache 0.5.6 next to kvstore in one run, on bench_store.py's "small-head" payload.

    .venv/bin/python benchmarks/bench_lmcache.py        # kvstore's venv; medians of 5 repetitions
    .venv/bin/python benchmarks/bench_lmcache.py --reps 3 --lmcache-python /work/lmvenv/bin/python

The payload is bench_store.py's ``small-head`` (the shape issue 10 measured LMCache on): 64 chunks of
[16 layers, K/V, 256 tokens, 4 KV heads, head dim 64] bf16 = 268 MB, one 4 MiB object per chunk. Figures
are GB/s of KV (1 GB = 1e9 bytes), medians of ``--reps`` after one untimed warm-up, [min-max] beside.

- LMCache local disk: its ``LocalDiskBackend`` (4 I/O threads, no O_DIRECT, ``local_cpu=False`` so
  nothing is served from a CPU hot cache) over a ``LocalCPUBackend`` whose allocator
  (``MixedMemoryAllocator``, CPU mode) provides the ``MemoryObj`` of each chunk (format ``KV_2LTD``,
  [2, 16, 256, 256]). store = allocate each chunk + copy the KV in + ``batched_submit_put_task``, until
  every chunk's write completed (its ``on_complete_callback``); retrieve = ``batched_get_blocking`` +
  the copy out into freshly allocated per-layer K/V tensors + release of the ``MemoryObj``.
  Page cache warm; the previous store's files are deleted and ``os.sync()`` is called (untimed) before
  each store, as bench_store.py does for kvstore.
- LMCache S3 (``--server moto`` or ``rgw``): its ``RemoteBackend`` with ``remote_url="s3://..."`` (the
  ``S3Connector``, on awscrt, its defaults: 64 I/O threads, naive serde), ``save_chunk_meta=False``;
  store = ``submit_put_task`` of each chunk until every PUT completed; retrieve = ``batched_get_blocking``
  (all GETs at once) + copy out. The connector caches object sizes from its own PUTs, so the retrieve
  sends no HEAD (as in the process that stored the chunks). LMCache's S3Connector only speaks
  virtual-host style (the Host header is ``<bucket>.<endpoint>``, the request path ``/<key>``), which
  neither server here can route on 127.0.0.1; the child process prefixes its request paths with
  ``/<bucket>`` (path style) and gives it ``127.0.0.1:<port>`` as the endpoint. The requests are
  otherwise LMCache's own (RGW checks their signatures).
- The copies in and out are torch ``copy_`` of each layer's 128 KiB slice of a chunk, on one thread
  (``torch.set_num_threads(1)`` in LMCache's process: with torch's pool of 2 threads, every small copy
  is an OpenMP parallel region, and with LMCache's I/O threads on 2 CPUs they ran up to 50x slower,
  erratically). The column "without the copy in/out" is the same repetitions less their copy time:
  LMCache's backend alone (in vLLM the copy is a GPU kernel of LMCache's GPU connector).
- kvstore: ``save_prefix`` / ``load_prefix`` with default options (checksums on, ``max_concurrency``
  32, ``chunk_tokens`` 256), one store kept open for every repetition (as LMCache's backend is made
  once), each save under a new model version so that every chunk is written (with the model's record
  and ``zarr.json``), the previous one's chunks deleted first; page cache warm for loads. (A store
  opened anew for each save, as before, measured its first save after LMCache's burst 30-50 % slower
  than after its own; kept open, the order made no difference. The first save of a new store is
  ``bench_s3_latency.py``'s to measure.)

Each library has a moto server of its own (kvstore.testing's, each in a process of its own), so neither
server holds the other's objects or connections; with ``--server rgw`` (Ceph's RADOS Gateway, a real S3
implementation in C++: one throw-away cluster, see ``kvstore.testing.rgw``) both use one gateway, each
its own bucket. LMCache runs in a child process with its own venv
(``--lmcache-python``), driven one repetition at a time; this script itself runs in kvstore's venv.
The two libraries' repetitions of an operation alternate (LMCache's first in even repetitions,
kvstore's first in odd ones: kv LM | LM kv | kv LM ...): moto slows and speeds up by 20 % and more
within minutes on a shared machine, and two blocks of repetitions run one after the other measured that
drift as much as the libraries (the same code gave kvstore / LMCache 0.74-1.02x from one run to the
next). The report splits the medians by the order in the pair.
Building that venv (CPU only; LMCache's CUDA dependencies, cupy / cuda-python / nixl, are not needed
for these two backends):

    python3.11 -m venv /work/lmvenv
    /work/lmvenv/bin/pip install torch==2.13.0      # the CPU build, as kvstore's venv (on PyPI: add
                                                    # --index-url https://download.pytorch.org/whl/cpu)
    /work/lmvenv/bin/pip install --no-deps lmcache-0.5.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
    /work/lmvenv/bin/pip install 'numpy<=2.2.6' pyyaml numba requests cachetools sortedcontainers \\
        'prometheus_client<=0.24.1' py-cpuinfo psutil aiohttp aiofile msgspec pyzmq transformers \\
        cryptography awscrt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

GB = 1e9
LAYERS, HEADS, DIM, TOKENS, CHUNK = 16, 4, 64, 16384, 256
SEED = 0
LMCACHE_BUCKET = "lmcache-bench"  # requested path style (see the docstring)
# Issue 10 (another machine): LMCache 0.5.6 on this payload, GB/s (low end of the quoted ranges).
ISSUE10 = {("local", "store"): None, ("local", "retrieve"): 3.5, ("s3", "store"): 0.113, ("s3", "retrieve"): 0.376}

KV = list[tuple[torch.Tensor, torch.Tensor]]


def make_kv(seed: int = SEED) -> tuple[torch.Tensor, KV]:
    """bench_store.make_payload("small-head")'s tokens and KV, drawn in the same order (checked in the parent)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128_000, (TOKENS,), generator=gen)
    shape = (TOKENS, HEADS, DIM)
    kv = [
        (torch.randn(shape, generator=gen).bfloat16(), torch.randn(shape, generator=gen).bfloat16())
        for _ in range(LAYERS)
    ]
    return tokens, kv


def nbytes(kv: KV) -> int:
    return sum(t.numel() * t.element_size() for pair in kv for t in pair)


def fresh_outputs() -> KV:
    shape = (TOKENS, HEADS, DIM)
    return [(torch.empty(shape, dtype=torch.bfloat16), torch.empty(shape, dtype=torch.bfloat16)) for _ in range(LAYERS)]


def same(a: KV, b: KV) -> bool:
    return all(torch.equal(x, y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- LMCache (child process, LMCache's venv)


class LMCacheBench:
    """LMCache's own backends, driven directly (no vLLM, no cache engine), in CPU mode."""

    def __init__(self, disk_dir: str | None, s3_host: str | None, key: str, secret: str, region: str) -> None:
        import asyncio

        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend

        extra: dict[str, Any] = {"save_chunk_meta": False}
        if s3_host is not None:
            extra.update(
                s3_region=region,
                disable_tls=True,
                s3_prefer_http2=False,
                aws_access_key_id=key,
                aws_secret_access_key=secret,
            )
        self.config = LMCacheEngineConfig.from_defaults(
            chunk_size=CHUNK,
            local_cpu=False,  # the CPU backend only allocates: no hot cache in front of the disk
            max_local_cpu_size=1.5,  # GB: a stored and a retrieved copy of the payload at once
            local_disk=disk_dir,
            max_local_disk_size=4.0,
            remote_url=f"s3://{s3_host}" if s3_host is not None else None,
            remote_serde="naive",
            extra_config=extra,
        )
        self.metadata = LMCacheMetadata(
            model_name="bench-small-head",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=(LAYERS, 2, CHUNK, HEADS, DIM),
            chunk_size=CHUNK,
        )
        self.shape = self.metadata.get_shapes()[0]  # [2, layers, chunk, heads * dim]: KV_2LTD
        self.dtype = self.metadata.get_dtypes()[0]
        self.fmt = MemoryFormat.KV_2LTD
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cpu = LocalCPUBackend(self.config, self.metadata, dst_device="cpu")
        self.last_copy = 0.0  # seconds of the last copy in or out, for the log
        self.disk: Any = None
        self.remote: Any = None
        if disk_dir is not None:
            from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

            self.disk = LocalDiskBackend(self.config, self.loop, self.cpu, dst_device="cpu")
        if s3_host is not None:
            from lmcache.v1.storage_backend.remote_backend import RemoteBackend

            _path_style(LMCACHE_BUCKET)

            self.remote = RemoteBackend(self.config, self.metadata, self.loop, self.cpu, dst_device="cpu")

    def keys(self, rep: int) -> list[Any]:
        from lmcache.utils import CacheEngineKey

        return [CacheEngineKey("bench-small-head", 1, 0, rep * 1_000_000 + c, torch.bfloat16) for c in range(64)]

    def copy_in(self, kv: KV) -> list[Any]:
        """Each chunk's KV into a MemoryObj of LMCache's allocator (what its GPU connector does on store)."""
        t0 = time.perf_counter()
        objs = []
        for c in range(TOKENS // CHUNK):
            obj = self.cpu.allocate(self.shape, self.dtype, self.fmt)
            assert obj is not None, "LMCache's allocator is full"
            t = obj.tensor
            lo, hi = c * CHUNK, (c + 1) * CHUNK
            for layer, (k, v) in enumerate(kv):
                t[0, layer].copy_(k[lo:hi].view(CHUNK, HEADS * DIM))
                t[1, layer].copy_(v[lo:hi].view(CHUNK, HEADS * DIM))
            objs.append(obj)
        self.last_copy = time.perf_counter() - t0
        return objs

    def copy_out(self, objs: list[Any]) -> KV:
        """The retrieved MemoryObjs into fresh per-layer K/V tensors, then released to the allocator."""
        t0 = time.perf_counter()
        out = fresh_outputs()
        for c, obj in enumerate(objs):
            assert obj is not None, "LMCache missed a chunk"
            t = obj.tensor
            lo, hi = c * CHUNK, (c + 1) * CHUNK
            for layer, (k, v) in enumerate(out):
                k[lo:hi].view(CHUNK, HEADS * DIM).copy_(t[0, layer])
                v[lo:hi].view(CHUNK, HEADS * DIM).copy_(t[1, layer])
            obj.ref_count_down()
        self.last_copy = time.perf_counter() - t0
        return out

    def disk_store(self, kv: KV, keys: list[Any]) -> None:
        done = threading.Semaphore(0)
        objs = self.copy_in(kv)
        self.disk.batched_submit_put_task(keys, objs, on_complete_callback=lambda _key: done.release())
        for _ in keys:
            if not done.acquire(timeout=600):
                raise RuntimeError("LMCache's disk writes did not complete")
        for obj in objs:
            obj.ref_count_down()

    def disk_retrieve(self, keys: list[Any]) -> KV:
        return self.copy_out(self.disk.batched_get_blocking(keys))

    def s3_store(self, kv: KV, keys: list[Any]) -> None:
        objs = self.copy_in(kv)
        futures = [self.remote.submit_put_task(k, o) for k, o in zip(keys, objs, strict=True)]
        for f in futures:
            f.result(timeout=600)
        for obj in objs:
            obj.ref_count_down()
        if self.remote.put_failed_count:
            raise RuntimeError(f"LMCache's S3 PUTs failed: {self.remote.put_failed_count}")

    def s3_retrieve(self, keys: list[Any]) -> KV:
        return self.copy_out(self.remote.batched_get_blocking(keys))


def _path_style(bucket: str) -> None:
    """LMCache's S3Connector requests ``/<bucket>/<key>`` on the endpoint (path style) instead of ``/<key>`` on
    ``<bucket>.<endpoint>``: the same requests, routable to a server on 127.0.0.1."""
    from lmcache.v1.storage_backend.connector.s3_connector import S3Connector

    flat = S3Connector._format_safe_path
    S3Connector._format_safe_path = lambda self, key: f"/{bucket}{flat(self, key)}"  # type: ignore[method-assign]


class LMCacheSteps:
    """One LMCache repetition per call, so that the parent can interleave them with kvstore's."""

    def __init__(self, opts: dict[str, Any]) -> None:
        # The copies in and out (128 KiB each) on one thread: torch's OpenMP pool of 2 spins at every small
        # parallel copy, and with LMCache's I/O threads on 2 CPUs that made them up to 50x slower, erratically.
        torch.set_num_threads(1)
        _, self.kv = make_kv()
        self.bench = LMCacheBench(
            opts.get("disk_dir"), opts.get("s3_host"), opts["key"], opts["secret"], opts["region"]
        )
        self.reps: int = opts["reps"]

    def hello(self) -> dict[str, Any]:
        import lmcache

        return {"nbytes": nbytes(self.kv), "version": getattr(lmcache, "__version__", "?"), "torch": torch.__version__}

    def step(self, backend: str, op: str, rep: int) -> dict[str, Any]:
        """Repetition ``rep`` (-1: the warm-up) of ``op`` on ``backend``: seconds, and those of the copy in/out."""
        bench = self.bench
        if backend == "local":
            if op == "store":  # the previous repetition's files go first: each store writes new ones
                for key in bench.keys(rep) if rep >= 0 else []:
                    bench.disk.remove(key)
                os.sync()
                run: Callable[[], Any] = lambda: bench.disk_store(self.kv, bench.keys(rep + 1))  # noqa: E731
            else:
                run = lambda: bench.disk_retrieve(bench.keys(self.reps))  # noqa: E731 - the last store's keys
        elif op == "store":  # the same keys each time: each store overwrites the 64 objects
            run = lambda: bench.s3_store(self.kv, bench.keys(0))  # noqa: E731
        else:
            run = lambda: bench.s3_retrieve(bench.keys(0))  # noqa: E731
        t0 = time.perf_counter()
        out = run()
        dt = time.perf_counter() - t0
        if op == "retrieve" and rep < 0 and not same(out, self.kv):
            raise SystemExit(f"LMCache's {backend} backend returned other KV")
        del out
        log(f"LMCache {backend} {op} {dt:.3f} s (copy {bench.last_copy:.3f} s)")
        return {"seconds": dt, "copy": bench.last_copy}


def child_main(opts_json: str) -> None:
    """Answer the parent's steps, one JSON line each, on the stdout it was started with (libraries print to stderr)."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    steps = LMCacheSteps(json.loads(opts_json))
    answers.write(json.dumps(steps.hello()) + "\n")
    for line in sys.stdin:
        ask = json.loads(line)
        if ask["op"] == "exit":
            break
        answers.write(json.dumps(steps.step(ask["backend"], ask["op"], ask["rep"])) + "\n")
    answers.flush()
    sys.stderr.flush()
    os._exit(0)  # LMCache's executors and the CRT's threads need not be shut down one by one


class LMCacheChild:
    """The LMCache process (its own venv), driven one step at a time."""

    def __init__(self, python: str, opts: dict[str, Any]) -> None:
        env = dict(os.environ, LMCACHE_LOG_LEVEL="ERROR", PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--child", json.dumps(opts)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self._answer()
        self.results: dict[str, dict[str, list[float]]] = {}

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the LMCache process ended (exit status {self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def step(self, backend: str, op: str, rep: int) -> None:
        """One repetition; repetitions >= 0 are recorded with and without their copy in/out."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "backend": backend, "rep": rep}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if rep >= 0:
            res = self.results.setdefault(backend, {})
            res.setdefault(op, []).append(answer["seconds"])
            res.setdefault(f"{op}-nocopy", []).append(answer["seconds"] - answer["copy"])

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ---------------------------------------------------------------------- kvstore (parent, kvstore's venv)


async def run_kvstore(
    backend: str, reps: int, where: Any, cleanup: Any, lmcache: LMCacheChild
) -> dict[str, list[float]]:
    """kvstore's repetitions, each beside LMCache's of the same operation: LMCache's first in even ones, second in
    odd ones, so that a server or machine that drifts during the run weighs on both alike."""
    from bench_store import check, drop_model, make_payload

    import kvstore

    def paired(op: str, rep: int, first: bool) -> None:
        if first == (rep % 2 == 0):
            lmcache.step(backend, op, rep)

    p = make_payload("small-head", False)
    opts: dict[str, Any] = {"max_concurrency": 32, "verify": True, "chunk_tokens": CHUNK}
    save: list[float] = []
    # One store kept open, as a serving engine keeps it (LMCache's connector is made once too); each save is of
    # a new model version, so every chunk is new and the save writes its model record and zarr.json as well.
    url, so = where("store")
    async with kvstore.open(url, storage_options=so, **opts) as store:
        spec = p.spec
        for rep in range(-1, reps):
            if rep >= 0:  # the previous repetition's chunks: the server holds one save's objects at a time
                drop_model(url, so, spec)
            spec = dataclasses.replace(p.spec, version=f"{p.spec.version}-{rep + 1}")
            os.sync()
            paired("store", rep, True)
            t0 = time.perf_counter()
            res = await store.save_prefix(spec, p.tokens, p.kv)
            dt = time.perf_counter() - t0
            assert res.chunks_written == p.chunks, res
            log(f"kvstore {backend} save {dt:.3f} s")
            paired("store", rep, False)
            if rep >= 0:
                save.append(dt)
    p = dataclasses.replace(p, spec=spec)  # the loads read the last save
    load: list[float] = []
    async with kvstore.open(url, storage_options=so, **opts) as store:
        check(p, await store.load_prefix(p.spec, p.tokens))
        for rep in range(-1, reps):
            paired("retrieve", rep, True)
            t0 = time.perf_counter()
            hit = await store.load_prefix(p.spec, p.tokens)
            dt = time.perf_counter() - t0
            del hit
            log(f"kvstore {backend} load {dt:.3f} s")
            paired("retrieve", rep, False)
            if rep >= 0:
                load.append(dt)
    cleanup(url, so)
    return {"store": save, "retrieve": load}


def check_payload() -> int:
    """make_kv() draws exactly bench_store.py's small-head payload: the same bytes for both libraries."""
    from bench_store import make_payload

    p = make_payload("small-head", False)
    tokens, kv = make_kv()
    if not (torch.equal(torch.as_tensor(p.tokens), tokens) and same(p.kv, kv)):
        raise SystemExit("make_kv() differs from bench_store.make_payload('small-head')")
    return p.nbytes


def rate(n: int, samples: list[float]) -> float:
    return n / statistics.median(samples) / GB


def fmt(n: int, samples: list[float] | None) -> str:
    if not samples:
        return "-"
    return f"{rate(n, samples):.2f} [{n / max(samples) / GB:.2f}-{n / min(samples) / GB:.2f}]"


def report(n: int, lm: dict[str, Any], kv: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    import kvstore

    print(
        f"\nsmall-head: 64 chunks x [16 layers, K/V, 256 tokens, 4 KV heads, 64] bf16 = {n / 1e6:.0f} MB;"
        f" GB/s (1e9 B) of KV, medians of {args.reps} [min-max]"
    )
    print(
        f"LMCache {lm.get('version', '?')} (torch {lm.get('torch', '?')}, CPU) vs kvstore {kvstore.__version__}"
        f" (torch {torch.__version__}; checksums on, max_concurrency 32, chunk_tokens 256); S3 server: {args.server};"
        f" {os.cpu_count()} CPUs\n"
    )
    print(
        "| backend | operation | LMCache GB/s | kvstore GB/s | kvstore / LMCache"
        " | LMCache without the copy in/out | LMCache in issue 10 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    names = {"local": "local disk", "s3": f"S3 ({args.server})"}
    for backend in ("local", "s3"):
        for op in ("store", "retrieve"):
            a = lm.get(backend, {}).get(op)
            b = kv.get(backend, {}).get(op)
            ratio = f"{rate(n, b) / rate(n, a):.2f}" if a and b else "-"
            ref = ISSUE10[(backend, op)] if backend == "local" or args.server == "moto" else None
            kv_op = {"store": "save_prefix", "retrieve": "load_prefix"}[op]
            bare = lm.get(backend, {}).get(f"{op}-nocopy")
            print(
                f"| {names[backend]} | {op} / {kv_op} | {fmt(n, a)} | {fmt(n, b)} | {ratio} | {fmt(n, bare)} |"
                f" {f'{ref:.3f}' if ref else '-'} |"
            )
    print("\nBy order in the pair (even repetitions: LMCache's ran first; odd ones: kvstore's), GB/s medians:")
    for backend in ("local", "s3"):
        for op in ("store", "retrieve"):
            a, b = lm.get(backend, {}).get(op), kv.get(backend, {}).get(op)
            if a and b:
                print(
                    f"  {names[backend]} {op}: kvstore {rate(n, b[1::2]) if b[1::2] else 0:.2f} first,"
                    f" {rate(n, b[0::2]):.2f} second; LMCache {rate(n, a[0::2]):.2f} first,"
                    f" {rate(n, a[1::2]) if a[1::2] else 0:.2f} second"
                )
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--transport", choices=("botocore", "crt"), default="botocore", help="kvstore's S3 transport (storage option)"
    )
    ap.add_argument("--backends", default="local,s3", help="comma-separated: local, s3")
    ap.add_argument(
        "--server", choices=("moto", "rgw"), default="moto", help="the S3 server (default moto; see the docstring)"
    )
    ap.add_argument(
        "--unsigned-payload",
        action="store_true",
        help="kvstore sends UNSIGNED-PAYLOAD over plain HTTP, as LMCache's connector does (default: bodies signed)",
    )
    ap.add_argument("--lmcache-python", default="/work/lmvenv/bin/python", help="the Python of LMCache's venv")
    ap.add_argument("--dir", default=None, help="parent directory of the local stores (default: /tmp)")
    ap.add_argument("--child", metavar="OPTS", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    import asyncio
    import contextlib
    import uuid

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _s3servers import fresh_store, s3_server

    t_start = time.perf_counter()
    if os.getloadavg()[0] > 0.5:
        log(f"load average {os.getloadavg()[0]:.2f} before the run: other processes will skew the figures")
    backends = args.backends.split(",")
    n = check_payload()
    workdir = tempfile.mkdtemp(prefix="lmbench-", dir=args.dir)
    kv_res: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        server = stack.enter_context(s3_server(args.server)) if "s3" in backends else None
        # LMCache's objects on a moto of its own: each library's server holds only its own objects and connections.
        # (A RADOS Gateway is a Ceph cluster: one, a bucket each.)
        lm_server = server if args.server == "rgw" else stack.enter_context(s3_server("moto")) if server else None
        opts: dict[str, Any] = {"reps": args.reps, "key": "", "secret": "", "region": "us-east-1"}
        if "local" in backends:
            opts["disk_dir"] = os.path.join(workdir, "lmcache-disk")
        if server is not None and lm_server is not None:
            client = server.client()
            lm_server.client().create_bucket(Bucket=LMCACHE_BUCKET)
            host = lm_server.endpoint.removeprefix("http://")
            opts.update(s3_host=host, key=lm_server.key, secret=lm_server.secret, region=lm_server.region)
        log(f"LMCache in {args.lmcache_python}")
        lmcache = LMCacheChild(args.lmcache_python, opts)
        stack.callback(lmcache.close)
        if "local" in backends:

            def local_where(name: str) -> tuple[str, None]:
                return os.path.join(workdir, "kvstore", name), None

            def local_cleanup(url: str, so: object) -> None:
                shutil.rmtree(url, ignore_errors=True)

            kv_res["local"] = asyncio.run(run_kvstore("local", args.reps, local_where, local_cleanup, lmcache))
        if server is not None:
            base, so = fresh_store(server, transport=args.transport)
            if args.unsigned_payload:
                so["config_kwargs"] = {"s3": {"payload_signing_enabled": False}}
            bucket = base.removeprefix("s3://").split("/", 1)[0]
            tag = uuid.uuid4().hex[:8]

            def s3_where(name: str) -> tuple[str, dict[str, Any]]:
                return f"{base}/{tag}/{name}", so

            def s3_cleanup(url: str, so: object) -> None:
                prefix = url.removeprefix(f"s3://{bucket}/")
                pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for page in pages:
                    for obj in page.get("Contents", []):
                        client.delete_object(Bucket=bucket, Key=obj["Key"])

            kv_res["s3"] = asyncio.run(run_kvstore("s3", args.reps, s3_where, s3_cleanup, lmcache))
            client.close()
        lm_res = {**lmcache.info, **lmcache.results}
    if lm_res["nbytes"] != n:
        raise SystemExit(f"LMCache moved {lm_res['nbytes']} bytes per store, kvstore {n}")
    report(n, lm_res, kv_res, args)
    print(f"(bench_lmcache took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
