"""Training data: contract events -> records, labels, the user x time split, and training chunks.

- Events come from JSON-lines files (the simulator's output, any contract events, ``.gz`` ok) or REES46 CSV
  (through ``stream.traffic.rees46`` when that adapter is present). Records are built by
  ``models.features.encode_events``: the very function whose output the engine's parity test checks.
- Labels are recomputed from the events (``training.labels``), never read from a simulator's truth file, so a
  real trace is labelled exactly like a synthetic one.
- The split is by user AND by time. Users are hashed (stable, seeded) into train/val/test 70/15/15. Time:
  train losses use only events before ``t_split``; val/test metrics only events at or after it. Every model
  still reads each user's earlier events as input context (the engine does too). ``t_split`` is per head
  (``split_time``): churn labels need 14 days of future, so churn splits earlier than purchase. With
  ``DataConfig.train_users = "all"`` the val/test users' events train too, where nothing they are trained on
  reaches the earliest t_split (``Dataset.head_mask``).
- Train-only users (``load_dataset``'s ``train_only_paths``, ``intentstream train --train-only-data``): another
  simulation's users, whose events before t_split train and who are never validated or tested. Their ids are
  namespaced, and the period and t_split come from the main files alone, so the main users' split, labels and judged
  positions are those of the main files without them. Their own labels end where their events do (at most where the
  main files' do).
- Censored labels (the horizon runs past the end of the data) are NaN and masked from losses and metrics.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
from collections.abc import Container, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from models.features import FeaturizerConfig, encode_events, session_deadline
from stream.contract import TYPE_CODE, Event

TRAIN, VAL, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "val", "test")
DAY_MS = 86_400_000
PURCHASE = TYPE_CODE["purchase"]
TRAIN_USERS = ("train", "all")  # DataConfig.train_users


@dataclass(frozen=True)
class DataConfig:
    horizon_s: float = 3600.0  # purchase label: a purchase by the same user within this time after the event
    churn_days: float = 14.0  # churn label: no event of the user within this many days after the event
    split_seed: int = 0  # salt of the user hash: another seed, another user split
    train_frac: float = 0.70
    val_frac: float = 0.15  # test gets the rest
    time_split: float = 2 / 3  # t_split as a fraction of each head's labellable period (see ``split_time``)
    # "train": only the train users' events train (held-out users and held-out time); "all": the validation and
    # test users' events train too where nothing they are trained on reaches the earliest judged period (churn's
    # t_split), the engine's own situation (it scores users whose past it was trained on); the judged positions
    # are the same.
    train_users: str = "train"
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)

    def __post_init__(self) -> None:
        if self.train_users not in TRAIN_USERS:
            raise ValueError(f"train_users: expected one of {TRAIN_USERS}, got {self.train_users!r}")

    @property
    def horizon_ms(self) -> int:
        return round(self.horizon_s * 1000)

    @property
    def churn_ms(self) -> int:
        return round(self.churn_days * DAY_MS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["featurizer"] = self.featurizer.to_dict()
        return d


@dataclass
class Dataset:
    """All events of the input files, as records grouped by user and time-ordered within each user."""

    config: DataConfig
    records: np.ndarray  # models.features.RECORD_DTYPE [N]
    event_ids: np.ndarray  # object (str) [N]: to align a truth file (oracle) with the records
    source_index: np.ndarray  # int64 [N]: index of each record's event in the input files (read order)
    user_ids: list[str]  # [U] in first-seen order
    user_start: np.ndarray  # int64 [U + 1]: records of user u are user_start[u]:user_start[u + 1]
    user_split: np.ndarray  # uint8 [U]: TRAIN, VAL or TEST
    user_train_only: np.ndarray  # bool [U]: users of train-only files (``load_dataset``), TRAIN whatever their hash
    purchase: np.ndarray  # float32 [N]: 1/0, NaN when censored
    churn: np.ndarray  # float32 [N]: 1/0, NaN when censored
    order_value: np.ndarray  # float32 [N]: value of the next purchase within the horizon, NaN when none
    t_start: int
    t_end: int
    t_split: dict[str, int]  # per head: "purchase", "churn"
    data_hash: str
    sources: list[str]
    train_only_sources: list[str] = field(default_factory=list)  # files whose users only train (``load_dataset``)
    train_only_hash: str = ""  # sha256 of those files (the manifest names them beside data_hash)
    train_only_end: int = 0  # where their labels end: their last event, at most t_end

    def data_end(self) -> np.ndarray:
        """int64 [N]: the end of the data each record's labels and targets may look to (t_end, or train_only_end)."""
        return np.where(self.user_train_only[self.record_user], self.train_only_end, self.t_end).astype(np.int64)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def record_user(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users), np.diff(self.user_start))

    @property
    def record_split(self) -> np.ndarray:
        return np.repeat(self.user_split, np.diff(self.user_start))

    def session_end(self) -> np.ndarray:
        """Positions where a session closes: the user's next event comes at or after the session's deadline
        (``models.features.session_deadline``), or there is none. The engine judges churn there, when the
        partition's watermark passes the deadline."""
        ts = self.records["ts"].astype(np.int64)
        ends = np.ones(len(self), dtype=bool)
        same_user = np.diff(self.record_user) == 0
        ends[:-1] = ~same_user | (ts[1:] >= session_deadline(ts[:-1], self.config.featurizer.session_gap_ms))
        return ends

    def head_mask(self, split: int, head: str) -> np.ndarray:
        """Positions whose ``head`` label counts for ``split`` (known or censored): the split's users; train
        before the head's t_split, val/test at or after it; churn only where a session closes; order value
        where a purchase follows within the horizon."""
        ts = self.records["ts"]
        t_split = self.t_split["churn" if head == "churn" else "purchase"]
        in_time = ts < t_split if split == TRAIN else ts >= t_split
        mask = (self.record_split == split) & in_time
        if split == TRAIN and self.config.train_users == "all":
            # A held-out user's event trains only where nothing it is trained on reaches the earliest judged period
            # (churn's, which starts before purchase's): neither its label nor its next-move target (the next event
            # of the session, within the session gap) nor the event itself, which the shared trunk learns from.
            horizon = self.config.churn_ms if head == "churn" else self.config.horizon_ms
            reach = max(horizon, self.config.featurizer.session_gap_ms)
            mask |= (self.record_split != TRAIN) & (ts.astype(np.int64) + reach < min(self.t_split.values()))
        if head == "churn":
            return mask & self.session_end()
        if head == "order_value":
            return mask & ~np.isnan(self.order_value)
        return mask

    def loss_mask(self, split: int) -> np.ndarray:
        """Positions where any head is scored for ``split``."""
        return self.head_mask(split, "purchase") | self.head_mask(split, "churn")

    def summary(self) -> dict:
        """Split sizes and base rates (they go into the manifest and the report)."""
        out: dict = {
            "events": len(self),
            "users": self.n_users,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "t_split": dict(self.t_split),
            "days": round((self.t_end - self.t_start) / DAY_MS, 3),
            "train_users": self.config.train_users,
        }
        trained_on = np.unique(self.record_user[self.loss_mask(TRAIN)])
        if self.user_train_only.any():
            out["train_only"] = {
                "users": int(self.user_train_only.sum()),
                "users_trained_on": int(self.user_train_only[trained_on].sum()),
                "sources": list(self.train_only_sources),
            }
        for s, name in enumerate(SPLIT_NAMES):
            p = self.purchase[self.head_mask(s, "purchase")]
            c = self.churn[self.head_mask(s, "churn")]
            out[name] = {
                "users": int((self.user_split == s).sum()),
                "events_scored": int(self.loss_mask(s).sum()),
                "purchase_labelled": int((~np.isnan(p)).sum()),
                "purchase_positives": int(np.nansum(p)),
                "purchase_base_rate": _rate(p),
                "churn_labelled": int((~np.isnan(c)).sum()),
                "churn_positives": int(np.nansum(c)),
                "churn_base_rate": _rate(c),
            }
        # Whose events train: the train users, or (train_users "all") every user with a position before t_split.
        out["train"]["users_trained_on"] = int(trained_on.size)
        return out


