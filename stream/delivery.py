"""Delivery: a batch's outputs, its users' states and their changelog, in the order that makes a crash safe.

The checkpoint of a batch, step by step (docs/reliability.md):
1. Outputs (intent events, churn alerts, DLQ records) go to the broker as whole record batches per topic and
   partition, each to the partition of the input record it answers, and are acknowledged.
2. The batch's user states are queued in memory, one per user (``unwritten`` for the store, ``pending`` for the
   changelog): a user touched by several batches within a commit interval keeps only its last state. Later batches
   read them from there.
3. The batch's input offsets become committable (``stream.offsets``).
Steps 2 and 3 of a batch run once its outputs are acknowledged, which is after the next batch has been scored
(``start_batch``): the broker's round trip overlaps the next batch's work, provided the requests are on the wire
before that work begins (``let_requests_out``: aiokafka's sender sends only in turns of the event loop, which a
scoring loop with input waiting does not give it). Meanwhile the next batch reads the states of the batch in flight
from memory (``inflight_states``), never from RocksDB.
And the commit (every ``broker_commit_interval``, at a revocation, at the stop):
4. The queued states are written to the partitions' RocksDB, one WriteBatch per partition (also between commits
   once ``MAX_UNWRITTEN`` users wait: with a million users few repeat within a commit, and one write of them all
   would stall the scoring loop).
5. Their changelog records are sent and acknowledged.
6. The offsets are committed: at-least-once by the consumer, exactly-once in the partitions' transactions.
Writing a state once a commit rather than once a batch is what Quix Streams' transactions do: a paced worker's
batches touch most of their users once each, and a RocksDB write cost a user about as much as scoring its event
(docs/performance.md, fifteenth pass).
Exactly-once runs 4 to 6 under the batch lock: a batch's outputs must not enter a transaction that commits
offsets before them. At-least-once takes the lock only for 4 and to take 5's records and fix the offsets the commit
may cover (``commit_at_least_once``); the sends, acknowledgements and 6 are awaited with the lock released, so
batches go on meanwhile.

At-least-once: a crash before 6 replays the batch against states that may already hold it (its events are then
duplicates, and their outputs were acknowledged in 1); a crash before 4 loses only queued states, which the replay
rebuilds. A state in RocksDB never holds an event whose output is missing. Exactly-once: 1, 5 and 6 go to the source partition's transaction and commit or abort together; a
restart rebuilds RocksDB from the committed changelog.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from stream import compat
from stream.engine import BatchResult, Output
from stream.offsets import InputOffsets
from stream.settings import Settings

# Changelog records held back for the next commit; past this many users they go out at once (memory bound).
MAX_PENDING_CHANGELOG = 50_000
# States held back from the store; past this many users they are written at once. A write costs about 3 us a state
# (docs/performance.md), so this bounds a write's pause of the scoring loop to about 25 ms; with 1,000 users a
# commit's states never reach it.
MAX_UNWRITTEN = 8_192


# Turns of the event loop a batch gives the producers' senders at most (``let_requests_out``): the sender takes a
# handed-over batch in about three (the accumulator's waiter, asyncio.wait's callback, the sender's step); the rest
# is room for a response to be read first.
SEND_TURNS = 16


@dataclass(slots=True)
class Sent:
    """A producer and the topic-partitions a batch's outputs were handed to it for."""

    producer: Any
    topic_partitions: list[tuple[str, int]]


async def let_requests_out(sent: Sequence[Sent]) -> None:
    """Turns of the event loop until the producers' senders have taken the batch's record batches into requests,
    then one more, in which the send task the sender created writes its request (at most ``SEND_TURNS``).
    aiokafka's sender task sends only when the loop gives it a turn, one request per broker at a time, once the one
    before is answered. A scoring loop with input always waiting gives it no turn while it scores, so a batch's
    requests went out only when the next batch handed over its own or awaited these acknowledgements, which then
    waited a whole round trip instead of overlapping the scoring (``complete`` took 4-20 ms a batch at 38,000
    events/s, 0.8-4 ms with the turns: docs/performance.md, nineteenth pass). Not every request leaves within the
    bound: the first batch of a partition in an exactly-once transaction waits for AddPartitionsToTxn's answer, and
    a reconnection or a request larger than the socket's buffer finishes in later turns; those go as before."""
    if not sent:
        return
    for _ in range(SEND_TURNS):
        if not any(compat.has_unsent_batches(s.producer, s.topic_partitions) for s in sent):
            break
        await asyncio.sleep(0)
    await asyncio.sleep(0)  # the send task the sender has just created writes its request at its first step


