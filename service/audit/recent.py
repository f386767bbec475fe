"""A small least-recently-used map shared by threads: what summaries keep between calls."""

from __future__ import annotations

import collections
import threading
from typing import Any

__all__ = ["Recent"]


class Recent:
    """The last ``size`` values by key (least recently used out first), shared by threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
