"""The worker side: fill allocated blocks layer by layer from the store, and save computed prompts.

Loads: ``start`` begins every load of the step on the store's loop (joining the
scheduler's prefetch when there is one); the forward's attention layer ``i`` calls
``wait_layer`` first, which waits only for layer ``i`` of each load and copies it
into vLLM's blocks, so layer 0 runs while later layers are still being read. What
does not arrive in time (``load_timeout_s``), is damaged or missing is reported by
``take_errors`` as failed blocks, which vLLM recomputes.

Saves: after the forward, ``finish_step`` hands each completed prompt to the loop,
which copies its rows out of vLLM's blocks in a worker thread and passes them to
``save_prefix(wait=False)`` (only chunks the store lacks are uploaded). The step
returns at once; ``barrier`` (vLLM's ``handle_preemptions``, called before the next
step writes into any block) waits for those copies, never for uploads. Copies and
uploads in flight are bounded by ``save_budget_bytes``; past it a save is dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from kvstore.errors import KVStoreError
from kvstore.integrations.vllm.config import ConnectorConfig
from kvstore.integrations.vllm.counters import ConnectorCounters
from kvstore.integrations.vllm.jobs import LoadJob, SaveJob, StepPlan
from kvstore.integrations.vllm.paged import PagedLayer
from kvstore.integrations.vllm.runtime import CLOSE_TIMEOUT_S, StoreRuntime
from kvstore.results import LayerKV
from kvstore.spec import ModelSpec

__all__ = ["WorkerSide"]

logger = logging.getLogger("kvstore.vllm")


class _Load:
    """One request's load in flight: a future per layer (None: not delivered) and the tokens valid so far."""

    def __init__(self, job: LoadJob, num_layers: int, timeout: float) -> None:
        self.job = job
        self.layers: list[concurrent.futures.Future[LayerKV | None]] = [
            concurrent.futures.Future() for _ in range(num_layers)
        ]
        self.deadline = time.monotonic() + timeout
        self.valid_end = job.end
        """Tokens below this are in vLLM's blocks for every layer copied so far."""
        self.applied: set[int] = set()
        self.task: concurrent.futures.Future[None] | None = None
        self.bytes_read = 0
        self.seconds = 0.0

    def deliver(self, layer: int, kv: LayerKV | None) -> None:
        if not self.layers[layer].done():
            self.layers[layer].set_result(kv)

    def end(self) -> None:
        for layer in range(len(self.layers)):
            self.deliver(layer, None)


