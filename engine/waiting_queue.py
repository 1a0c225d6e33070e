"""The scheduler's waiting queue: a deque that knows when its policies' view of it is stale."""
from __future__ import annotations

from collections import deque


class WaitingQueue(deque):
    """The waiting queue. Its `epoch` changes whenever its membership or a member does (a
    member's own methods call `changed` through `Request.queue`), so the policies' view of it
    is rebuilt only then; `mark` is the epoch of the last change other than an append at the
    back (a view built at a later epoch only needs the items appended since). `tokens` is the
    members' total length, kept as they come and go (a waiting request gains no tokens)."""

    epoch = 0
    mark = 0
    tokens = 0

    def changed(self) -> None:
        self.epoch += 1
        self.mark = self.epoch

    def _joined(self, item, at_back: bool = False) -> None:
        item.queue = self
        self.tokens += item.num_tokens
        if at_back:
            self.epoch += 1
        else:
            self.changed()

    def _left(self, item) -> None:
        item.queue = None
        self.tokens -= item.num_tokens
        self.changed()

    def append(self, item) -> None:
        super().append(item)
        self._joined(item, at_back=True)

    def appendleft(self, item) -> None:
        super().appendleft(item)
        self._joined(item)

    def insert(self, i: int, item) -> None:
        super().insert(i, item)
        self._joined(item)

    def extend(self, items) -> None:
        for item in items:
            self.append(item)

    def remove(self, item) -> None:
        super().remove(item)
        self._left(item)

    def remove_all(self, items: list) -> None:
        """`remove` each of `items` (members), in one pass over the queue."""
        if not items:
            return
        if len(items) == 1:
            self.remove(items[0])
            return
        gone = set(items)
        kept = [x for x in self if x not in gone]
        super().clear()
        super().extend(kept)
        for item in items:
            self._left(item)

    def clear(self) -> None:
        for item in self:
            item.queue = None
        super().clear()
        self.tokens = 0
        self.changed()

    def popleft(self):
        item = super().popleft()
        self._left(item)
        return item
