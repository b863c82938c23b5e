"""Versioned model artifacts: ``<model_dir>/v<NNNN>-<arch>/{weights.safetensors, manifest.json}``.

Weights are safetensors (loading them executes no code); the manifest carries the sha256 of the weights,
the model and featurizer configs, calibration, band thresholds, the training data hash and metrics.
Publishing writes a hidden temporary folder and renames it, so a reader never sees half an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.features import FEATURIZER_VERSION, FeaturizerConfig
from models.model import ARCHS, IntentModel, ModelConfig
from models.runtime import RUNTIMES, OnnxRunner, Runner, TorchRunner, context_lengths

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1
_DIR_RE = re.compile(r"^v(\d{4,})-(" + "|".join(ARCHS) + r")$")


class ArtifactError(ValueError):
    """An artifact that must not be served; the message says why in one line."""


class MissingExportError(ArtifactError):
    """The artifact is fine but lacks the export the runtime needs; running `intentstream export` fixes it."""


@dataclass
class LoadedModel:
    model: IntentModel
    manifest: dict[str, Any]
    path: Path
    runner: Runner | None = None  # None: PyTorch on the model's device
    featurizer: FeaturizerConfig = field(init=False)

    def __post_init__(self) -> None:
        self.featurizer = FeaturizerConfig.from_dict(self.manifest["featurizer"])
        if self.runner is None:
            self.runner = TorchRunner(self.model, self.calibration)

    @property
    def runtime(self) -> str:
        assert self.runner is not None
        return self.runner.runtime

    def infer(
        self, x: dict[str, torch.Tensor], h0: np.ndarray | None, last: np.ndarray, ctx: int, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Calibrated probabilities [B, T - ctx, 3] and the hidden state at each row's ``last`` output position
        (None for the CNN), from ``model_inputs`` of right-padded rows; see models/runtime.py."""
        assert self.runner is not None
        arrays = {k: v.numpy() for k, v in x.items()}
        return self.runner.run(arrays, h0, last, ctx, device)

    @property
    def scores_rows(self) -> bool:
        """Whether the runtime scores rows laid end to end, without padding (``infer_rows``)."""
        return isinstance(self.runner, TorchRunner) and self.runner.rows

    def infer_rows(
        self, x: dict[str, torch.Tensor], h0: np.ndarray, lengths: np.ndarray, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities [N, 3] at every position of ``model_inputs`` of rows laid end to end (row 0's
        ``lengths[0]`` positions, then row 1's, ...) and each row's hidden state after its last; see ``scores_rows``."""
        assert isinstance(self.runner, TorchRunner) and self.runner.rows
        return self.runner.run_rows(x, h0, lengths, device)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return f"v{int(self.manifest['version']):04d}"

    @property
    def state_tag(self) -> str:
        """What the hidden states this model leaves in the users' state are tied to: the first 16 hex digits of its
        weights' sha256. A version string is not enough: two model folders can both hold a v0003."""
        return str(self.manifest["sha256"])[:16]

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def calibration(self) -> dict[str, list[float]]:
        return self.manifest.get("calibration", {})

    @property
    def thresholds(self) -> dict[str, dict[str, float]]:
        return self.manifest["thresholds"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_versions(model_dir: Path, pattern: re.Pattern[str] = _DIR_RE) -> list[tuple[int, Path]]:
    """Artifact folders (names matching ``pattern``, the version its first group), newest first."""
    if not model_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in model_dir.iterdir() if (m := pattern.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def save_artifact(
    model: IntentModel,
    model_dir: Path,
    *,
    featurizer: FeaturizerConfig,
    calibration: dict[str, list[float]],
    thresholds: dict[str, dict[str, float]],
    horizon_s: float,
    churn_days: float,
    data_hash: str,
    metrics: dict[str, Any],
    name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a new version (the next number in ``model_dir``) atomically and return its folder."""
    arch = model.config.arch

    def write(tmp: Path) -> dict[str, Any]:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        return {
            "format": FORMAT_VERSION,
            "name": name or f"intent-{arch}",
            "arch": arch,
            "model": model.config.to_dict(),
            "featurizer": featurizer.to_dict(),
            "weights": WEIGHTS,
            "sha256": sha256_file(tmp / WEIGHTS),
            "calibration": calibration,
            "thresholds": thresholds,
            "horizon_s": horizon_s,
            "churn_days": churn_days,
            "data_hash": data_hash,
            "metrics": metrics,
            **(extra or {}),
        }

    return publish(model_dir, arch, write)[0]


def publish(
    model_dir: Path, suffix: str, write: Callable[[Path], dict[str, Any]], pattern: re.Pattern[str] = _DIR_RE
) -> tuple[Path, dict[str, Any]]:
    """Publish a new version ``v<NNNN>-<suffix>`` in ``model_dir`` atomically: ``write`` fills a hidden folder and
    returns the manifest, which gets the version number and time; the folder is then renamed into place, so a
    reader never sees half an artifact. Returns the folder and its manifest."""
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        manifest = write(tmp)
        for attempt in range(100):  # another trainer may publish at the same moment: take the next number
            existing = list_versions(model_dir, pattern)
            version = (existing[0][0] if existing else 0) + 1 + attempt
            manifest |= {"version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            final = model_dir / f"v{version:04d}-{suffix}"
            try:
                os.rename(tmp, final)  # atomic; fails if the name was taken meanwhile
                return final, manifest
            except OSError:
                continue
        raise ArtifactError(f"could not find a free version number in {model_dir}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """An artifact folder's manifest, with the keys it must have; ArtifactError (one line) otherwise."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path.name}: no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path.name}: {MANIFEST} is not valid JSON ({exc})") from None
    for key in required:
        if key not in manifest:
            raise ArtifactError(f"{path.name}: manifest lacks {key!r}")
    return manifest


def verify_sha256(path: Path, file: Path, expected: str, what: str) -> None:
    """Refuse a missing ``file`` of artifact ``path``, or one whose sha256 is not the manifest's."""
    if not file.is_file():
        raise ArtifactError(f"{path.name}: {what} file {file.name} is missing")
    actual = sha256_file(file)
    if actual != expected:
        raise ArtifactError(f"{path.name}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…)")


def load_artifact(
    path: Path,
    device: str | torch.device = "cpu",
    expect_window: int | None = None,
    runtime: str = "torch",
    threads: int = 1,
    expect_session_gap_s: float | None = None,
) -> LoadedModel:
    """Load one artifact after checking its manifest and sha256 (and those of the runtime's graphs); raise
    ArtifactError otherwise. ``threads``: ONNX Runtime's intra-op threads (torch's are set process-wide)."""
    manifest = read_manifest(path, ("format", "name", "version", "model", "featurizer", "sha256", "thresholds"))
    if manifest["format"] != FORMAT_VERSION:
        raise ArtifactError(f"{path.name}: artifact format {manifest['format']} is not {FORMAT_VERSION}")
    feat = manifest["featurizer"]
    if feat.get("version") != FEATURIZER_VERSION:
        raise ArtifactError(
            f"{path.name}: featurizer version {feat.get('version')} differs from the engine's {FEATURIZER_VERSION}"
        )
    if expect_window is not None and feat.get("window") != expect_window:
        raise ArtifactError(f"{path.name}: featurizer window {feat.get('window')} differs from {expect_window}")
    trained_gap = feat.get("session_gap_s")
    if expect_session_gap_s is not None and trained_gap != expect_session_gap_s:
        raise ArtifactError(
            f"{path.name}: trained with a session gap of {trained_gap} s, but sessions close here after "
            f"{expect_session_gap_s:g} s (INTENTSTREAM_SESSION_GAP_S): churn would be judged where the model never "
            f"learned it; retrain with `intentstream train --session-gap-s {expect_session_gap_s:g}` or set "
            f"INTENTSTREAM_SESSION_GAP_S={trained_gap}"
        )
    weights = path / manifest.get("weights", WEIGHTS)
    verify_sha256(path, weights, manifest["sha256"], "weights")
    try:
        config = ModelConfig.from_dict(manifest["model"])
        model = IntentModel(config)
        model.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as exc:  # wrong shapes, unknown keys, bad config
        raise ArtifactError(f"{path.name}: weights do not fit the model config ({type(exc).__name__})") from None
    model.to(device).eval()
    runner = (
        None if runtime == "torch" else _onnx_runner(path, manifest, config, runtime, threads, torch.device(device))
    )
    return LoadedModel(model=model, manifest=manifest, path=path, runner=runner)


def _onnx_runner(
    path: Path, manifest: dict[str, Any], config: ModelConfig, runtime: str, threads: int, device: torch.device
) -> OnnxRunner:
    """Sessions over the artifact's exported graphs, each checked against the sha256 in the manifest.

    A missing export is an error naming the command that writes it, not an export done here: the worker would
    otherwise need the exporter (torch.onnx, the quantiser) and write into a folder the trainer published, and
    what it serves would depend on the exporter version of whichever worker loaded the artifact first."""
    if runtime not in RUNTIMES:
        raise ArtifactError(f"{path.name}: unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    graphs = manifest.get("exports", {}).get(runtime, {}).get("graphs", {})
    if not all(str(c) in graphs for c in context_lengths(config)):
        flag = " --int8" if runtime == "onnx-int8" else ""
        raise MissingExportError(
            f"{path.name}: no {runtime} export; run `intentstream export --model {path} --format onnx{flag}`"
        )
    files = {}
    for ctx in context_lengths(config):
        g = graphs[str(ctx)]
        file = path / g["file"]
        if not file.is_file():
            raise ArtifactError(f"{path.name}: {runtime} graph {file.name} is missing")
        if sha256_file(file) != g["sha256"]:
            raise ArtifactError(f"{path.name}: sha256 mismatch of {runtime} graph {file.name}")
        files[ctx] = file
    try:
        return OnnxRunner(runtime, files, config.has_state, threads, device)
    except ImportError:
        raise ArtifactError(f"runtime {runtime} needs onnxruntime: pip install -e '.[onnx]'") from None
    except Exception as exc:  # a graph ONNX Runtime cannot load (e.g. an opset newer than it knows)
        raise ArtifactError(f"{path.name}: ONNX Runtime cannot load the {runtime} graphs ({exc})") from None


def load_newest(
    model_dir: Path,
    device: str | torch.device = "cpu",
    expect_window: int | None = None,
    runtime: str = "torch",
    threads: int = 1,
    expect_session_gap_s: float | None = None,
) -> tuple[LoadedModel | None, list[str]]:
    """The newest artifact that loads, and one line per newer artifact that was refused."""
    refused: list[str] = []
    for _, path in list_versions(model_dir):
        try:
            return load_artifact(path, device, expect_window, runtime, threads, expect_session_gap_s), refused
        except ArtifactError as exc:
            refused.append(str(exc))
    return None, refused


def untrained_model(arch: str = "gru", seed: int = 0) -> IntentModel:
    """A deterministic untrained model with the real interface, for tests of the pipeline only. ``arch`` may name a
    variant: ``gru+rate`` is a GRU with ``ModelConfig.rate_state``."""
    torch.manual_seed(seed)
    base, _, variant = arch.partition("+")
    return IntentModel(ModelConfig(arch=base, rate_state=variant == "rate")).eval()


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"INTENTSTREAM_DEVICE={setting} but no CUDA device is available; use auto or cpu")
    return torch.device(setting)