async def _send_closed(producer: Any, batch: Any, topic: str, partition: int) -> asyncio.Future:
    """A whole record batch to the producer, closed first: aiokafka lingers (``producer_linger_ms``) only on a batch
    still open to more records, and these batches are complete when handed over, so lingering could only delay them
    (measured: no change in capacity, latency within noise; docs/performance.md, sixth pass)."""
    batch.close()
    return await producer.send_batch(batch, topic, partition=partition)


class DeliveryError(RuntimeError):
    """A batch's outputs or state records could not be delivered to the broker."""


@dataclass(slots=True)
class InFlight:
    """A batch whose outputs are handed to the producer and whose states wait for their acknowledgement."""

    result: BatchResult
    sent: list[Any]  # delivery futures of its outputs
    offsets: dict[int, int]  # input partition -> offset of its last record in the batch


@dataclass
class Delivery:
    app: Any  # the Faust app
    table: Any  # the users table
    settings: Settings
    exactly_once: bool
    changelog_topic: str = ""
    # partition -> user key -> state: step 2's states not yet sent to the changelog, and those not yet in RocksDB
    pending: dict[int, dict[bytes, bytes]] = field(default_factory=lambda: defaultdict(dict))
    unwritten: dict[int, dict[bytes, bytes]] = field(default_factory=lambda: defaultdict(dict))
    unacked: set[asyncio.Future] = field(default_factory=set)  # at-least-once: changelog sent, not acknowledged
    inflight: InFlight | None = None
    inflight_states: dict[str, bytes] = field(default_factory=dict)  # user -> state of the batch in flight
    changelog_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held while changelog records are sent
    changelog_failure: BaseException | None = None  # at-least-once: the first changelog send that failed
    # called before states are written to RocksDB and their changelog records sent, and before a changelog offset
    # is recorded as persisted: ends the worker after a stall (stream/app.py StallWatch)
    before_write: Callable[[], None] | None = None
    on_written: Callable[[dict[int, int]], None] | None = None  # a batch's input offsets, once written

    def producer(self, partition: int) -> Any:
        """The aiokafka producer for the records of an input partition."""
        if not self.exactly_once:
            return compat.plain_producer(self.app)
        # Faust's transaction manager picks the transactional producer from the *consumer's* metadata, which
        # lacks topics we only write to, and then sends outside any transaction (faust-streaming issue #177).
        # So we send with the transactional producer of the source partition ourselves: the one that commits
        # this partition's offsets and changelog.
        group = self.app.assignor.group_for_topic(self.settings.topic_clickstream)
        tid = f"{self.settings.app_id}-{group}-{partition}"
        producer = compat.transactional_producers(self.app).get(tid)
        if producer is None:
            raise RuntimeError(f"no transactional producer {tid} (partition {partition} revoked?)")
        return producer

    async def send(
        self, topic: str, partition: int, records: Iterable[tuple[bytes | None, bytes]], producer: Any = None
    ) -> list[tuple[asyncio.Future, int]]:
        """Hand records to the producer (``self.producer(partition)`` unless given) as whole record batches; returns
        each batch's delivery future (it resolves to the RecordMetadata of the batch: the offset of its first record)
        and number of records."""
        if producer is None:
            producer = self.producer(partition)
        futures = []
        batch, n = producer.create_batch(), 0
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start anew
                futures.append((await _send_closed(producer, batch, topic, partition), n))
                batch, n = producer.create_batch(), 0
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise RuntimeError(f"a record of {len(value)} bytes does not fit in a record batch")
            n += 1
        if n:
            futures.append((await _send_closed(producer, batch, topic, partition), n))
        return futures

    async def send_outputs(self, outs: list[Output]) -> tuple[list[Any], list[Sent]]:
        """Step 1: every output to the partition of the input record it answers (co-partitioned; a DLQ record
        without a key too), in the batch's order. Returns the delivery futures, and the topic-partitions each
        producer was handed."""
        groups: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = defaultdict(list)
        for out in outs:
            groups[(out.topic, out.source.partition)].append((out.key, out.value))
        futures = []
        sent: dict[int, Sent] = {}  # id(producer) -> what it was handed
        for (topic, partition), records in groups.items():
            producer = self.producer(partition)
            futures += [f for f, _ in await self.send(topic, partition, records, producer)]
            sent.setdefault(id(producer), Sent(producer, [])).topic_partitions.append((topic, partition))
        return futures, list(sent.values())

    async def start_batch(self, result: BatchResult, offsets: dict[int, int]) -> None:
        """Step 1 begun: the batch's outputs handed to the producer. The previous batch is completed now (its acks
        have usually come back while this one was scored), so a batch is scored while the one before it is in
        flight; until it is completed, its users' states are read from ``inflight_states``. Returns once the
        outputs' produce requests are on their way, or ``SEND_TURNS`` turns of the event loop later
        (``let_requests_out``)."""
        try:
            futures, sent = await self.send_outputs(result.outputs)
        except Exception as exc:
            raise DeliveryError(str(exc)) from exc
        await self.complete()
        self.inflight = InFlight(result, futures, offsets)
        self.inflight_states.update((uid, blob) for uid, (blob, _rec) in result.states.items())
        await let_requests_out(sent)

    async def complete(self) -> dict[int, int]:
        """Steps 1 to 3 finished for the batch in flight, if any: its outputs acknowledged, its states queued.
        Returns its input offsets (partition -> last offset), now committable."""
        batch, self.inflight = self.inflight, None
        if batch is None:
            return {}
        try:
            if batch.sent:
                await asyncio.gather(*batch.sent)
        except Exception as exc:  # a fenced transactional producer, a broker gone for longer than the timeouts
            raise DeliveryError(str(exc)) from exc
        pending, unwritten, inflight_states = self.pending, self.unwritten, self.inflight_states
        for user_id, (blob, rec) in batch.result.states.items():
            key = user_id.encode()
            pending[rec.partition][key] = unwritten[rec.partition][key] = blob
            if inflight_states.get(user_id) is blob:  # not superseded by a later batch in flight
                del inflight_states[user_id]
        if sum(map(len, unwritten.values())) > MAX_UNWRITTEN:
            self.write_states()
        if sum(map(len, pending.values())) > MAX_PENDING_CHANGELOG:
            await self.send_changelog()
        if self.on_written is not None:
            self.on_written(batch.offsets)
        return batch.offsets

    def unwritten_state(self, user_id: str, partition: int | None = None) -> bytes | None:
        """A user's newest state not yet in RocksDB (the batch in flight's, or one queued for the commit), or None:
        what a reader of the user's state must look at before the store. ``partition``: the user's input partition
        (None: looked up in every partition's queue)."""
        blob = self.inflight_states.get(user_id)
        if blob is None:
            key = user_id.encode()
            for queued in self.unwritten.values() if partition is None else [self.unwritten.get(partition)]:
                if queued and (blob := queued.get(key)) is not None:
                    break
        return blob

    async def send_changelog(self) -> list[Any]:
        """Steps 4 and 5, first half: write the queued states, send the queued changelog records; returns their
        delivery futures."""
        async with self.changelog_lock:
            return await self.send_taken(self.take_changelog())

    def write_states(self) -> None:
        """Step 4: the queued states written to RocksDB, one WriteBatch per partition. A write that fails raises
        DeliveryError with nothing taken out of the queue: no offset may be committed past those states then."""
        todo = {partition: states for partition, states in self.unwritten.items() if states}
        if not todo:
            return
        if self.before_write is not None:
            self.before_write()
        try:
            for partition, states in todo.items():
                compat.write_partition(self.table, partition, states.items())
        except Exception as exc:
            raise DeliveryError(f"a state write to RocksDB failed: {exc!r}") from exc
        for partition in todo:
            self.unwritten[partition] = {}

    def take_changelog(self) -> dict[int, dict[bytes, bytes]]:
        """Step 4 and the changelog records taken out of the queue, to be sent (by ``send_taken``, holding
        ``changelog_lock`` from before they are taken: a user's states must reach the changelog in the order they
        were written). They wait in memory for up to a commit interval: a worker that was frozen meanwhile (and
        whose partitions another worker may own by now) must not write or send them, or the store and the changelog
        would go back in time for those users (``before_write`` ends the worker then; under at-least-once nothing
        else fences it)."""
        self.write_states()  # the states before their changelog records: a persisted changelog offset covers them
        taken = {partition: states for partition, states in self.pending.items() if states}
        if taken and self.before_write is not None:
            self.before_write()
        for partition in taken:
            self.pending[partition] = {}
        return taken

    async def send_taken(self, taken: dict[int, dict[bytes, bytes]]) -> list[Any]:
        """Hand taken changelog records to the producer; returns their delivery futures. aiokafka holds one record
        batch per partition until the one before it is sent, so this awaits network round trips."""
        if not self.changelog_topic:
            self.changelog_topic = self.table.changelog_topic.get_topic_name()
        futures = []
        for partition, states in taken.items():
            for fut, n in await self.send(self.changelog_topic, partition, states.items()):
                if not self.exactly_once:  # exactly-once: the store is rebuilt from the changelog at every start
                    fut.add_done_callback(partial(self._changelog_sent, n))
                futures.append(fut)
        if not self.exactly_once:
            self.unacked.update(futures)
            for fut in futures:
                fut.add_done_callback(self.unacked.discard)
        return futures

    def _changelog_sent(self, n_records: int, fut: asyncio.Future) -> None:
        """At-least-once: the table's partition remembers the changelog offset its RocksDB holds (what Faust's
        ``Table._on_changelog_sent`` does), so that recovery replays only what came after it. A send that failed is
        remembered: no offset may be committed after it (``check_changelog``), whoever was waiting for it."""
        if fut.cancelled() or fut.exception() is not None:
            if self.changelog_failure is None:
                self.changelog_failure = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            return
        if self.before_write is not None:  # a send acknowledged after a stall may have landed after a new owner's
            self.before_write()  # records: its offset must not become the store's (the restore would skip theirs)
        meta = fut.result()
        self.table.data.set_persisted_offset(meta.topic_partition, meta.offset + n_records - 1)

    async def flush(self) -> None:
        """Steps 4 and 5: the batch in flight completed, every queued state written, every queued changelog record
        sent and acknowledged (and every one sent earlier)."""
        await self.complete()
        await self.send_changelog()
        if self.unacked:
            await asyncio.gather(*list(self.unacked))
        self.check_changelog()

    def check_changelog(self) -> None:
        """Raise DeliveryError when a changelog record sent so far was not acknowledged (even one nobody awaited:
        the sends of ``complete`` past MAX_PENDING_CHANGELOG): the states it carried are not in the changelog."""
        if self.changelog_failure is not None:
            raise DeliveryError(f"a changelog record was not acknowledged: {self.changelog_failure!r}")

    def forget(self, partitions: Iterable[int]) -> None:
        """Revoked partitions: their queued states and changelog records are not ours to write or send any more
        (a revocation flushes first: there are none left then)."""
        for partition in partitions:
            self.pending.pop(partition, None)
            self.unwritten.pop(partition, None)


