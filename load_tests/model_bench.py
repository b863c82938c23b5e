"""Model scoring throughput: window scores/s against batch size, per architecture, on CPU and CUDA when present.

    python -m load_tests model [--out DIR] [--batches 1,16,...] [--device auto|cpu|cuda] [--threads N]

One *window score* is what the engine computes for one new event of one user: purchase and churn
probabilities and expected order value at that event, with the user's history as context. Per architecture
(models/model.py) the engine's own path is measured, stream.scoring.score_batch with one new event per user:

- ``gru``: one GRU step from the hidden state kept in the table (the steady state);
- ``gru-rebuild``: the same model without a valid hidden state (after a model swap or a late event): the
  whole 64-event window is run;
- ``cnn``: the window's last 62 events as context of the new one;
- ``hybrid``: CNN context plus the GRU step.

Three figures per point, to show where the time goes:
- ``score_batch``: the engine's function as it is, from UserBatch objects to numpy results;
- ``stacked``: the same computation when the batch's records and hidden states already sit in one numpy
  array each (what a vectorised score_batch would do; no per-user Python);
- ``device``: the forward pass and the copy of the results back to the host alone (inputs already on the
  device): the ceiling for this model on this device.

On CUDA each figure is timed between ``torch.cuda.synchronize()`` calls, and before timing the CUDA results
are compared with the CPU ones on the same inputs (``cuda_check``): a fast wrong answer is worth nothing.
Writes DIR/model_report.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
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
from models.model import probabilities
from stream.scoring import UserBatch, score_batch

MODES = ("gru", "gru-rebuild", "cnn", "hybrid")
CPU_BATCHES = (1, 16, 64, 256, 1024, 4096)
CUDA_BATCHES = (*CPU_BATCHES, 16_384, 65_536)
WINDOW = 64


def load_model(arch: str, device: torch.device, tmp: Path) -> LoadedModel:
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
    return load_artifact(path, device, WINDOW)


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
        out.append(UserBatch(prior=prior, hidden=hidden[i] if has_state else None, new=[tuple(rec[i, WINDOW].item())]))
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


def bench(device: torch.device, batches: tuple[int, ...], min_seconds: float, tmp: Path) -> list[dict[str, Any]]:
    results = []
    for mode in MODES:
        arch = "gru" if mode.startswith("gru") else mode
        model = load_model(arch, device, tmp / device.type)
        for b in batches:
            rec = windows(b)
            hidden = np.random.default_rng(1).standard_normal((b, 64)).astype(np.float32) * 0.5
            users = user_batches(model, mode, rec, hidden)
            seconds = {
                "score_batch": timed(functools.partial(score_batch, model, users, device), device, min_seconds),
                "stacked": timed(stacked_scorer(model, mode, rec, hidden, device), device, min_seconds),
                "device": timed(device_scorer(model, mode, rec, hidden, device), device, min_seconds),
            }
            row = {
                "device": str(device),
                "mode": mode,
                "batch": b,
                **{f"{k}_scores_per_s": round(b / v) for k, v in seconds.items()},
                **{f"{k}_ms": round(v * 1000, 3) for k, v in seconds.items()},
            }
            results.append(row)
            print(
                f"{device.type:4s} {mode:12s} batch {b:>6}: score_batch {row['score_batch_scores_per_s']:>11,}/s  "
                f"stacked {row['stacked_scores_per_s']:>11,}/s  device {row['device_scores_per_s']:>11,}/s",
                flush=True,
            )
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("var/load-tests"), help="folder of model_report.json")
    parser.add_argument("--batches", help="batch sizes, comma separated (default: 1..4096, and 16384, 65536 on CUDA)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, and CUDA too")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default INTENTSTREAM_TORCH_THREADS, 1)")
    parser.add_argument("--seconds", type=float, default=0.5, help="timing per point, seconds (default 0.5)")


def main(args: argparse.Namespace) -> int:
    from stream.settings import Settings

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
            "load_avg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": threads,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "what": "window scores/s: one new event of one user scored with its history as context",
        "results": [],
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
            report["results"] += bench(device, batches, args.seconds, tmp)
    report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    best: dict[str, Any] = {}
    for r in report["results"]:
        key = f"{r['device'].split(':')[0]}/{r['mode']}"
        if r["score_batch_scores_per_s"] > best.get(key, {}).get("score_batch_scores_per_s", 0):
            best[key] = {
                k: r[k] for k in ("batch", "score_batch_scores_per_s", "stacked_scores_per_s", "device_scores_per_s")
            }
    report["best"] = best
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "model_report.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"load_tests model: wrote {path}")
    return 0
