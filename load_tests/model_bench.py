"""Model scoring throughput: window scores/s against batch size, per architecture and runtime, on CPU and CUDA.

    python -m load_tests model [--out DIR] [--batches 1,16,...] [--device auto|cpu|cuda] [--threads N]
                               [--runtimes torch,onnx,onnx-int8] [--turns 3] [--no-accuracy]

One *window score* is what the engine computes for one new event of one user: purchase and churn
probabilities and expected order value at that event, with the user's history as context. Per architecture
(models/model.py) the engine's own path is measured, stream.scoring.score_batch with one new event per user:

- ``gru``: one GRU step from the hidden state kept in the table (the steady state);
- ``gru-rebuild``: the same model without a valid hidden state (after a model swap or a late event): the
  whole 64-event window is run;
- ``cnn``: the window's last 62 events as context of the new one;
- ``hybrid``: CNN context plus the GRU step.

Runtimes (models/runtime.py) side by side: each point times ``score_batch`` with every runtime in turn, ``--turns``
times, and keeps each runtime's median; ``speedup`` is against torch fp32 in the same run. For torch two more
figures show where the time goes: ``stacked`` (the computation when the batch's records and hidden states already
sit in one numpy array each: no per-user Python) and ``device`` (the forward pass and the copy of the results back
alone, inputs already on the device).

Accuracy of each runtime against torch fp32: ``parity``, the largest differences of score_batch's results on the
benchmark's own batches; ``accuracy``, PR-AUC of small models trained here on a simulated data set (sizes in the
report), scored by each runtime on the test split's positions, and the largest probability difference there.

On CUDA each figure is timed between ``torch.cuda.synchronize()`` calls, and before timing the CUDA results
are compared with the CPU ones on the same inputs (``cuda_check``): a fast wrong answer is worth nothing.
Writes DIR/model_report.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from models.artifact import LoadedModel, load_artifact, save_artifact, untrained_model
from models.features import FLAG_NEW_SESSION, RECORD_DTYPE, FeaturizerConfig, model_inputs
from models.model import ARCHS, probabilities
from models.runtime import RUNTIMES
from stream.scoring import UserBatch, score_batch

MODES = ("gru", "gru-rebuild", "cnn", "hybrid", "transformer")
CPU_BATCHES = (1, 16, 64, 256, 1024, 4096)
CUDA_BATCHES = (*CPU_BATCHES, 16_384, 65_536)
WINDOW = 64


def save_model(arch: str, tmp: Path, export: bool) -> Path:
    """A real artifact (saved and loaded as the engine does), untrained: the cost is the same as trained."""
    path = save_artifact(
        untrained_model(arch, seed=0),
        tmp / arch,
        featurizer=FeaturizerConfig(window=WINDOW),
        calibration={"purchase": [1.1, -0.2], "churn": [0.9, 0.1]},
        thresholds={"purchase": {"medium": 0.3, "high": 0.6}, "churn": {"alert": 0.5}},
        horizon_s=3600,
        churn_days=14,
        data_hash="model-bench",
        metrics={},
    )
    if export:
        from models.export import export_onnx

        export_onnx(path, int8=True)
    return path


def load_model(arch: str, device: torch.device, tmp: Path) -> LoadedModel:
    return load_artifact(save_model(arch, tmp, export=False), device, WINDOW)


def windows(n: int, seed: int = 0) -> np.ndarray:
    """[n, WINDOW + 1] realistic records: each row a user's 64-event window and one new event."""
    rng = np.random.default_rng(seed)
    rec = np.zeros((n, WINDOW + 1), dtype=RECORD_DTYPE)
    gaps = rng.choice([2, 15, 60, 180, 7200], size=(n, WINDOW + 1)).astype(np.int64) * 1000
    rec["ts"] = 1_767_600_000_000 + np.cumsum(gaps, axis=1)
    rec["event_hash"] = rng.integers(1, 2**63, size=(n, WINDOW + 1), dtype=np.uint64)
    rec["gap_s"] = gaps / 1000.0
    rec["price"] = np.where(rng.random((n, WINDOW + 1)) < 0.7, rng.uniform(5, 500, (n, WINDOW + 1)), np.nan)
    rec["item"] = rng.integers(1, 2**32, size=(n, WINDOW + 1), dtype=np.uint32)
    rec["category"] = rng.integers(1, 2**32, size=(n, WINDOW + 1), dtype=np.uint32)
    rec["session"] = rng.integers(1, 2**32, size=(n, WINDOW + 1), dtype=np.uint32)
    rec["count"] = np.arange(100, 100 + WINDOW + 1)
    rec["type"] = rng.integers(0, 8, size=(n, WINDOW + 1))
    rec["flags"] = np.where(gaps > 1_800_000, FLAG_NEW_SESSION, 0)
    return rec


