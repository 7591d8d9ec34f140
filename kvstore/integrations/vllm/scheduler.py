"""The scheduler side: look prompts up without blocking, plan the loads and saves of each step.

A request's first call to ``matched_tokens`` starts a lookup on the store's loop and
answers None ("ask again"); vLLM keeps scheduling other work and asks on a later step.
When the lookup returns, its prefetch has already started (when the worker shares
this process), and the answer is the hit floored to the block size, never the whole
prompt (the last token must be computed to sample from it), and only beyond what
vLLM's own prefix cache holds. A store that is unreachable or slower than
``lookup_timeout`` answers 0: a miss, never a stall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvstore.errors import KVStoreError
from kvstore.integrations.vllm.config import ConnectorConfig
from kvstore.integrations.vllm.counters import ConnectorCounters
from kvstore.integrations.vllm.jobs import LoadJob, SaveJob, StepPlan
from kvstore.integrations.vllm.runtime import StoreRuntime
from kvstore.spec import ModelSpec

__all__ = ["LOOKUP_TIMEOUT_S", "SchedulerSide"]

logger = logging.getLogger("kvstore.vllm")

LOOKUP_TIMEOUT_S = 2.0
"""Longest a request waits for its lookup (including a store still opening); past it the request is a miss."""


@dataclass(slots=True)
class _Request:
    """What the scheduler side knows of one request."""

    tokens: list[int]
    version: str
    lookup: concurrent.futures.Future[int] | None = None
    hit: int | None = None
    """Tokens of the prompt the store holds (all shards); None until the lookup is back."""
    local: int = 0
    """vLLM's own prefix-cache hit, as last offered to ``matched_tokens``."""
    load: tuple[int, int] | None = None
    """Token range [start, end) to load, once vLLM allocated blocks for it."""
    block_ids: list[int] = field(default_factory=list)
    computed: int = 0
    saved: bool = False


class SchedulerSide:
    """Lookups, hits and the per-step plan of one engine's scheduler."""

    def __init__(
        self,
        config: ConnectorConfig,
        runtime: StoreRuntime,
        shard_specs: Sequence[ModelSpec],
        block_size: int,
        counters: ConnectorCounters,
        variant_of: Callable[[Any], str | None],
    ) -> None:
        """``shard_specs``: the spec of every tensor-parallel shard (a hit must be in all of them).

        ``variant_of(request)`` gives the version a request's KV is stored under, or
        None to keep the request away from the store (multimodal inputs, ...).
        """
        self._config = config
        self._runtime = runtime
        self._specs = list(shard_specs)
        self._block = block_size
        self._counters = counters
        self._variant_of = variant_of
        self._requests: dict[str, _Request | None] = {}  # None: the request does not use the store

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """``get_num_new_matched_tokens``: tokens to load beyond vLLM's cache, None while the lookup runs."""
        rid = request.request_id
        if rid not in self._requests:
            self._requests[rid] = self._start(request)
        state = self._requests[rid]
        if state is None or not self._config.load:
            return 0, False
        if state.hit is None:
            assert state.lookup is not None
            if not state.lookup.done():
                return None, False
            state.hit = state.lookup.result()
        state.local = num_computed_tokens
        return max(0, self._usable(state) - num_computed_tokens), False

    def _usable(self, state: _Request) -> int:
        """The hit vLLM may load: at most all but the last prompt token, in whole blocks, at least the minimum."""
        assert state.hit is not None
        usable = min(state.hit, len(state.tokens) - 1) // self._block * self._block
        return usable if usable >= max(1, self._config.min_cached_tokens) else 0

    def _start(self, request: Any) -> _Request | None:
        version = self._variant_of(request)
        tokens = list(request.prompt_token_ids or [])
        if version is None or len(tokens) - 1 < max(1, self._config.min_cached_tokens):
            return None
        state = _Request(tokens=tokens, version=version)
        if self._config.load:
            self._counters.add(lookups=1)
            state.lookup = self._runtime.submit(self._lookup(state))
        else:
            state.hit = 0
        return state

    async def _lookup(self, state: _Request) -> int:
        """The prompt's hit in every shard (0 on any failure), timed in ``lookup_seconds``."""
        t0 = time.perf_counter()
        try:
            return await self._find_hit(state)
        finally:
            self._counters.add(lookup_seconds=time.perf_counter() - t0)

    async def _find_hit(self, state: _Request) -> int:
        """The hit in every shard (0 on any failure); starts the prefetch when it is worth it."""
        specs = [replace(spec, version=state.version) for spec in self._specs]
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                store = await self._runtime.store_within(LOOKUP_TIMEOUT_S)
                if store is None:
                    self._counters.add(lookup_failures=1)
                    return 0
                hits = await asyncio.gather(*(store.lookup(spec, state.tokens) for spec in specs))
        except (TimeoutError, KVStoreError) as exc:
            self._counters.add(lookup_failures=1)
            logger.warning("kvstore lookup failed, the request is a miss: %s", exc or type(exc).__name__)
            return 0
        hit = min(hits)
        if len(specs) == 1 and self._runtime.has_worker and hit - 1 >= self._config.min_cached_tokens:
            try:
                store.prefetch(specs[0], state.tokens[:hit])  # the worker's load of the same tokens joins it
            except KVStoreError as exc:  # the store closed meanwhile: the worker loads without it
                logger.warning("kvstore prefetch not started: %s", exc)
        return hit

    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        """``update_state_after_alloc``: vLLM allocated blocks for the hit; plan its load."""
        state = self._requests.get(request.request_id)
        if state is None or num_external_tokens <= 0:
            return
        state.load = (state.local, state.local + num_external_tokens)
        self._counters.add(lookup_hits=1, hit_tokens=num_external_tokens)

    def plan(self, scheduler_output: Any) -> StepPlan:
        """``build_connector_meta``: this step's loads, and the saves of prompts this step completes."""
        plan = StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                state.computed = new.num_computed_tokens + scheduled.get(new.req_id, 0)
                self._plan_request(new.req_id, state, plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            state = self._requests.get(rid)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:  # back from preemption: a new block table
                state.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                state.block_ids.extend(new_ids[0])
            state.computed = cached.num_computed_tokens[i] + scheduled.get(rid, 0)
            self._plan_request(rid, state, plan)
        return plan

    def _plan_request(self, rid: str, state: _Request, plan: StepPlan) -> None:
        b = self._block
        if state.load is not None:
            start, end = state.load
            assert state.hit is not None
            blocks = state.block_ids[start // b : end // b]
            plan.loads.append(LoadJob(rid, state.version, state.tokens[: state.hit], start, end, blocks))
            state.load = None
        n = len(state.tokens)
        wanted = self._config.save and state.hit is not None and state.hit < n  # the store lacks some of it
        if wanted and not state.saved and state.computed >= n:
            plan.saves.append(SaveJob(rid, state.version, state.tokens, state.block_ids[: -(-n // b)]))
            state.saved = True

    def finished(self, request: Any) -> None:
        """``request_finished``: forget the request.

        Its blocks are freed at once: a save copies them out before the next step writes any block.
        """
        self._requests.pop(request.request_id, None)
