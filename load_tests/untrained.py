"""The model the benchmarks serve: an untrained artifact. Untrained weights cost exactly what trained ones cost, so
throughput figures are the same, and no benchmark waits for a training run."""

from __future__ import annotations

from pathlib import Path

from models.artifact import LoadedModel, load_newest, save_artifact, untrained_model
from models.features import FeaturizerConfig

THRESHOLDS = {"purchase": {"medium": 0.3, "high": 0.6}, "churn": {"alert": 0.5}}


def untrained_artifact(model_dir: Path, data_hash: str, arch: str = "gru", window: int = 64) -> LoadedModel:
    """Publish an untrained ``arch`` model in ``model_dir`` (seed 0) and load it as the worker would."""
    save_artifact(
        untrained_model(arch, seed=0),
        model_dir,
        featurizer=FeaturizerConfig(window=window),
        calibration={},
        thresholds=THRESHOLDS,
        horizon_s=3600,
        churn_days=14,
        data_hash=data_hash,
        metrics={},
        name=f"untrained-{arch}",
    )
    model, _ = load_newest(model_dir, expect_window=window)
    assert model is not None
    return model