def user_batches(model: LoadedModel, mode: str, rec: np.ndarray, hidden: np.ndarray) -> list[UserBatch]:
    """The engine's view of a batch: each user with its window before this batch and one new record."""
    has_state = model.config.has_state and mode != "gru-rebuild"
    out = []
    for i in range(len(rec)):
        prior = rec[i, :WINDOW]
        out.append(UserBatch(prior=prior, hidden=hidden[i] if has_state else None, new=rec[i, WINDOW : WINDOW + 1]))
    return out


def stacked_scorer(
    model: LoadedModel, mode: str, rec: np.ndarray, hidden: np.ndarray, device: torch.device
) -> Callable:
    """score_batch's computation from one records array and one hidden array: no per-user Python."""
    cfg = model.config
    ctx = cfg.context_len
    if mode == "gru":
        rows, use_h = rec[:, WINDOW:], True
    elif mode == "gru-rebuild":
        rows, use_h = rec, False  # the stored window and the new event, from a zero state (as score_batch)
    else:
        rows, use_h = rec[:, WINDOW - ctx :], mode == "hybrid"

    def run() -> tuple[np.ndarray, np.ndarray | None]:
        x = model_inputs(rows, model.featurizer)
        h0 = torch.from_numpy(hidden).to(device) if use_h else None
        with torch.inference_mode():
            out, states = model.model(
                x["type"].to(device), x["category"].to(device), x["numeric"].to(device), h0=h0, context_len=ctx
            )
            probs = probabilities(out[:, -1:], model.calibration).float().cpu().numpy()
            last = None if states is None else states[:, -1].float().cpu().numpy()
        return probs, last

    return run


def device_scorer(model: LoadedModel, mode: str, rec: np.ndarray, hidden: np.ndarray, device: torch.device) -> Callable:
    """The forward pass and the copy back alone: inputs prepared on the device beforehand."""
    cfg = model.config
    ctx = cfg.context_len
    rows = rec[:, WINDOW:] if mode == "gru" else rec if mode == "gru-rebuild" else rec[:, WINDOW - ctx :]
    x = {k: v.to(device) for k, v in model_inputs(rows, model.featurizer).items()}
    h0 = torch.from_numpy(hidden).to(device) if mode in ("gru", "hybrid") else None

    def run() -> Any:
        with torch.inference_mode():
            out, states = model.model(x["type"], x["category"], x["numeric"], h0=h0, context_len=ctx)
            probs = probabilities(out[:, -1:], model.calibration).float().cpu()
            last = None if states is None else states[:, -1].float().cpu()
        return probs, last

    return run


