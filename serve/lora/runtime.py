"""Per-row LoRA on a stage's torch models: requests with different adapters share one forward call.

Nothing is merged into the base weights. A forward hook on every layer some loaded adapter
targets adds, after the base layer ran on the whole batch, each adapter's low-rank update to the
rows that use it -- the segmented ("gathered") LoRA matmul of Punica / S-LoRA, in PyTorch ops:

    for each adapter a present in the call:  y[rows_a] += up_a(down_a(x[rows_a])) * scaling_a * scale_row

This is what peft computes per layer for one request (``result + lora_B(lora_A(x)) * scaling``,
with ``scaling = lora_alpha / r * set_adapters weight``, several adapters summed), restricted to
that request's rows. When a call mixes several adapters on a layer, ``serve.lora.apply`` may run
them *stacked* instead (one matmul pair over every row with a per-row scale mask) when launches
cost more than the extra rank work -- same result up to float rounding.

Rows come in *runs*: ``[(count, ((name, scale), ...)), ...]`` in batch order -- a request's
rows (its CFG negative and positive rows alike, as diffusers applies the adapter to both) form
one run. A run's adapters need not be the batch's: rows without adapters get nothing.

The caller states the runs for each model call (``with runtime.rows(runs): engine.run(...)``);
the hooks read them from a thread-local, so a loader thread never sees the step thread's runs.
Adapters load into a per-replica LRU bounded in bytes (``AdapterCache``); requests pin the
adapters they use so eviction never takes one from under a running request. Loading happens in
the caller's thread (off the step thread: the Denoiser loads before a request joins the batch);
the only shared step is installing hooks, done under the lock every forward call holds, so a
load waits at most one call and a step never waits for a load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from serve.errors import InvalidRequestError
from serve.lora.apply import Active, Stacks
from serve.lora.weights import LoadedAdapter, LoraFitError, load_adapter

logger = logging.getLogger(__name__)

Choice = tuple[str, float]
Run = tuple[int, tuple[Choice, ...]]


def slice_runs(runs: Sequence[Run], lo: int, hi: int) -> list[Run]:
    """The runs covering rows ``lo:hi`` (for a model call over a chunk of the batch)."""
    out, start = [], 0
    for count, choices in runs:
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            out.append((b - a, choices))
        start += count
    return out


class _Hook:
    """Forward hook of one layer: adds every active adapter's update to its rows."""

    def __init__(self, runtime: LoraRuntime, component: str, path: str) -> None:
        self.runtime, self.component, self.path = runtime, component, path

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        active: Active | None = getattr(self.runtime._local, "active", None)
        if active is None:
            return None
        x = args[0]
        if x.shape[0] != active.rows:
            raise RuntimeError(
                f"LoRA rows out of step: {self.component}.{self.path} got a batch of {x.shape[0]} rows, "
                f"the call's runs cover {active.rows}"
            )
        active.apply(self.component, self.path, x, output)
        return output


