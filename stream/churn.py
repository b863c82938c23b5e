"""Session closing by event time: a watermark per input partition and a heap of open sessions.

The watermark of a partition is the largest event time seen in it, advanced record by record in offset
order, so the sessions that close (no event for ``session_gap``) are the same whatever the replay speed
or batch boundaries. It never runs ahead of the wall clock by more than ``max_watermark_lead_s``: the caller
caps each event time it advances by (``Engine``), so one producer with a clock hours ahead cannot close every
open session of its partition at once. Replays of the past are not affected; a live stream's sessions close
as event time catches up. The heap is an index that can be rebuilt from the table after a restart.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from models.features import session_deadline


@dataclass
class PartitionSessions:
    """One entry per user with an open session (memory: users active within the last session gap)."""

    watermark: int = 0
    heap: list[tuple[int, str]] = field(default_factory=list)  # (deadline = last_ts + gap, user_id)
    queued: set[str] = field(default_factory=set)

    def advance(self, ts: int) -> list[str]:
        """Move the watermark to ``ts`` if later; return the users whose deadline it passed, in a
        deterministic order. The caller checks each against the user's state: a user who came back since
        is re-queued with ``touch`` at the new deadline."""
        if ts > self.watermark:
            self.watermark = ts
        due = []
        heap = self.heap
        while heap and heap[0][0] <= self.watermark:
            _, user_id = heapq.heappop(heap)
            self.queued.discard(user_id)
            due.append(user_id)
        return due

    def touch(self, user_id: str, last_ts: int, gap_ms: int) -> None:
        if user_id not in self.queued:
            self.queued.add(user_id)
            heapq.heappush(self.heap, (session_deadline(last_ts, gap_ms), user_id))