def timed(fn: Callable[[], Any], device: torch.device, min_seconds: float) -> float:
    """Best seconds per call over repeated runs lasting at least ``min_seconds`` in all (after a warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best, spent = float("inf"), 0.0
    calls = 0
    while spent < min_seconds or calls < 3:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t
        best, spent, calls = min(best, dt), spent + dt, calls + 1
    return best


def cuda_check(models: dict[str, tuple[LoadedModel, LoadedModel]], n: int = 64) -> dict[str, Any]:
    """Score the same users on CPU and CUDA through score_batch; the largest differences."""
    rec = windows(n, seed=3)
    hidden = np.random.default_rng(4).standard_normal((n, 64)).astype(np.float32) * 0.5
    out: dict[str, Any] = {}
    for mode, (cpu_model, cuda_model) in models.items():
        a = score_batch(cpu_model, user_batches(cpu_model, mode, rec, hidden), torch.device("cpu"))
        b = score_batch(cuda_model, user_batches(cuda_model, mode, rec, hidden), torch.device("cuda"))
        dp = max(float(np.abs(x.probs - y.probs).max()) for x, y in zip(a, b, strict=True))
        dh = max(
            (float(np.abs(x.hidden - y.hidden).max()) for x, y in zip(a, b, strict=True) if x.hidden is not None),
            default=0.0,
        )
        # cuDNN convolutions may use TF32: agreement to 1e-2 on probabilities is what matters for bands.
        out[mode] = {"max_abs_diff_probs": dp, "max_abs_diff_hidden": dh, "ok": dp < 1e-2 and dh < 5e-2}
    return out


def _diff(a: list, b: list) -> dict[str, float]:
    """Largest differences between two runtimes' score_batch results: probabilities, expected order value (relative),
    hidden states."""
    probs = max(float(np.abs(x.probs[:, :2] - y.probs[:, :2]).max()) for x, y in zip(a, b, strict=True))
    value = max(float((np.abs(x.probs[:, 2] - y.probs[:, 2]) / y.probs[:, 2]).max()) for x, y in zip(a, b, strict=True))
    hidden = max(
        (float(np.abs(x.hidden - y.hidden).max()) for x, y in zip(a, b, strict=True) if y.hidden is not None),
        default=0.0,
    )
    return {"max_abs_diff_probs": probs, "max_rel_diff_order_value": value, "max_abs_diff_hidden": hidden}


def bench(
    device: torch.device,
    batches: tuple[int, ...],
    min_seconds: float,
    turns: int,
    runtimes: tuple[str, ...],
    threads: int,
    tmp: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of scores/s per runtime, and the parity of each runtime with torch on batches of 64."""
    results, parity = [], {}
    onnx = any(r != "torch" for r in runtimes)
    for mode in MODES:
        arch = "gru" if mode.startswith("gru") else mode
        path = save_model(arch, tmp / device.type / mode, export=onnx)
        models = {rt: load_artifact(path, device, WINDOW, runtime=rt, threads=threads) for rt in ("torch", *runtimes)}
        rec = windows(64, seed=5)
        hidden = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32) * 0.5
        want = score_batch(models["torch"], user_batches(models["torch"], mode, rec, hidden), device)
        parity[mode] = {
            rt: _diff(score_batch(m, user_batches(m, mode, rec, hidden), device), want)
            for rt, m in models.items()
            if rt != "torch"
        }
        for b in batches:
            rec = windows(b)
            hidden = np.random.default_rng(1).standard_normal((b, 64)).astype(np.float32) * 0.5
            users = user_batches(models["torch"], mode, rec, hidden)
            samples: dict[str, list[float]] = {rt: [] for rt in runtimes}
            for _ in range(turns):  # alternating turns: a disturbance on the shared machine hits every runtime
                for rt in runtimes:
                    samples[rt].append(
                        timed(functools.partial(score_batch, models[rt], users, device), device, min_seconds)
                    )
            seconds = {rt: statistics.median(v) for rt, v in samples.items()}
            row: dict[str, Any] = {"device": str(device), "mode": mode, "batch": b}
            row |= {f"{rt}_scores_per_s": round(b / v) for rt, v in seconds.items()}
            row |= {f"{rt}_ms": round(v * 1000, 3) for rt, v in seconds.items()}
            if "torch" in runtimes:
                row["speedup_vs_torch"] = {rt: round(seconds["torch"] / v, 2) for rt, v in seconds.items()}
                row["torch_stacked_scores_per_s"] = round(
                    b / timed(stacked_scorer(models["torch"], mode, rec, hidden, device), device, min_seconds)
                )
                row["torch_device_scores_per_s"] = round(
                    b / timed(device_scorer(models["torch"], mode, rec, hidden, device), device, min_seconds)
                )
            results.append(row)
            cells = "  ".join(f"{rt} {row[f'{rt}_scores_per_s']:>10,}/s" for rt in runtimes)
            speed = " ".join(f"{rt} x{v}" for rt, v in row.get("speedup_vs_torch", {}).items() if rt != "torch")
            print(f"{device.type:4s} {mode:12s} batch {b:>6}: {cells}  {speed}", flush=True)
    return results, parity


def accuracy(runtimes: tuple[str, ...], users: int, days: float, minutes: float, tmp: Path) -> dict[str, Any]:
    """PR-AUC on the simulator's test split of a small model per architecture trained here, scored by each runtime
    (each test user's whole history in one causal pass from a zero state, as ``intentstream evaluate`` does), and
    each runtime's largest probability difference from torch fp32 on those positions."""
    from models.export import export_onnx
    from stream.traffic.simulator import write_simulation
    from training import metrics
    from training.data import TEST, DataConfig, load_dataset
    from training.train import Tensors, predict, train_small

    data = tmp / "accuracy" / "sim.jsonl.gz"
    data.parent.mkdir(parents=True)
    write_simulation(data, users=users, days=days, seed=1)
    ds = load_dataset([data], DataConfig())  # train_small's data config: the same test users
    tensors = Tensors(ds)
    test_users = np.flatnonzero(ds.user_split == TEST)
    masks = {h: ds.head_mask(TEST, h) & ~np.isnan(y) for h, y in (("purchase", ds.purchase), ("churn", ds.churn))}
    out: dict[str, Any] = {
        "data": f"intentstream simulate --users {users} --days {days:g} --seed 1: {len(ds):,} events",
        "training": f"train_small, at most {minutes:g} min per architecture",
        "test_positions": {h: int(m.sum()) for h, m in masks.items()},
        "test_positives": {h: int(np.nansum(y[masks[h]])) for h, y in (("purchase", ds.purchase), ("churn", ds.churn))},
    }
    for arch in ARCHS:
        path = train_small([data], tmp / "accuracy" / arch, arch=arch, max_minutes=minutes)
        export_onnx(path, int8=True)
        probs = {}
        for rt in ("torch", *(r for r in runtimes if r != "torch")):
            loaded = load_artifact(path, runtime=rt)
            probs[rt] = predict(_WholeHistory(loaded), ds, tensors, test_users, torch.device("cpu"))
        row = {}
        for rt, p in probs.items():
            row[rt] = {f"{h}_pr_auc": round(metrics.pr_auc(ds.purchase[m] if h == "purchase" else ds.churn[m], p[m, k]), 4)
                       for k, (h, m) in enumerate(masks.items())}  # fmt: skip
            diff = max(float(np.abs(p[m, k] - probs["torch"][m, k]).max()) for k, m in enumerate(masks.values()))
            row[rt]["max_abs_diff_probs"] = diff
            for h in masks:
                row[rt][f"{h}_pr_auc_delta"] = round(row[rt][f"{h}_pr_auc"] - row["torch"][f"{h}_pr_auc"], 4)
        out[arch] = row
        print(f"accuracy {arch}: {row}", flush=True)
    return out