def _rate(y: np.ndarray) -> float:
    n = int((~np.isnan(y)).sum())
    return float(np.nansum(y) / n) if n else math.nan


# ---- reading ---------------------------------------------------------------------------------------


def _is_csv(path: Path) -> bool:
    return path.name.endswith((".csv", ".csv.gz"))


FORMATS = ("auto", "jsonl", "rees46", "taobao")


def read_events(paths: Sequence[Path | str], fmt: str = "auto") -> list[Event]:
    """Events of all files, in file order: REES46 or Taobao CSV (stream/traffic/rees46.py, taobao.py) or contract
    JSON lines (the simulator's reader, which stops at the first invalid line with its number and reason).
    ``fmt``: one of FORMATS; ``auto`` tells them apart by the file name (.csv) and the CSV's first line."""
    if fmt not in FORMATS:
        raise ValueError(f"data format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    events: list[Event] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such data file")
        if fmt in ("rees46", "taobao") or (fmt == "auto" and _is_csv(p)):
            from stream.traffic import rees46, taobao

            is_taobao = fmt == "taobao" or (fmt == "auto" and taobao.looks_like_taobao(p))
            events.extend(taobao.read_events(p) if is_taobao else rees46.read_events(p))
        else:
            from stream.traffic.simulator import read_events as simulator_read_events

            events.extend(simulator_read_events(p))
    return events


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="the data files' format: contract JSON lines (the simulator's), a REES46 or a Taobao user-behaviour CSV "
        "(default auto: .csv files by their header line, anything else JSON lines)",
    )


