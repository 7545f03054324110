"""A small bounded, thread-safe LRU cache, used by every in-process cache of the package.

Every cache in ``sparseattn`` that outlives a call (geometry tensors of the predictors, remembered
autotune winners and dense layouts of the Triton launcher, CUDA graphs of
:class:`~sparseattn.predictors.graphed.GraphedPredictor`) is a :class:`BoundedCache`, so that:

* memory stays bounded whatever shapes a long-running process sees (least recently used entries
  are dropped beyond ``maxsize``);
* two threads calling with different shapes never corrupt the table, never see a half-built entry
  and never get another key's value. :meth:`BoundedCache.get_or_build` builds *outside* the lock
  (a build may launch GPU work or look up other caches), so a race may build a value twice; the
  first value stored wins and every caller gets that one.

The hot path is one uncontended lock acquisition around an ``OrderedDict`` lookup (well under a
microsecond); nothing here touches tensors, so no host/device synchronisation is ever added.

Keys must hold everything the value depends on (shapes, dtypes, flags and the device as a string
such as ``"cuda:0"``: see :func:`device_key`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

__all__ = ["BoundedCache", "device_key", "all_caches"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING = object()
_REGISTRY: list["BoundedCache[Any, Any]"] = []  # every named cache, for tests and diagnostics
_REGISTRY_LOCK = threading.Lock()


def device_key(device: Any) -> str:
    """The device as a cache key: ``"cpu"``, ``"cuda:0"``, ... (a CUDA device without index gets the current one).

    ``torch.device`` objects of one device may compare unequal (``cuda`` vs ``cuda:0``); their
    indexed string form does not. A tensor's ``.device`` always has an index, so
    ``str(t.device)`` is already a valid key; this helper also accepts strings and bare devices.
    """
    s = str(device)
    if s == "cuda":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return s


class BoundedCache(Generic[K, V]):
    """A thread-safe LRU mapping of at most ``maxsize`` entries.

    Args:
        maxsize: largest number of entries kept (>= 1); inserting beyond it drops the least
            recently used entry.
        name: a label for diagnostics (:func:`all_caches`); named caches are registered.
    """

    def __init__(self, maxsize: int, name: str = "") -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"BoundedCache: maxsize must be an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self.name = name
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0
        if name:
            with _REGISTRY_LOCK:
                _REGISTRY.append(self)

    # ------------------------------------------------------------------ lookups
    def get(self, key: K, default: Any = None) -> Any:
        """The value of ``key`` (marked most recently used), or ``default``."""
        with self._lock:
            val = self._data.get(key, _MISSING)
            if val is _MISSING:
                return default
            self._data.move_to_end(key)
            return val

    def put(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` (replacing any value), evicting beyond ``maxsize``; returns ``value``."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            self._evict()
        return value

    def get_or_build(self, key: K, build: Callable[[], V], *, store: bool = True) -> V:
        """The value of ``key``, built with ``build()`` on a miss.

        ``build`` runs without the lock held (it may use other caches or be slow). If another thread
        stored ``key`` meanwhile, its value is returned and this build is dropped, so every caller
        of a key gets one and the same object. ``store=False`` builds on a miss without storing (a
        hit is still returned).
        """
        with self._lock:
            val = self._data.get(key, _MISSING)
            if val is not _MISSING:
                self._data.move_to_end(key)
                return val  # type: ignore[return-value]
        built = build()
        if not store:
            return built
        with self._lock:
            val = self._data.get(key, _MISSING)
            if val is not _MISSING:  # another thread won the race: share its value
                self._data.move_to_end(key)
                return val  # type: ignore[return-value]
            self._data[key] = built
            self._evict()
        return built

    def _evict(self) -> None:  # lock held
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
            self.evictions += 1

    # ------------------------------------------------------------------ mapping-like helpers
    def pop(self, key: K, default: Any = None) -> Any:
        with self._lock:
            return self._data.pop(key, default)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def keys(self) -> list[K]:
        """A snapshot of the keys (least recently used first)."""
        with self._lock:
            return list(self._data.keys())

    def values(self) -> list[V]:
        """A snapshot of the values (least recently used first)."""
        with self._lock:
            return list(self._data.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __getitem__(self, key: K) -> V:
        val = self.get(key, _MISSING)
        if val is _MISSING:
            raise KeyError(key)
        return val

    def __setitem__(self, key: K, value: V) -> None:
        self.put(key, value)

    def __repr__(self) -> str:
        return f"BoundedCache(name={self.name!r}, size={len(self)}, maxsize={self.maxsize})"


def all_caches() -> dict[str, BoundedCache[Any, Any]]:
    """Every named :class:`BoundedCache` created so far (module-level caches), by name."""
    with _REGISTRY_LOCK:
        return {c.name: c for c in _REGISTRY}
