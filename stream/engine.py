"""The engine's logic for one batch of input records, free of Faust so it can be tested and reused:
ingest (validate) -> state (window, dedup, lateness) -> score (one forward pass) -> emit (intents, churn).

The worker (stream/app.py) feeds it batches and writes back what it returns: output records and the new state of
every user the batch touched. Per record it does only what the order of records decides (validation, session
closing by the partition's watermark, the window's append or late insert); everything else is done once per
batch: the states read in one call, the windows built once per user, one forward pass, the reasons of every
emitted event computed together, and so are their item suggestions (docs/engine.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import orjson
import torch

from models.artifact import LoadedModel
from models.features import RECORD_DTYPE, session_deadline
from models.items import ItemModel, ranges, suggest_json
from stream import contract, emit
from stream.churn import PartitionSessions
from stream.contract import Event
from stream.scoring import UserBatch, UserScores, score_batch
from stream.settings import Settings
from stream.state.user import BANDS, Accept, PendingWindow, UserState

MAX_FUTURE_MS = 86_400_000  # event times more than a day ahead of the wall clock are rejected


class Record(Protocol):
    """An input record as the engine reads it: the worker passes the records as its consumer fetched them
    (``stream.compat.InputRecord`` tuples: no object more per record), tests and benchmarks build ``InRecord``s."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int  # the record's Kafka timestamp (its production time for our producers), epoch ms