class _WholeHistory:
    """training.train.predict's model interface over a runtime: calibrated probabilities at every position from a
    zero state (PR-AUC is the same on logits and on their calibrated probabilities)."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def __call__(self, t: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        b = t.shape[0]
        h0 = np.zeros((b, self.loaded.config.gru_hidden), dtype=np.float32) if self.loaded.config.has_state else None
        probs, _ = self.loaded.infer(
            {"type": t, "category": c, "numeric": x}, h0, np.zeros(b, np.int64), 0, torch.device("cpu")
        )
        return torch.from_numpy(probs), None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("var/load-tests"), help="folder of model_report.json")
    parser.add_argument("--batches", help="batch sizes, comma separated (default: 1..4096, and 16384, 65536 on CUDA)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, and CUDA too")
    parser.add_argument("--threads", type=int, help="scoring CPU threads (default INTENTSTREAM_TORCH_THREADS, 1)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing per point and turn, seconds (default 0.5)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma separated, of {', '.join(RUNTIMES)}")
    parser.add_argument("--turns", type=int, default=3, help="alternating turns per point; medians count (default 3)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip training the models of the PR-AUC figures")
    parser.add_argument("--accuracy-users", type=int, default=2000, help="simulated users of the accuracy data (2000)")
    parser.add_argument("--accuracy-days", type=float, default=21, help="simulated days of the accuracy data (21)")
    parser.add_argument("--train-minutes", type=float, default=1.0, help="training budget per architecture (1 min)")


def main(args: argparse.Namespace) -> int:
    from stream.settings import Settings

    runtimes = tuple(r.strip() for r in args.runtimes.split(",") if r.strip())
    if not runtimes or set(runtimes) - set(RUNTIMES):
        raise SystemExit(f"load_tests model: --runtimes takes {', '.join(RUNTIMES)}, got {args.runtimes!r}")
    threads = args.threads or Settings.from_env().torch_threads
    torch.set_num_threads(threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("load_tests model: --device cuda but torch sees no CUDA device")
        devices.append(torch.device("cuda"))
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"),
            "threads": threads,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "what": "window scores/s through stream.scoring.score_batch: one new event of one user scored with its history",
        "runtimes": list(runtimes),
        "turns": args.turns,
        "results": [],
        "parity": {},
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if any(d.type == "cuda" for d in devices):
            pairs = {}
            for mode in MODES:
                arch = "gru" if mode.startswith("gru") else mode
                pairs[mode] = (
                    load_model(arch, torch.device("cpu"), tmp / "check-cpu"),
                    load_model(arch, torch.device("cuda"), tmp / "check-cuda"),
                )
            report["cuda_check"] = cuda_check(pairs)
            print(f"cuda check: {report['cuda_check']}", flush=True)
            if not all(v["ok"] for v in report["cuda_check"].values()):
                print("load_tests model: CUDA results differ from CPU results; see cuda_check", flush=True)
        for device in devices:
            default = CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES
            batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else default
            rows, parity = bench(device, batches, args.seconds, args.turns, runtimes, threads, tmp)
            report["results"] += rows
            report["parity"][device.type] = parity
            print(f"parity with torch ({device.type}): {parity}", flush=True)
        if not args.no_accuracy:
            report["accuracy"] = accuracy(runtimes, args.accuracy_users, args.accuracy_days, args.train_minutes, tmp)
    report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    best: dict[str, Any] = {}
    for r in report["results"]:
        for rt in runtimes:
            key = f"{r['device'].split(':')[0]}/{r['mode']}/{rt}"
            if r[f"{rt}_scores_per_s"] > best.get(key, {}).get("scores_per_s", 0):
                best[key] = {"batch": r["batch"], "scores_per_s": r[f"{rt}_scores_per_s"]}
    report["best"] = best
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "model_report.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"load_tests model: wrote {path}")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
