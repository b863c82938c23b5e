"""Proposed engine changes, measured without editing the engine: a worker with one change applied in memory.

    python -m load_tests.variants NAME      (settings from INTENTSTREAM_*, like ``intentstream worker``)
    python -m load_tests run --variant NAME ...   (its capacity beside the engine's, same backlog)

Each variant patches the engine's modules before the Faust app is built, then runs the ordinary worker.
They exist to measure a proposal side by side with the engine as it is; docs/performance.md gives each one's
diff and measured effect. None of them is used by the engine itself.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _module_from_git(name: str, path: str, rev: str = "HEAD") -> None:
    """Replace module ``name`` by the version of ``path`` at ``rev`` (to compare with uncommitted edits)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, check=True).stdout
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / path)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)
    # Compiled under the file's real path: profiles (py-spy) and tracebacks name it like the module it replaces
    # (their line numbers are those of the ``rev`` version).
    exec(compile(source, str(ROOT / path), "exec"), module.__dict__)
    if name == "stream.engine":
        _given_in_records(module)


def _given_in_records(engine: types.ModuleType) -> None:
    """The engines of earlier revisions read ``InRecord.timestamp_ms``, and their worker's ingest built an InRecord per
    record; today's ingest passes the records as fetched (``stream.compat.InputRecord``: ``timestamp``). Such an engine is given
    InRecords built as that ingest built them, so that an A/B against it still costs what it cost."""
    in_record = engine.InRecord
    if "timestamp_ms" not in getattr(in_record, "__dataclass_fields__", {}):
        return
    setattr(engine, "Record", in_record)  # noqa: B010  # the name today's modules import (for annotations only)
    process = engine.Engine.process

    def given_in_records(self: Any, records: list[Any], get_state: Any) -> Any:
        return process(
            self, [in_record(r.key, r.value, r.topic, r.partition, r.offset, r.timestamp) for r in records], get_state
        )

    engine.Engine.process = given_in_records


def _require_uncommitted(variant: str, *paths: str, root: Path = ROOT) -> None:
    """A ``head-*`` variant runs the committed files beside the working tree's: without an uncommitted change to
    them it would compare the engine with itself, and report a difference that is only noise."""
    changed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", *paths]).returncode != 0
    if not changed:
        raise SystemExit(
            f"variant {variant}: {', '.join(paths)} has no uncommitted change, so it would be compared with itself; "
            "edit the working tree first (the variant runs the committed version beside it)"
        )


def head(*paths: str) -> Callable[[], None]:
    """The committed version of ``paths`` (stream modules) beside the working tree's uncommitted edits of them: an
    A/B before committing, e.g. ``head-app`` (stream/app.py), ``head-engine`` (stream/engine.py and stream/emit.py)."""

    def patch() -> None:
        _require_uncommitted(f"head-{Path(paths[-1]).stem}", *paths)
        for path in paths:
            _module_from_git(path.removesuffix(".py").replace("/", "."), path)

    return patch


def before_reasons() -> None:
    """stream/engine.py and stream/emit.py before the hot-path change of docs/performance.md (intent reasons on
    Python lists, the window as of an event by a slice, one tolist() per user): the engine it was measured
    against."""
    _module_from_git("stream.emit", "stream/emit.py", BEFORE_REASONS)
    _module_from_git("stream.engine", "stream/engine.py", BEFORE_REASONS)


BEFORE_REASONS = "35a1e4f"


def before_batch_records() -> None:
    """stream/engine.py and stream/emit.py before a batch's records were validated, and its intent events written, at
    once (c3a8712: ``validate`` and a dict encoded by orjson per event, an age text per reason, a churn risk kept per
    event), given InRecords built as that revision's ingest built them (``_given_in_records``)."""
    _module_from_git("stream.emit", "stream/emit.py", BEFORE_BATCH_RECORDS)
    _module_from_git("stream.engine", "stream/engine.py", BEFORE_BATCH_RECORDS)


