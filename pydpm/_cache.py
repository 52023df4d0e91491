"""`BoundedCache`: the one cache type of pydpm's hot paths (dispatch choices, attention routes, sampling plans,
workspaces, CUDA graphs), so that a process calling with ever new shapes, strides or seeds keeps a fixed
amount of host and device memory.

A hit is a plain `dict.get` (nothing is reordered on the hot path); an insert into a full cache evicts the
oldest entry first. Evicting only costs a rebuild the next time that key comes back.
"""
from __future__ import annotations

from typing import Any, Hashable


class BoundedCache(dict):
    """A dict of at most `maxsize` entries, first in first out."""

    def __init__(self, maxsize: int):
        super().__init__()
        if maxsize < 1:
            raise ValueError(f"maxsize={maxsize} must be at least 1")
        self.maxsize = maxsize

    def put(self, key: Hashable, value: Any) -> Any:
        """Store `value` under `key` (evicting the oldest entry if full) and return it."""
        if key not in self and len(self) >= self.maxsize:
            del self[next(iter(self))]
        self[key] = value
        return value

    def __reduce__(self):
        """Copies and pickles start empty: a cache holds what the owner rebuilds on demand."""
        return (type(self), (self.maxsize,))