def files_hash(paths: Iterable[Path | str]) -> str:
    """sha256 over the bytes of the input files, in order: what the manifest names as the training data."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---- split -----------------------------------------------------------------------------------------


def user_split(user_ids: Sequence[str], config: DataConfig) -> np.ndarray:
    """TRAIN/VAL/TEST per user from a salted 64-bit hash: stable across runs, machines and file orders."""
    salt = f"{config.split_seed}:".encode()
    h = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + u.encode(), digest_size=8).digest(), "little") for u in user_ids),
        np.float64,
        len(user_ids),
    )
    frac = h / 2.0**64
    return np.where(
        frac < config.train_frac, TRAIN, np.where(frac < config.train_frac + config.val_frac, VAL, TEST)
    ).astype(np.uint8)


def split_time(t_start: int, t_end: int, horizon_ms: int, fraction: float) -> int:
    """t_split of a head: ``fraction`` of the way through the period whose labels can be known (the data minus
    the head's horizon), so that val/test hold labels of that head after it. With a 30-day trace: purchase
    (1 h) splits at day 20, churn (14 days) at day 10.7 (val/test churn then lies in days 10.7-16). A head
    whose horizon exceeds the data (churn on a 2.5-hour trace) gets t_end: it has no labels anyway."""
    labellable = t_end - horizon_ms - t_start
    return int(t_start + fraction * labellable) if labellable > 0 else t_end


# ---- labels ----------------------------------------------------------------------------------------


def make_labels(
    records: np.ndarray, user_start: np.ndarray, config: DataConfig, end_ms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(purchase, churn, order_value) per record from the events alone (training/labels.py).

    On top of what the labels function censors, a label is kept only where its whole horizon lies inside the
    data (ts + horizon <= end): near the end a known positive (purchase seen) or known negative (user
    returned) would otherwise survive while its opposite is censored, biasing the base rates there.
    """
    from training.labels import compute_labels

    n = len(records)
    user_index = np.repeat(np.arange(len(user_start) - 1), np.diff(user_start))
    ts = records["ts"].astype(np.int64)
    is_purchase = records["type"] == PURCHASE
    quantity = np.where(records["quantity"] > 0, records["quantity"], 1).astype(np.float64)
    value = np.where(is_purchase, records["price"].astype(np.float64) * quantity, np.nan)
    labels = compute_labels(user_index, ts, is_purchase, value, config.horizon_ms, config.churn_ms, end_ms)
    purchase, churn, order_value = _unpack_labels(labels, n)
    purchase = np.where(ts + config.horizon_ms <= end_ms, purchase, np.nan).astype(np.float32)
    churn = np.where(ts + config.churn_ms <= end_ms, churn, np.nan).astype(np.float32)
    order_value = np.where(purchase == 1, order_value, np.nan).astype(np.float32)
    return purchase, churn, order_value


def _unpack_labels(labels, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accept the labels function's result as a mapping, a dataclass-like object or a tuple."""
    names = ("purchase", "churn", "order_value")
    if isinstance(labels, dict):
        got = [labels.get(k, labels.get(f"label_{k}")) for k in names]
    elif isinstance(labels, tuple):
        got = list(labels[:3])
    else:
        got = [getattr(labels, k, getattr(labels, f"label_{k}", None)) for k in names]
    if any(g is None for g in got):
        raise TypeError(f"training.labels.compute_labels returned {type(labels).__name__}, expected {names}")
    out = tuple(np.asarray(g, dtype=np.float64).reshape(n) for g in got)
    return out  # type: ignore[return-value]


# ---- the dataset -----------------------------------------------------------------------------------


def build_dataset(
    events: Sequence[Event],
    config: DataConfig,
    data_hash: str = "",
    sources: Sequence[str] = (),
    train_only_users: Container[str] = frozenset(),
    train_only_sources: Sequence[str] = (),
    train_only_hash: str = "",
) -> Dataset:
    """The dataset of ``events``. ``train_only_users`` (ids among them) are TRAIN whatever their hash, and the period
    (t_start, t_end: the labels' end and t_split) is the other users' alone."""
    if not events:
        raise ValueError("no events to train or evaluate on")
    records, order = encode_events(events, config.featurizer)
    event_ids = np.array([events[i].event_id for i in order], dtype=object)
    user_ids = list(dict.fromkeys(events[i].user_id for i in order))
    first = np.ones(len(records), dtype=bool)
    uidx = np.fromiter((events[i].user_id for i in order), object, len(order))
    first[1:] = uidx[1:] != uidx[:-1]
    user_start = np.append(np.flatnonzero(first), len(records)).astype(np.int64)
    extra = np.fromiter((u in train_only_users for u in user_ids), bool, len(user_ids))
    own_ts = records["ts"][~np.repeat(extra, np.diff(user_start))]
    if not len(own_ts):
        raise ValueError("only train-only events: the main data files hold no event to split and judge")
    t_start, t_end = int(own_ts.min()), int(own_ts.max())
    # Each file set's labels end where its events do: train-only users after the main ones (load_dataset's order).
    n_main = int((~extra).sum())
    if extra[:n_main].any():
        raise ValueError("the train-only users must come after the main users (load_dataset's order)")
    k = int(user_start[n_main])
    purchase, churn, order_value = make_labels(records[:k], user_start[: n_main + 1], config, t_end)
    train_only_end = t_end
    if k < len(records):
        train_only_end = min(int(records["ts"][k:].max()), t_end)
        labels = make_labels(records[k:], user_start[n_main:] - k, config, train_only_end)
        purchase, churn, order_value = (
            np.concatenate(pair) for pair in zip((purchase, churn, order_value), labels, strict=True)
        )
    if not data_hash:
        data_hash = hashlib.sha256(records.tobytes()).hexdigest()
    split = user_split(user_ids, config)
    split[extra] = TRAIN
    return Dataset(
        config=config,
        records=records,
        event_ids=event_ids,
        source_index=order.astype(np.int64),
        user_ids=user_ids,
        user_start=user_start,
        user_split=split,
        user_train_only=extra,
        purchase=purchase,
        churn=churn,
        order_value=order_value,
        t_start=t_start,
        t_end=t_end,
        t_split={
            "purchase": split_time(t_start, t_end, config.horizon_ms, config.time_split),
            "churn": split_time(t_start, t_end, config.churn_ms, config.time_split),
        },
        data_hash=data_hash,
        sources=list(sources),
        train_only_sources=list(train_only_sources),
        train_only_hash=train_only_hash,
        train_only_end=train_only_end,
    )


TRAIN_ONLY_PREFIX = "train-only:"


def as_train_only(events: Iterable[Event]) -> list[Event]:
    """Events of train-only users with every id namespaced: a user of another simulation or period is never taken
    for a main user of the same id (the simulator's ids repeat across seeds), nor its events for duplicates."""
    return [
        replace(
            e,
            event_id=TRAIN_ONLY_PREFIX + e.event_id,
            user_id=TRAIN_ONLY_PREFIX + e.user_id,
            session_id=e.session_id and TRAIN_ONLY_PREFIX + e.session_id,
        )
        for e in events
    ]


def load_dataset(
    paths: Sequence[Path | str], config: DataConfig, fmt: str = "auto", train_only_paths: Sequence[Path | str] = ()
) -> Dataset:
    """The dataset of ``paths``; the users of ``train_only_paths`` only train (``build_dataset``). Those files form one
    set of users, as the main files do. The data hash is the main files' (evaluate compares it with the model's); the
    train-only files have their own."""
    events = read_events(paths, fmt)
    extra = as_train_only(read_events(train_only_paths, fmt)) if train_only_paths else []
    return build_dataset(
        events + extra,
        config,
        data_hash=files_hash(paths),
        sources=[str(p) for p in paths],
        train_only_users={e.user_id for e in extra},
        train_only_sources=[str(p) for p in train_only_paths],
        train_only_hash=files_hash(train_only_paths) if train_only_paths else "",
    )


# ---- training chunks -------------------------------------------------------------------------------


def make_chunks(ds: Dataset, split: int, chunk_len: int, burn_in: int) -> np.ndarray:
    """Training examples of ``split``: int64 [K, 3] rows (input_start, loss_start, end) of record indices.

    Each user's scored positions are cut into chunks of at most ``chunk_len`` loss positions; each chunk is
    preceded by up to ``burn_in`` earlier events of the same user as context (no loss), so every position sees
    >= ``burn_in`` events of history where the user has them (the CNN's 63-event receptive field fits in 64;
    the GRU warms its state up). Chunks without a single labelled position are dropped.
    """
    mask = ds.loss_mask(split)
    labelled = (ds.head_mask(split, "purchase") & ~np.isnan(ds.purchase)) | (
        ds.head_mask(split, "churn") & ~np.isnan(ds.churn)
    )
    # Cumulative count of labelled positions: a chunk has labels iff the count grows across it.
    labelled_before = np.concatenate([[0], np.cumsum(labelled)])
    rows = []
    # The users with a scored position: the mask already says whose events count (``DataConfig.train_users``).
    for u in np.unique(ds.record_user[mask]).tolist():
        s, e = int(ds.user_start[u]), int(ds.user_start[u + 1])
        pos = np.flatnonzero(mask[s:e])
        a, b = s + int(pos[0]), s + int(pos[-1]) + 1  # contiguous: the users' records are time-ordered
        for lo in range(a, b, chunk_len):
            hi = min(lo + chunk_len, b)
            if labelled_before[hi] > labelled_before[lo]:
                rows.append((max(s, lo - burn_in), lo, hi))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def batch_order(chunks: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of chunk indices of similar length (little padding), in a random order for the epoch."""
    lengths = chunks[:, 2] - chunks[:, 0]
    jitter = rng.random(len(chunks))  # shuffles chunks of equal length between epochs
    by_length = np.lexsort((jitter, lengths))
    batches = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