BEFORE_BATCH_RECORDS = "c3a8712"


def before_emission_keys() -> None:
    """stream/contract.py, stream/emit.py and stream/engine.py before a batch's emission went without a Python step
    per event where it can (f4793c3: the reasons built as a list per event and encoded each, the ids encoded one by
    one, the emission policy decided item by item, every_event too)."""
    _module_from_git("stream.contract", "stream/contract.py", BEFORE_EMISSION_KEYS)
    _module_from_git("stream.emit", "stream/emit.py", BEFORE_EMISSION_KEYS)
    _module_from_git("stream.engine", "stream/engine.py", BEFORE_EMISSION_KEYS)


BEFORE_EMISSION_KEYS = "f4793c3"


def store_wal() -> None:
    """The users table's RocksDB with its write-ahead log, as before the worker turned it off (Faust's default):
    every state write logged as well as sent to the changelog."""
    from stream import compat

    compat.disable_table_wal = lambda table: None


def state_per_batch() -> None:
    """Each batch's user states written to RocksDB as the batch completes, not once a commit (the worker before the
    fifteenth pass of docs/performance.md): nothing waits unwritten between batches, so readers go to the store for
    every state but the batch in flight's, as they did."""
    from stream import delivery

    complete = delivery.Delivery.complete

    async def complete_and_write(self: delivery.Delivery) -> dict[int, int]:
        offsets = await complete(self)
        self.write_states()
        return offsets

    delivery.Delivery.complete = complete_and_write  # type: ignore[method-assign]


def before_batch_ingest() -> None:
    """stream/app.py before ingest by record batch (35fa8c2): every input record through Faust's stream path (a
    Message and an Event each, ``take_events``), table writes one key at a time, a changelog record per user per
    batch. The rest of the worker is today's."""
    _module_from_git("stream.app", "stream/app.py", BEFORE_BATCH_INGEST)


BEFORE_BATCH_INGEST = "35fa8c2"


def scoring_thread() -> None:
    """stream/app.py with the forward pass on a scoring thread (be04d70; tried and reverted): while the model runs
    there, the event loop completes the previous batch (acknowledgements, state writes). Measured slower, 10,944
    against 12,339 events/s (docs/performance.md): the GIL changes hands between the two threads instead."""
    _module_from_git("stream.app", "stream/app.py", SCORING_THREAD)


SCORING_THREAD = "be04d70"


def before_lean_records() -> None:
    """The input topic's records unpacked into aiokafka's ConsumerRecords, as before fccee1b
    (``stream.compat.lean_input_records`` made a no-op)."""
    from stream import compat

    compat.lean_input_records = lambda topic: None


def before_s13() -> None:
    """The worker as of fd5318d: stream/app.py and stream/compat.py of that revision (Faust creates the changelog,
    ConsumerRecords, Faust's 20-minute producer timeout)."""
    for name in ("stream.compat", "stream.app"):
        _module_from_git(name, name.replace(".", "/") + ".py", "fd5318d")


def setting(name: str, value: float) -> Callable[[], None]:
    """The worker with another value of one setting (``INTENTSTREAM_<NAME>``), e.g. ``fetch-wait-1500``: Faust's own
    fetch wait (stream/app.py bounds it, default 20 ms); ``commit-5s``: Quix Streams' commit interval (default 1 s);
    ``batch-wait-20``: a batch waits 20 ms for more fetches (default 5), part of every event's latency under paced
    traffic, while a backlog fills batches at once. Some of them name what is now the default (``batch-wait-5``,
    ``fetch-wait-20``, ``fetch-min-64k``): kept for the measurements docs/performance.md quotes them in."""
    return settings_of(**{name: value})


def settings_of(**values: float) -> Callable[[], None]:
    """The worker with other values of several settings at once."""

    def patch() -> None:
        for name, value in values.items():
            os.environ[f"INTENTSTREAM_{name.upper()}"] = str(value)

    return patch