async def commit_at_least_once(
    delivery: Delivery, offsets: InputOffsets, batch_lock: asyncio.Lock, commit: Callable[[], Awaitable[bool]]
) -> bool:
    """Steps 4 to 6 under at-least-once. ``batch_lock`` is held only to write the queued states, take the queued
    changelog records and fix the offsets the commit covers (those of the batches queued so far, whose states are
    among the records taken or were sent before; the batch in flight too when its outputs are acknowledged already);
    sending them, their acknowledgements and the commit are awaited with it released, so batches are scored meanwhile
    (holding it stalled the scoring loop 30-80 ms every second: docs/performance.md), and a batch queued meanwhile is
    left to the next commit. Callers serialise commits. Raises DeliveryError when a state write fails or a changelog
    record is not acknowledged (nothing is committed then)."""
    async with batch_lock:
        batch = delivery.inflight
        if batch is not None and all(f.done() for f in batch.sent):  # acknowledged already: written with no wait
            await delivery.complete()
        taken = delivery.take_changelog()
        earlier = list(delivery.unacked)
        upto = dict(offsets.done)
        await delivery.changelog_lock.acquire()  # free: changelog records are sent under batch_lock or by commits
    try:
        try:
            sent = await delivery.send_taken(taken)
        finally:
            delivery.changelog_lock.release()
        await asyncio.gather(*earlier, *sent)
    except Exception as exc:
        raise DeliveryError(str(exc)) from exc
    delivery.check_changelog()
    offsets.pinned = upto
    try:
        return await commit()
    finally:
        offsets.pinned = None