class AdapterCache:
    """Loaded adapters in LRU order, bounded in bytes; pinned ones (in use) are never evicted.

    When every adapter is pinned the cache may run over its bound (requests in flight keep their
    adapters); the next release brings it back under.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._pins: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._items.values())

    def get(self, name: str, version: str) -> LoadedAdapter | None:
        found = self._items.get(name)
        if found is None or found.version != version:
            return None
        self._items.move_to_end(name)
        return found

    def put(self, adapter: LoadedAdapter, *, pin: bool = False) -> list[str]:
        """Add an adapter (pinned at once with ``pin``); evicts others to make room, never this one."""
        self._items[adapter.name] = adapter
        self._items.move_to_end(adapter.name)
        if pin:
            self.pin([adapter.name])
        return self.shrink(keep=adapter.name)

    def shrink(self, keep: str | None = None) -> list[str]:
        """Evict least recently used, unpinned adapters until under the bound; returns their names."""
        evicted = []
        for name in list(self._items):
            if self.nbytes <= self.max_bytes:
                break
            if self._pins.get(name, 0) == 0 and name != keep:
                del self._items[name]
                evicted.append(name)
        self.evictions += len(evicted)
        return evicted

    def pin(self, names: Sequence[str]) -> None:
        for n in names:
            self._pins[n] = self._pins.get(n, 0) + 1

    def unpin(self, names: Sequence[str]) -> None:
        for n in names:
            left = self._pins.get(n, 0) - 1
            if left > 0:
                self._pins[n] = left
            else:
                self._pins.pop(n, None)

    def names(self) -> list[str]:
        return list(self._items)

    def snapshot(self) -> dict[str, LoadedAdapter]:
        return dict(self._items)


class LoraRuntime:
    """Adapters for one stage's torch models: loading, caching, hooks and per-call row runs.

    ``models`` maps the stage's LoRA-able components to their diffusers/transformers models (the
    engine wrappers' ``.model``); ``repository`` is a ``serve.lora.LoraRepository``.
    """

    def __init__(
        self,
        repository: Any,
        models: Mapping[str, torch.nn.Module],
        *,
        pipeline_class: str,
        unet_config: Mapping[str, Any] | None,
        device: torch.device,
        dtype: torch.dtype,
        max_bytes: int = 1 << 30,
    ) -> None:
        self.repository = repository
        self.models = dict(models)
        self.pipeline_class = pipeline_class
        self.unet_config = unet_config
        self.device, self.dtype = device, dtype
        self.cache = AdapterCache(max_bytes)
        self.stacks = Stacks(max_bytes)  # concatenated copies for mixed calls (serve/lora/apply.py)
        self._named = {c: dict(m.named_modules()) for c, m in self.models.items()}
        self._hooks: dict[tuple[str, str], Any] = {}
        self._local = threading.local()
        self._cache_lock = threading.Lock()  # the cache's dict and pins
        self._call_lock = threading.RLock()  # held by each forward call and by hook changes
        self._loading: dict[tuple[str, str], threading.Event] = {}
        self.loads = 0

    # -- loading ---------------------------------------------------------------------------------
    def _load(self, name: str, field_name: str) -> LoadedAdapter:
        """The adapter, loaded if needed, and pinned (the caller unpins it)."""
        entry = self.repository.entry(name, field_name)
        while True:
            with self._cache_lock:
                found = self.cache.get(name, entry.version)
                if found is not None:
                    self.cache.hits += 1
                    self.cache.pin([name])
                    return found
                waiting = self._loading.get((name, entry.version))
                if waiting is None:
                    self.cache.misses += 1
                    done = self._loading[(name, entry.version)] = threading.Event()
                    break
            waiting.wait(timeout=600)  # another thread loads it: use its copy
        try:
            path = self.repository.local_path(entry)
            try:
                adapter = load_adapter(
                    path,
                    name,
                    entry.version,
                    pipeline_class=self.pipeline_class,
                    unet_config=self.unet_config,
                    models=self.models,
                    device=self.device,
                    dtype=self.dtype,
                )
            except LoraFitError as exc:
                raise InvalidRequestError(field_name, name, f"does not fit this model: {exc}") from None
            self.loads += 1
            self._install(adapter)
            with self._cache_lock:
                evicted = self.cache.put(adapter, pin=True)
            if evicted:
                logger.info("adapter cache evicted %s (limit %d bytes)", ", ".join(evicted), self.cache.max_bytes)
            logger.info("loaded adapter %s (%d bytes, %s)", name, adapter.nbytes, ", ".join(adapter.components))
            return adapter
        finally:
            with self._cache_lock:
                self._loading.pop((name, entry.version), None)
            done.set()

    def _install(self, adapter: LoadedAdapter) -> None:
        """Hook every layer the adapter targets, once (under the call lock: between two forward
        calls, and atomic against another thread installing the same layers -- a layer hooked
        twice would get every update twice)."""
        wanted = [(c, p) for c, mods in adapter.modules.items() for p in mods]
        with self._call_lock:
            for component, path in wanted:
                if (component, path) not in self._hooks:
                    module = self._named[component][path]
                    self._hooks[(component, path)] = module.register_forward_hook(_Hook(self, component, path))

    @contextlib.contextmanager
    def use(self, choices: Sequence[Choice]) -> Iterator[dict[str, LoadedAdapter]]:
        """Load (if needed) and pin a request's adapters for as long as the block runs.

        Raises ``InvalidRequestError`` naming ``loras[i].name`` for an unknown or unfitting adapter.
        """
        names = [n for n, _ in choices]
        loaded: dict[str, LoadedAdapter] = {}
        pinned: list[str] = []
        try:
            for i, name in enumerate(names):
                # Pinned as it is found or loaded: a later load in this loop cannot evict it.
                loaded[name] = self._load(name, f"loras[{i}].name")
                pinned.append(name)
            yield loaded
        finally:
            with self._cache_lock:
                self.cache.unpin(pinned)
                self.cache.shrink()

    def acquire(self, choices: Sequence[Choice]) -> contextlib.ExitStack:
        """``use`` as an object to close later (a request that outlives one call)."""
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(self.use(choices))
        except BaseException:
            stack.close()
            raise
        return stack

    # -- per-call rows ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, runs: Sequence[Run]) -> Iterator[None]:
        """The row -> adapters runs of the model call(s) made inside the block (this thread only).

        Runs whose adapters are all absent cost nothing: with no adapter in the call the hooks
        return at once. Every adapter named must have been loaded (``use``) by the caller.
        """
        if not any(choices for _, choices in runs):
            with self._call_lock:
                yield
            return
        with self._cache_lock:
            adapters = self.cache.snapshot()
        missing = sorted({n for _, choices in runs for n, _ in choices if n not in adapters})
        if missing:
            raise RuntimeError(f"adapters {missing} are used by a call but not loaded (use() them first)")
        active = Active(runs, adapters, self.stacks, self.device, self.dtype)
        with self._call_lock:
            self._local.active = active
            try:
                yield
            finally:
                self._local.active = None

    # -- what it holds (routing, metrics) ----------------------------------------------------------
    def held(self) -> list[str]:
        with self._cache_lock:
            return self.cache.names()

    def stats(self) -> dict[str, float]:
        with self._cache_lock:
            c = self.cache
            total = c.hits + c.misses
            return {
                "lora_cache_hits": c.hits,
                "lora_cache_misses": c.misses,
                "lora_cache_evictions": c.evictions,
                "lora_cache_bytes": c.nbytes,
                "lora_cache_adapters": len(c.names()),
                "lora_cache_hit_rate": (c.hits / total) if total else 0.0,
            }


__all__ = ["AdapterCache", "LoraRuntime", "Run", "slice_runs"]