def padded_rows() -> None:
    """The model over right-padded rows, as before the engine laid a batch's rows end to end
    (``LoadedModel.scores_rows`` off: ``IntentModel.forward`` with lengths, packing the padded rows itself)."""
    from models.artifact import LoadedModel

    LoadedModel.scores_rows = property(lambda self: False)  # type: ignore[method-assign,assignment]


def reasons_lists() -> None:
    """stream.emit.intent_reasons on Python lists (one tolist() per column) instead of ~15 numpy calls on a
    64-record window: the same reasons (checked on random windows in docs/performance.md), 2.5x cheaper."""
    from models.features import FLAG_NEW_SESSION, FLAG_SAME_ITEM
    from stream import emit

    def intent_reasons(records: Any, limit: int = 3) -> list[str]:
        n = len(records)
        if not n:
            return []
        ts, types, flags = records["ts"].tolist(), records["type"].tolist(), records["flags"].tolist()
        now = ts[-1]
        session_from = next((i for i in range(n - 1, -1, -1) if flags[i] & FLAG_NEW_SESSION), 0)
        reasons: list[str] = []
        cutoff = now - 600_000
        n_add_recent = sum(1 for t, x in zip(ts, types, strict=True) if x == emit.ADD and t >= cutoff)
        if n_add_recent:
            reasons.append(f"{n_add_recent} add_to_cart in 10 min")
        session = types[session_from:]
        last_checkout = max((i for i, x in enumerate(session) if x == emit.CHECKOUT), default=-1)
        if last_checkout >= 0 and emit.PURCHASE not in session[last_checkout:]:
            reasons.append("checkout_start without purchase")
        n_remove = session.count(emit.REMOVE)
        if n_remove:
            reasons.append(f"{n_remove} remove_from_cart this session")
        repeat = sum(1 for f in flags[session_from:] if f & FLAG_SAME_ITEM)
        if repeat >= 2:
            reasons.append(f"same item viewed {repeat + 1} times")
        gap = float(records["gap_s"][session_from]) * 1000 if session_from > 0 else 0.0
        if gap >= 86_400_000:
            reasons.append(f"returned after {emit._ago(int(gap))}")
        last_purchase = max((i for i, x in enumerate(types) if x == emit.PURCHASE), default=-1)
        if last_purchase >= 0 and now - ts[last_purchase] < 30 * 86_400_000 and len(reasons) < limit:
            reasons.append(f"purchased {emit._ago(now - ts[last_purchase])} ago")
        if not reasons:
            n_views = session.count(emit.VIEW)
            reasons.append(f"{n_views} product_view this session" if n_views else "browsing")
        return reasons[:limit]

    emit.intent_reasons = intent_reasons


def gc_log() -> None:
    """Log every garbage collection that pauses the worker for 10 ms or more (``event=gc_pause``): to tell GC
    pauses from other causes of latency spikes."""
    import gc
    import logging
    import time

    log = logging.getLogger("intentstream.gc")
    started: dict[str, float] = {}

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            ms = (time.perf_counter() - started.pop("t")) * 1000
            if ms >= 10:
                log.warning(
                    "event=gc_pause generation=%d ms=%.1f collected=%d", info["generation"], ms, info["collected"]
                )

    gc.callbacks.append(callback)