@dataclass(slots=True)
class InRecord:
    """A ``Record`` built by hand: tests, benchmarks, ``load_tests.engine_ab``."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int

    @property
    def timestamp_ms(self) -> int:
        """The field's name before ConsumerRecords were passed as they are: engines of earlier revisions read it, and
        tests/test_engine_reference.py and load_tests/engine_ab.py give them InRecords."""
        return self.timestamp


@dataclass(slots=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    source: Record  # the input record it answers (its partition keeps outputs co-partitioned)


@dataclass
class BatchResult:
    outputs: list[Output] = field(default_factory=list)
    states: dict[str, tuple[bytes, Record]] = field(default_factory=dict)  # user -> (state, last record)
    scored: int = 0
    duplicates: int = 0
    dlq_reasons: list[str] = field(default_factory=list)
    intents: int = 0
    alerts: int = 0
    model_seconds: float = 0.0
    latencies_ms: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Touched:
    window: PendingWindow
    prior: np.ndarray  # the window before this batch
    hidden: np.ndarray | None  # the state's hidden state, when the serving model made it
    churn_risk_before: float
    last_record: Record
    items: list[tuple[Record, Event]] = field(default_factory=list)
    rescore: bool = False  # a late event was inserted: score the final window instead of the new records

    @property
    def state(self) -> UserState:
        return self.window.state


@dataclass(slots=True)
class PreparedBatch:
    """A batch between ``Engine.prepare`` and ``Engine.finish``: validated, its users' windows updated, its model
    inputs assembled; the models it is scored and emitted with are the ones it was prepared with."""

    model: LoadedModel
    items: ItemModel | None
    now_ms: int
    result: BatchResult = field(default_factory=BatchResult)
    touched: dict[str, _Touched] = field(default_factory=dict)
    closed: list[tuple[str, int, Record]] = field(default_factory=list)  # (user, last_ts, record that closed it)
    scored: list[tuple[str, _Touched]] = field(default_factory=list)  # users with new events, in first-seen order
    inputs: list[UserBatch] = field(default_factory=list)  # their model inputs, in the same order


def _risk_at(t: _Touched, per_item: list[list[float]] | None, last_ts: int) -> float:
    """The churn risk a session closed in this batch is judged at: the score of its last event. A session that ends
    at the window's last event takes the user's last score (a late event may end before the window's last: the
    session is then scored on the window with the late event in it), else the score of the batch's last event at
    that time; a session the batch brought no event to keeps the risk scored before it."""
    if per_item is None:
        return t.churn_risk_before
    if last_ts == t.window.last_ts:
        return per_item[-1][1]
    for (_, ev), p in zip(reversed(t.items), reversed(per_item), strict=True):
        if ev.ts == last_ts:
            return p[1]
    return t.churn_risk_before


class Engine:
    def __init__(self, settings: Settings, model: LoadedModel, device: torch.device, items: ItemModel | None = None):
        self.settings = settings
        self.model = model
        self.items = items  # the item model of the suggestions; None: intent events carry null
        self.device = device
        self.sessions: dict[int, PartitionSessions] = {}
        self.gap_ms = round(settings.session_gap_s * 1000)
        self.lateness_ms = int(settings.allowed_lateness_s * 1000)
        self.watermark_lead_ms = int(settings.max_watermark_lead_s * 1000)

    def restore_partition(self, partition: int, items: Iterable[tuple[str, bytes]]) -> int:
        """Rebuild a partition's watermark and open sessions from its users' states (after a restart or a
        rebalance): the watermark is the newest event time in the partition, and every user whose last
        session was not yet judged is queued again. Returns the number of users read."""
        sessions = self.sessions[partition] = PartitionSessions()
        n = 0
        cap = int(time.time() * 1000) + self.watermark_lead_ms
        for user_id, blob in items:
            n += 1
            st = UserState.from_bytes(blob)
            last_ts = st.last_ts
            sessions.watermark = max(sessions.watermark, min(last_ts, cap))
            if st.closed_ts != last_ts:
                sessions.touch(user_id, last_ts, self.gap_ms)
        return n

    def swap_model(self, model: LoadedModel) -> None:
        """Takes effect at the next batch; users' hidden states from the old model are rebuilt lazily."""
        self.model = model

    def swap_items(self, items: ItemModel | None) -> None:
        """Takes effect at the next batch; suggestions keep no state of their own, so nothing is rebuilt."""
        self.items = items

    def process(self, records: Sequence[Record], get_state: Callable[[str, Record], bytes | None]) -> BatchResult:
        """One batch, start to end: ``prepare``, ``score`` and ``finish`` in a row. (The forward pass on a thread of
        its own, overlapped with the previous batch's completion, was measured slower: the ``scoring-thread``
        variant of load_tests/variants.py.)"""
        batch = self.prepare(records, get_state)
        return self.finish(batch, self.score(batch))

    def prepare(self, records: Sequence[Record], get_state: Callable[[str, Record], bytes | None]) -> PreparedBatch:
        """Ingest and state: validate every record, close sessions by the partition's watermark, add each event to
        its user's window (or find it a duplicate, or too late); what the model must score, per user. Reads the
        users' states through ``get_state``, once per user."""
        s, model = self.settings, self.model  # one model of each kind for the whole batch
        batch = PreparedBatch(model, self.items, int(time.time() * 1000))
        result, touched, closed = batch.result, batch.touched, batch.closed
        now_ms = batch.now_ms
        max_ts_ms = now_ms + MAX_FUTURE_MS
        watermark_cap = now_ms + self.watermark_lead_ms
        featurizer, tag, lateness_ms, gap_ms = model.featurizer, model.state_tag, self.lateness_ms, self.gap_ms

        def load(user_id: str, rec: Record) -> _Touched:
            t = touched.get(user_id)
            if t is None:
                blob = get_state(user_id, rec)
                st = UserState.from_bytes(blob) if blob else UserState()
                hidden = st.hidden if st.model_tag == tag else None
                t = touched[user_id] = _Touched(
                    PendingWindow.of(st, featurizer), st.records, hidden, st.churn_risk, rec
                )
            return t

        events = contract.validate_many(
            [(rec.value, rec.key) for rec in records], max_bytes=s.max_record_bytes, max_ts_ms=max_ts_ms
        )
        for rec, event in zip(records, events, strict=True):
            if isinstance(event, str):
                self._dlq(result, rec, event, now_ms)
                continue
            sessions = self.sessions.get(rec.partition)
            if sessions is None:
                sessions = self.sessions[rec.partition] = PartitionSessions()
            event_time = event.ts if event.ts <= watermark_cap else watermark_cap  # a skewed clock's outlier
            if sessions.heap and sessions.heap[0][0] <= max(event_time, sessions.watermark):
                for user_id in sessions.advance(event_time):  # sessions closed by this record's event time
                    t = load(user_id, rec)
                    st, last_ts = t.window.state, t.window.last_ts
                    if session_deadline(last_ts, gap_ms) > sessions.watermark:
                        sessions.touch(user_id, last_ts, gap_ms)  # came back since: still open
                    elif st.closed_ts != last_ts:
                        closed.append((user_id, last_ts, rec))
                        st.closed_ts = last_ts
                        t.last_record = rec
            elif event_time > sessions.watermark:
                sessions.watermark = event_time
            t = load(event.user_id, rec)
            outcome = t.window.accept(event, lateness_ms)
            if outcome is Accept.APPENDED:
                pass
            elif outcome is Accept.DUPLICATE:
                result.duplicates += 1
                continue
            elif outcome is Accept.TOO_LATE:
                self._dlq(result, rec, contract.TOO_LATE_REASON, now_ms)
                continue
            else:  # INSERTED
                t.rescore = True
            t.items.append((rec, event))
            t.last_record = rec
            sessions.touch(event.user_id, t.window.last_ts, gap_ms)

        for t in touched.values():
            t.window.finish()
        batch.scored = [(uid, t) for uid, t in touched.items() if t.items]
        for _, t in batch.scored:
            window, appended = t.state.records, t.window.appended
            if t.rescore:
                ub = UserBatch(prior=t.prior, hidden=t.hidden, rescore_window=window)
            elif len(appended) <= len(window):  # the window's tail: the appended records, packed already
                ub = UserBatch(prior=t.prior, hidden=t.hidden, new=window[len(window) - len(appended) :])
            else:  # more new events than the window holds: the first have left it (rare: packed here)
                ub = UserBatch(prior=t.prior, hidden=t.hidden, new=np.array(appended, dtype=RECORD_DTYPE))
            batch.inputs.append(ub)
        return batch

    def score(self, batch: PreparedBatch) -> list[UserScores]:
        """The model's one forward pass over a prepared batch; it touches nothing but the batch's model inputs."""
        if not batch.inputs:
            return []
        started = time.perf_counter()
        scores = score_batch(batch.model, batch.inputs, self.device)
        batch.result.model_seconds = time.perf_counter() - started
        return scores

    def finish(self, batch: PreparedBatch, user_scores: list[UserScores]) -> BatchResult:
        """Emit: the intent events by the emission policy (with reasons and suggestions), churn alerts for the
        sessions the batch closed, and every touched user's new state."""
        result, touched, model = batch.result, batch.touched, batch.model
        tag = model.state_tag
        spans: dict[str, tuple[int, int]] = {}  # user -> its items' rows in ``probs``
        probs = np.empty((0, 3))
        if batch.scored:
            scored_at = int(time.time() * 1000)
            # Every scored item's [purchase, churn, value] in one array, the users' items end to end (a user whose
            # window was rescored after a late event has its final score for each of its items).
            probs = np.concatenate(
                [
                    np.repeat(us.probs[-1:], len(t.items), axis=0) if ub.rescore_window is not None else us.probs
                    for (_, t), us, ub in zip(batch.scored, user_scores, batch.inputs, strict=True)
                ]
            )
            items = [item for _, t in batch.scored for item in t.items]
            result.scored += len(items)
            result.latencies_ms += [scored_at - rec.timestamp for rec, _ in items]
            event_ts = [ev.ts for _, ev in items]
            stops = np.cumsum([len(t.items) for _, t in batch.scored]).tolist()  # each user's items end here
            spans = {uid: (stop - len(t.items), stop) for (uid, t), stop in zip(batch.scored, stops, strict=True)}
            purchase = probs[:, 0].astype(np.float64)
            bands = emit.bands_of(purchase, model.thresholds["purchase"])
            chosen = self._emit_intents(batch, stops, purchase.tolist(), bands.tolist(), event_ts)
            last_rows = probs[np.subtract(stops, 1)].tolist()
            for (_, t), us, (score, churn_risk, _) in zip(batch.scored, user_scores, last_rows, strict=True):
                st = t.state
                st.hidden, st.model_tag, st.score, st.churn_risk = us.hidden, tag, score, churn_risk
            # each emitting user's window, and where each of its emitted events' window ends in it
            windows: list[np.ndarray] = []
            ends: list[np.ndarray] = []
            chosen_ts = np.array(event_ts, dtype=np.int64)[chosen]
            cuts = np.searchsorted(chosen, stops).tolist()
            for (_, t), j, k in zip(batch.scored, [0, *cuts[:-1]], cuts, strict=True):
                if k > j:
                    window = t.state.records
                    windows.append(window)
                    ends.append(window["ts"].searchsorted(chosen_ts[j:k], side="right"))
            reasons = emit.intent_reasons_json_at(windows, ends)
            suggestions = self._suggestions(batch.items, windows, ends)
            self._intent_records(result, batch, items, chosen, chosen_ts, probs, bands, reasons, suggestions, scored_at)
        for user_id, last_ts, rec in batch.closed:
            t = touched[user_id]
            span = spans.get(user_id)
            per_item = probs[span[0] : span[1]].tolist() if span is not None else None
            risk = _risk_at(t, per_item, last_ts)
            self._maybe_alert(result, model, user_id, t.state, last_ts, risk, rec)
        for uid, t in touched.items():
            result.states[uid] = (t.state.to_bytes(), t.last_record)
        return result

    def _dlq(self, result: BatchResult, rec: Record, reason: str, now_ms: int) -> None:
        value = contract.dlq_record(reason, rec.key, rec.value, rec.topic, rec.partition, rec.offset, now_ms)
        result.outputs.append(Output(self.settings.topic_dlq, rec.key, value, rec))
        result.dlq_reasons.append(reason)

    def _emit_intents(
        self, batch: PreparedBatch, stops: list[int], scores: list[float], bands: list[int], event_ts: list[int]
    ) -> np.ndarray:
        """Which scored items emit an intent event (the policy, each user's items in order: each emission moves the
        user's last emitted score and band), as positions among the batch's items (each user's end at ``stops``)."""
        s = self.settings
        cooldown_ms = int(s.emit_cooldown_s * 1000)
        policy, delta = s.emit_policy, s.emit_delta
        every_event = policy == "every_event"  # emit.should_emit's first rule: every item, the last one's state
        chosen: list[int] = []
        start = 0
        for (_, t), stop in zip(batch.scored, stops, strict=True):
            st = t.state
            if every_event:
                last = stop - 1
                st.last_score, st.last_band, st.last_emit_ts = scores[last], bands[last], event_ts[last]
            else:
                for i in range(start, stop):
                    score, band, ts = scores[i], bands[i], event_ts[i]
                    if emit.should_emit(st, score, band, ts, policy, delta, cooldown_ms):
                        chosen.append(i)
                        st.last_score, st.last_band, st.last_emit_ts = score, band, ts
            start = stop
        return np.arange(start) if every_event else np.array(chosen, dtype=np.int64)

    def _intent_records(
        self,
        result: BatchResult,
        batch: PreparedBatch,
        items: list[tuple[Record, Event]],
        chosen: np.ndarray,
        chosen_ts: np.ndarray,
        probs: np.ndarray,
        bands: np.ndarray,
        reasons: list[bytes],
        suggestions: Sequence[orjson.Fragment | Sequence[tuple[str, float, str]] | None],
        scored_at: int,
    ) -> None:
        model = batch.model
        topic, outputs = self.settings.topic_intent, result.outputs
        picked = items if len(chosen) == len(items) else [items[i] for i in chosen.tolist()]
        events = [ev for _, ev in picked]
        values = contract.intent_records(
            [ev.user_id for ev in events],
            [ev.event_id for ev in events],
            chosen_ts.tolist(),
            [rec.timestamp for rec, _ in picked],
            [BANDS[b] for b in bands[chosen].tolist()],
            emit.intent_numbers(probs[chosen]),
            reasons,
            suggestions,
            model_name=model.name,
            model_version=model.version,
            scored_at_ms=scored_at,
        )
        outputs += [Output(topic, rec.key, value, rec) for (rec, _), value in zip(picked, values, strict=True)]
        result.intents += len(picked)

    def _suggestions(
        self, items: ItemModel | None, windows: list[np.ndarray], ends: list[np.ndarray]
    ) -> list[orjson.Fragment | None]:
        """The suggestions of every emitted intent event as their JSON, in one lookup for the batch. Only emitted
        events are looked up (under on_change a share of the scored ones): about 6-11 us of CPU an event under
        every_event, against 40-60 us for all else an event costs the engine (docs/training.md). Each event's
        window ends at that event, like its reasons, so what it suggests does not depend on how records were cut
        into batches."""
        if items is None:
            return [None] * sum(map(len, ends))
        if not windows:
            return []
        # the batch's windows end to end, and every event's window as positions into them (a user's events share
        # their window's records: each is looked up once)
        stacked = np.frombuffer(b"".join([w.tobytes() for w in windows]), windows[0].dtype)  # 70x np.concatenate's
        window_start = np.cumsum([0, *map(len, windows[:-1])])
        lengths = np.concatenate(ends).astype(np.int64, copy=False)
        first = np.repeat(window_start, [len(e) for e in ends])
        at = ranges(first, lengths)
        item, kind, ts = stacked["item"], stacked["type"], stacked["ts"]
        return suggest_json(items, item, kind, ts, lengths, self.settings.suggestions_k, at=at)

    def _maybe_alert(
        self, result: BatchResult, model: LoadedModel, uid: str, st: UserState, last_ts: int, risk: float, rec: Record
    ) -> None:
        threshold = model.thresholds["churn"]["alert"]
        if risk < threshold or st.churn_alert_ts == last_ts:
            return
        if st.churn_alert_ts and last_ts - st.churn_alert_ts < self.settings.churn_cooldown_s * 1000:
            return
        value = contract.churn_record(
            user_id=uid,
            risk=risk,
            last_seen_ts=last_ts,
            session_id=None,
            model_name=model.name,
            model_version=model.version,
            alerted_at_ms=int(time.time() * 1000),
            watermark_ts=self.sessions[rec.partition].watermark,
            reasons=emit.churn_reasons(st),
        )
        result.outputs.append(Output(self.settings.topic_churn, uid.encode(), value, rec))
        result.alerts += 1
        st.churn_alert_ts = last_ts