class WorkerSide:
    """Loads into and saves from one worker's paged KV cache."""

    def __init__(
        self,
        config: ConnectorConfig,
        runtime: StoreRuntime,
        spec: ModelSpec,
        layer_names: Sequence[str],
        block_size: int,
        counters: ConnectorCounters,
    ) -> None:
        """``spec``: this rank's shard (its version is replaced per request); ``layer_names`` in model order."""
        self._config = config
        self._runtime = runtime
        self._spec = spec
        self._index = {name: i for i, name in enumerate(layer_names)}
        self._names = list(layer_names)
        self._block = block_size
        self._counters = counters
        self._pages: list[PagedLayer] = []
        self._loads: list[_Load] = []
        self._errors: set[int] = set()
        self._copies: list[concurrent.futures.Future[None]] = []
        self._saves: set[concurrent.futures.Future[None]] = set()
        self._save_bytes = 0
        self._save_lock = threading.Lock()

    def register(self, caches: dict[str, torch.Tensor]) -> None:
        """``register_kv_caches``: map each layer's cache tensor (raises UnsupportedLayoutError)."""
        s = self._spec
        self._pages = [
            PagedLayer(caches[name], num_kv_heads=s.num_kv_heads, head_size=s.head_dim, block_size=self._block)
            for name in self._names
        ]

    @property
    def ready(self) -> bool:
        return bool(self._pages)

    # ------------------------------------------------------------------ loads

    def start(self, plan: StepPlan) -> None:
        """``start_load_kv``: start this step's loads on the store's loop."""
        for job in plan.loads:
            load = _Load(job, len(self._pages), self._config.load_timeout_s)
            load.task = self._runtime.submit(self._load(load))
            self._loads.append(load)

    async def _load(self, load: _Load) -> None:
        job = load.job
        spec = replace(self._spec, version=job.version)
        device = self._pages[0].device
        t0 = time.perf_counter()
        try:
            store = await self._runtime.store_within(max(0.0, load.deadline - time.monotonic()))
            if store is None:
                return
            if store.has_prefetch(spec, job.tokens, device=device):  # the scheduler started it
                result = await store.load_prefix(spec, job.tokens, device=device)
                for layer, kv in enumerate(result.kv):
                    load.deliver(layer, kv if result.num_tokens else None)
                load.bytes_read = result.bytes_read
            else:
                async with store.load_prefix_layers(spec, job.tokens, device=device) as layers:
                    async for layer, k, v in layers:
                        load.deliver(layer, (k, v))
                    load.bytes_read = layers.bytes_read
        except KVStoreError as exc:
            logger.warning("kvstore load failed, vLLM recomputes its blocks: %s", exc)
        finally:
            load.seconds = time.perf_counter() - t0
            load.end()

    def wait_layer(self, layer_name: str) -> None:
        """``wait_for_layer_load``: copy this layer of every load into its blocks (waiting up to the deadline)."""
        layer = self._index.get(layer_name)
        if layer is not None:
            for load in self._loads:
                self._apply(load, layer)

    def _apply(self, load: _Load, layer: int) -> None:
        if layer in load.applied:
            return
        load.applied.add(layer)
        job, b = load.job, self._block
        try:
            kv = load.layers[layer].result(timeout=max(0.0, load.deadline - time.monotonic()))
        except TimeoutError:
            kv = None
        if kv is None:
            load.valid_end = job.start
            return
        k, v = kv
        upto = min(load.valid_end, k.shape[0] // b * b)
        if upto > job.start:
            n = (upto - job.start) // b
            self._pages[layer].write(job.block_ids[:n], k[job.start : upto], v[job.start : upto])
        load.valid_end = max(job.start, upto)

    def _finish_loads(self) -> None:
        """Count each load; blocks not filled in every layer become load errors (vLLM recomputes them)."""
        for load in self._loads:
            for layer in range(len(self._pages)):
                if layer not in load.applied:  # the forward never waited for it: its blocks are not trusted
                    load.applied.add(layer)
                    load.valid_end = load.job.start
            if load.task is not None:
                try:  # after its last layer the load only closes its stream and counts
                    load.task.result(timeout=max(0.0, load.deadline - time.monotonic()))
                except (TimeoutError, concurrent.futures.CancelledError):
                    load.task.cancel()  # past its deadline: stop reading
            job = load.job
            failed = job.block_ids[(load.valid_end - job.start) // self._block :]
            self._errors.update(failed)
            self._counters.add(loads=1, load_bytes=load.bytes_read, load_seconds=load.seconds)
            if failed:
                self._counters.add(load_errors=1, load_error_blocks=len(failed))
                logger.warning(
                    "kvstore: %d of %d blocks of %s not loaded; recomputing",
                    len(failed),
                    len(job.block_ids),
                    job.req_id,
                )
        self._loads.clear()

    def take_errors(self) -> set[int]:
        """``get_block_ids_with_load_errors``: blocks of this step's loads that hold no valid KV."""
        errors, self._errors = self._errors, set()
        return errors

    # ------------------------------------------------------------------ saves

    def finish_step(self, plan: StepPlan) -> None:
        """``wait_for_save``: settle this step's loads and start the saves of prompts it completed."""
        self._finish_loads()
        for job in plan.saves:
            self._start_save(job)

    def _start_save(self, job: SaveJob) -> None:
        spec = replace(self._spec, version=job.version)
        nbytes = spec.bytes_per_token * len(job.tokens)
        store = self._runtime.store()
        with self._save_lock:
            if store is None or self._save_bytes + nbytes > self._config.save_budget_bytes:
                self._counters.add(saves_dropped=1)
                return
            self._save_bytes += nbytes
        copied: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._copies.append(copied)
        task = self._runtime.submit(self._save(job, spec, nbytes, copied))
        with self._save_lock:
            self._saves.add(task)
        task.add_done_callback(self._saved)

    def _saved(self, task: concurrent.futures.Future[None]) -> None:
        """A background save that raised something other than a store error is a bug: make it loud."""
        with self._save_lock:
            self._saves.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("kvstore save crashed", exc_info=exc)

    async def _save(self, job: SaveJob, spec: ModelSpec, nbytes: int, copied: concurrent.futures.Future[None]) -> None:
        try:
            try:
                kv = await asyncio.to_thread(self._copy_out, job)
            finally:
                copied.set_result(None)  # vLLM may reuse the blocks from here on
            store = self._runtime.store()
            if store is None:
                self._counters.add(saves_dropped=1)
                return
            t0 = time.perf_counter()
            handle = await store.save_prefix(spec, job.tokens, kv, wait=False)
            del kv  # the store holds its own copy now
            result = await handle
            self._counters.add(saves=1, save_bytes=result.bytes_written, save_seconds=time.perf_counter() - t0)
        except KVStoreError as exc:
            self._counters.add(save_errors=1)
            logger.warning("kvstore save of %s failed (a later request recomputes it): %s", job.req_id, exc)
        finally:
            with self._save_lock:
                self._save_bytes -= nbytes

    def _copy_out(self, job: SaveJob) -> list[LayerKV]:
        n = len(job.tokens)
        return [pages.read(job.block_ids, n) for pages in self._pages]

    def barrier(self) -> None:
        """``handle_preemptions``: wait until saves have copied their rows out of vLLM's blocks."""
        copies, self._copies = self._copies, []
        for copied in copies:
            copied.result()

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Wait (bounded) for the saves in flight, and drop the loads."""
        self.barrier()
        with self._save_lock:
            saves = list(self._saves)
        concurrent.futures.wait(saves, timeout=timeout)
        for load in self._loads:
            if load.task is not None:
                load.task.cancel()
        self._loads.clear()