def step_times() -> None:
    """Log, every 200 batches, the worker thread's CPU time per event in ``Engine.process`` and in its steps
    (prepare, score, finish and the suggestions' lookup within finish), and per event outside the engine
    (``event=step_times``): where a setting's cost lands in the worker, which a benchmark outside it may not show."""
    import logging
    import time

    from stream import engine

    log = logging.getLogger("intentstream.steps")
    spent = dict.fromkeys(("prepare", "score", "finish", "suggestions", "process"), 0.0)
    seen = {"batches": 0, "events": 0, "since": time.thread_time()}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.thread_time() - started

        return wrapper

    for name in ("prepare", "score", "finish", "_suggestions"):
        setattr(engine.Engine, name, timed(name.strip("_"), getattr(engine.Engine, name)))
    process = timed("process", engine.Engine.process)

    def counted(self: Any, records: Any, *args: Any, **kwargs: Any) -> Any:
        out = process(self, records, *args, **kwargs)
        seen["batches"] += 1
        seen["events"] += len(records)
        if seen["batches"] % 200 == 0:
            n, thread = seen["events"], time.thread_time() - seen["since"]
            per = " ".join(f"{k}_us={v / n * 1e6:.1f}" for k, v in spent.items())
            log.warning("event=step_times events=%d %s thread_us=%.1f", n, per, thread / n * 1e6)
        return out

    engine.Engine.process = counted  # type: ignore[method-assign]


def wait_times() -> None:
    """Log, every 5 s, where the scoring loop's wall time goes per batch (``event=wait_times``): waiting for
    input (``InputQueue.take``), handing the outputs over and completing the batch before (``Delivery.start_batch``,
    acknowledgements included, and within it ``send_outputs``, ``complete`` and ``let_requests_out``), the rest
    (admission and the engine), and the thread's CPU time: a loop that waits while records are queued leaves
    capacity unused."""
    import logging
    import time

    from stream import delivery, ingest

    log = logging.getLogger("intentstream.waits")
    spent = {"take": 0.0, "start_batch": 0.0}
    seen = {"batches": 0, "wall": time.perf_counter(), "cpu": time.thread_time(), "events": 0, "first_age": 0.0}
    arrived: dict[int, float] = {}  # id of a queued fetch -> when the fetcher queued it
    started_once: list[bool] = []
    put, take = ingest.InputQueue.put, ingest.InputQueue.take

    async def stamped_put(self: Any, batch: Any) -> None:
        arrived[id(batch)] = time.perf_counter()
        await put(self, batch)

    async def aged_take(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        fetches = await take(self, *args, **kwargs)
        first = arrived.pop(id(fetches[0]), started)
        for f in fetches[1:]:
            arrived.pop(id(f), None)
        seen["first_age"] += max(0.0, started - first)  # how long the batch's first fetch was queued before
        seen["events"] += sum(ingest.size(f) for f in fetches)
        return fetches

    ingest.InputQueue.put = stamped_put  # type: ignore[method-assign]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
                if name == "start_batch":
                    seen["batches"] += 1
                    wall = time.perf_counter() - seen["wall"]
                    if seen["batches"] == 1 and not started_once:  # the first batch: count from here, not the start-up
                        started_once.append(True)
                        spent.update(dict.fromkeys(spent, 0.0))
                        seen.update(
                            batches=0, wall=time.perf_counter(), cpu=time.thread_time(), events=0, first_age=0.0
                        )
                    elif wall >= 5.0:  # by time, not batches: a drain's batches of 4,096 are 4x fewer than of 1,024
                        n, cpu = seen["batches"], time.thread_time() - seen["cpu"]
                        per = " ".join(f"{k}_ms={v / n * 1e3:.2f}" for k, v in spent.items())
                        log.warning(
                            "event=wait_times batches=%d events_per_batch=%.0f queued_before_take_ms=%.2f %s "
                            "rest_ms=%.2f thread_cpu_pct=%.0f",
                            n,
                            seen["events"] / n,
                            seen["first_age"] / n * 1e3,
                            per,
                            (wall - spent["take"] - spent["start_batch"]) / n * 1e3,
                            100 * cpu / wall,
                        )
                        spent.update(dict.fromkeys(spent, 0.0))
                        seen.update(
                            batches=0, wall=time.perf_counter(), cpu=time.thread_time(), events=0, first_age=0.0
                        )

        return wrapper

    ingest.InputQueue.take = timed("take", aged_take)  # type: ignore[method-assign]
    delivery.Delivery.start_batch = timed("start_batch", delivery.Delivery.start_batch)  # type: ignore[method-assign]
    # within start_batch: handing the outputs over, completing the batch before (its acknowledgements awaited), the
    # turns given to the producer's sender (``complete`` also counts its calls outside start_batch: before an idle
    # wait for input, and a commit's flush)
    for name in ("send_outputs", "complete"):
        spent[name] = 0.0
        setattr(delivery.Delivery, name, timed(name, getattr(delivery.Delivery, name)))
    spent["let_requests_out"] = 0.0
    delivery.let_requests_out = timed("let_requests_out", delivery.let_requests_out)


def before_send_turns() -> None:
    """stream/delivery.py without ``let_requests_out`` (as before the nineteenth pass of docs/performance.md): a
    batch's produce requests go out only when the event loop next gives aiokafka's sender a turn, which a scoring
    loop with input waiting gives only when the next batch awaits their acknowledgements."""
    from stream import delivery

    async def no_turns(sent: Any) -> None:
        return None

    delivery.let_requests_out = no_turns


def fetch_sizes() -> None:
    """Log, every 5 s, how the input topic reaches the scoring loop (``event=fetch_sizes``): the consumer's calls for
    records (``getmany``), the fetches of the input topic handed over, the records they held, and the CPU time of
    the worker's threads per record: under paced traffic each hand-over costs thread hops and Faust's bookkeeping
    whatever it holds, so the records per hand-over say how much of that a record pays."""
    import logging
    import time

    from faust.transport.consumer import Consumer

    from stream import ingest

    log = logging.getLogger("intentstream.fetches")
    seen: dict[str, Any] = {"calls": 0, "fetches": 0, "records": 0, "since": time.monotonic(), "cpu": _threads_cpu()}
    put, wait_next = ingest.InputQueue.put, Consumer._wait_next_records

    async def counted_put(self: Any, batch: Any) -> None:
        seen["fetches"] += 1
        seen["records"] += ingest.size(batch)
        now = time.monotonic()
        if now - seen["since"] >= 5.0:
            cpu = _threads_cpu()
            n = max(1, seen["records"])
            per_thread = " ".join(
                f"{name}_us={(cpu[name] - seen['cpu'].get(name, 0.0)) / n * 1e6:.1f}" for name in sorted(cpu)
            )
            log.warning(
                "event=fetch_sizes seconds=%.1f getmany=%d fetches=%d records=%d records_per_fetch=%.1f %s",
                now - seen["since"], seen["calls"], seen["fetches"], seen["records"],
                seen["records"] / max(1, seen["fetches"]), per_thread,
            )  # fmt: skip
            seen.update(calls=0, fetches=0, records=0, since=now, cpu=cpu)
        await put(self, batch)

    async def counted_wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen["calls"] += 1
        return await wait_next(self, *args, **kwargs)

    ingest.InputQueue.put = counted_put  # type: ignore[method-assign]
    Consumer._wait_next_records = counted_wait  # type: ignore[method-assign]


def _threads_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process by name (main, or the first word of a thread's name)."""
    import os

    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        name = "main" if int(tid) == os.getpid() else name.split("-")[0].lower() or "thread"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def switch_interval(seconds: float) -> Callable[[], None]:
    """Python's GIL switch interval (default 5 ms): how long the scoring loop may hold the GIL while Faust's consumer
    thread, which needs it for every step of a fetch, waits. Measured 1 ms on 4 December: capacity unchanged in two
    side-by-side runs of three turns, p99 worse at 12,000 events/s (docs/performance.md, ninth pass). 20 and 50 ms on 6
    December: the lower p50 in seven A/Bs near 75% of capacity, then the higher in an eighth, longer one; the threads'
    CPU, run-queue wait and switches unchanged: no mechanism found, not adopted (twentieth pass)."""

    def patch() -> None:
        sys.setswitchinterval(seconds)

    return patch


def gc_freeze() -> None:
    """``gc.freeze()`` once the first batch is processed (imports, the app and the restored tables are in place):
    what existed then leaves the cyclic collector's generations, so a full collection no longer walks it. Logs
    its pauses like ``gc-log``."""
    import gc

    from stream import engine

    gc_log()

    process = engine.Engine.process
    frozen: list[bool] = []

    def first_then_process(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = process(self, *args, **kwargs)
        if not frozen:
            frozen.append(True)
            gc.collect()
            gc.freeze()
        return result

    engine.Engine.process = first_then_process  # type: ignore[method-assign]


def gc_young(threshold: int) -> Callable[[], None]:
    """The worker's threshold of the cyclic collector's youngest generation (``stream.app.GC_YOUNG_THRESHOLD``, set
    once the worker runs) at ``threshold`` net container allocations: ``gc-young-700`` is Python's default, the
    worker before 9895f5a (docs/performance.md, seventh pass)."""

    def patch() -> None:
        from stream import app

        app.GC_YOUNG_THRESHOLD = threshold  # read by freeze_startup_objects when it runs

    return patch


def items_module_at(rev: str) -> types.ModuleType:
    """models/items.py as of ``rev``, as a module of its own (``models.items`` is left alone)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:models/items.py"], capture_output=True, check=True
    ).stdout
    module = types.ModuleType(f"models.items_{rev}")
    module.__file__ = str(ROOT / "models/items.py")
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def items_before() -> None:
    """``models.items.suggest`` as it was before it was made faster (ITEMS_BEFORE): the same suggestions (held to it
    by tests/test_items_reference.py), to measure the lookup's speed-up in the worker beside the engine's."""
    module = items_module_at(ITEMS_BEFORE)
    items = importlib.import_module("models.items")
    items.suggest = module.suggest  # type: ignore[attr-defined]
    items.suggest_json = as_flat(module.suggest)  # type: ignore[attr-defined]
    if "stream.engine" in sys.modules:
        sys.modules["stream.engine"].suggest_json = items.suggest_json  # type: ignore[attr-defined]


def as_flat(suggest: Callable[..., Any]) -> Callable[..., Any]:
    """A ``suggest`` that takes one array per window (an older revision's) called as the engine calls
    ``suggest_json``: the windows laid end to end, cut apart again (a few microseconds a batch, charged to the older
    lookup). It returns Suggestion lists, which ``contract.intent_record`` encodes as it did then."""

    def suggest_flat(
        model: Any, codes: Any, types: Any, times: Any, lengths: Any, k: Any = None, config: Any = None, at: Any = None
    ):
        if at is not None:  # the windows as positions into the batch's windows: gathered, as the engine did then
            codes, types, times = codes[at], types[at], times[at]
        cut = np.cumsum(lengths)[:-1]
        return suggest(model, np.split(codes, cut), np.split(types, cut), np.split(times, cut), k=k, config=config)

    return suggest_flat


ITEMS_BEFORE = "4ae7345"


def suggest_per_user() -> None:
    """A proposed engine change: one lookup per user per batch, the window up to the user's last emitted event in
    the batch, whose suggestions the user's other emitted events of the batch carry too (today each emitted event
    is looked up with its own window). Fewer windows looked up where users emit several events per batch, at the
    price of suggestions that depend on how records are cut into batches (within one batch)."""
    from models.items import suggest
    from stream import engine

    def _suggestions(self: Any, items: Any, windows: list[Any], ends: list[Any]) -> list[Any]:
        if items is None:
            return [None] * sum(map(len, ends))
        last = [w[: at[-1]] for w, at in zip(windows, ends, strict=True)]
        got = suggest(
            items,
            [w["item"] for w in last],
            [w["type"] for w in last],
            [w["ts"] for w in last],
            k=self.settings.suggestions_k,
        )
        return [offer for offer, at in zip(got, ends, strict=True) for _ in at]

    engine.Engine._suggestions = _suggestions  # type: ignore[method-assign]


VARIANTS: dict[str, Callable[[], None]] = {
    "head-app": head("stream/app.py"),
    "head-engine": head("stream/emit.py", "stream/engine.py"),
    "head-delivery": head("stream/delivery.py"),
    "head-ingest": head("stream/ingest.py"),
    "before-reasons": before_reasons,
    "before-batch-ingest": before_batch_ingest,
    "before-batch-records": before_batch_records,
    "before-emission-keys": before_emission_keys,
    "store-wal": store_wal,
    "state-per-batch": state_per_batch,
    "scoring-thread": scoring_thread,
    "before-lean-records": before_lean_records,
    "before-s13": before_s13,
    "fetch-wait-20": setting("fetch_max_wait_ms", 20),
    "fetch-wait-100": setting("fetch_max_wait_ms", 100),
    "fetch-wait-1500": setting("fetch_max_wait_ms", 1500),
    "fetch-wait-10": setting("fetch_max_wait_ms", 10),
    "fetch-min-1": setting("fetch_min_bytes", 1),
    "fetch-min-16k": setting("fetch_min_bytes", 16_384),
    "fetch-min-64k": setting("fetch_min_bytes", 65_536),
    "fetch-min-128k": setting("fetch_min_bytes", 131_072),
    # the worker before the broker held its fetches: whatever had come, a fetch wait of 100 ms, a batch wait of 20
    "before-fetch-min": settings_of(fetch_min_bytes=1, fetch_max_wait_ms=100, batch_max_ms=20.0),
    "commit-5s": setting("commit_interval_s", 5.0),
    "batch-wait-5": setting("batch_max_ms", 5.0),
    "batch-wait-20": setting("batch_max_ms", 20.0),
    "batch-512": setting("batch_max_events", 512),
    "batch-1024": setting("batch_max_events", 1024),
    "batch-4096": setting("batch_max_events", 4096),
    "batch-wait-35": setting("batch_max_ms", 35.0),
    "batch-wait-50": setting("batch_max_ms", 50.0),
    # batches and fetches of at most 256 events, as before ce8b9a7 (the input queue bounded in records either way)
    "backlog-256": setting("batch_backlog_events", 256),
    # bigger batches from a backlog (a batch's fixed costs, its producer round trips among them, over more events);
    # the input queue must hold more than one such batch for the fetcher to go on meanwhile
    "backlog-2048": setting("batch_backlog_events", 2048),
    "backlog-4096": setting("batch_backlog_events", 4096),
    "queue-8192": setting("queue_max_events", 8192),
    "queue-16384": setting("queue_max_events", 16384),
    "reasons-lists": reasons_lists,
    "padded-rows": padded_rows,
    "gc-log": gc_log,
    "step-times": step_times,
    "wait-times": wait_times,
    "fetch-sizes": fetch_sizes,
    "before-send-turns": before_send_turns,
    "gc-freeze": gc_freeze,
    "switch-1ms": switch_interval(0.001),
    "switch-20ms": switch_interval(0.02),
    "switch-50ms": switch_interval(0.05),
    "gc-young-700": gc_young(700),
    "gc-young-10k": gc_young(10_000),
    "items-before": items_before,
    "suggest-per-user": suggest_per_user,
}


def apply(name: str) -> None:
    """Apply a variant; ``a+b`` applies a, then b."""
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"load_tests.variants: unknown variant {part!r}; known: {', '.join(VARIANTS)}")
        VARIANTS[part]()


def main(argv: list[str] | None = None) -> int:
    import argparse

    from stream.settings import Settings
    from stream.worker import run

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(f"usage: python -m load_tests.variants NAME[+NAME...] (names: {', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    apply(argv[0])
    return run(argparse.Namespace(web_port=None), Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
