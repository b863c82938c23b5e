"""`intentstream export`: an artifact's model as ONNX graphs for ONNX Runtime, fp32 and dynamic int8.

    intentstream export --model var/models/v0003-gru --format onnx [--int8]

The graphs are written into the artifact folder beside the weights, one per context length the engine passes
(models/runtime.py), each with the incremental-state inputs and outputs of the engine (``h0`` and ``last`` in,
``hidden`` out, for the GRU and the hybrid) and a dynamic batch and time axis. The manifest's ``exports`` records
each file's sha256, the exporter, the opset and, for int8, the quantisation; it is replaced atomically, after the
files are in place, so a worker that reads it sees either the old exports or the new ones complete.

``--model`` may also be a model directory: its newest artifact is exported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from models.artifact import MANIFEST, ArtifactError, LoadedModel, list_versions, load_artifact, sha256_file
from models.features import N_NUMERIC
from models.runtime import INPUTS, STATE_INPUTS, ScoringGraph, context_lengths

OPSET = 17


def graph_file(runtime: str, context_len: int) -> str:
    return f"model.ctx{context_len}.{'int8' if runtime == 'onnx-int8' else 'fp32'}.onnx"


def _write_atomically(path: Path, write: Any) -> Any:
    """``write(tmp)`` then a rename: a reader sees the old file or the new one whole. Returns what ``write`` did."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        result = write(tmp)
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def _export_graph(loaded: LoadedModel, context_len: int, path: Path) -> None:
    cfg = loaded.config
    graph = ScoringGraph(loaded.model, loaded.calibration, context_len).eval()
    b, t = 2, context_len + 3  # example shapes only: both axes are dynamic
    args: tuple[torch.Tensor, ...] = (
        torch.zeros(b, t, dtype=torch.int64),
        torch.zeros(b, t, dtype=torch.int64),
        torch.zeros(b, t, N_NUMERIC),
    )
    names = list(INPUTS)
    axes: dict[str, dict[int, str]] = {k: {0: "batch", 1: "time"} for k in INPUTS}
    outputs, axes["probs"] = ["probs"], {0: "batch", 1: "positions"}
    if cfg.has_state:
        args += (torch.zeros(b, cfg.gru_hidden), torch.zeros(b, dtype=torch.int64))
        names += list(STATE_INPUTS)
        axes |= {"h0": {0: "batch"}, "last": {0: "batch"}, "hidden": {0: "batch"}}
        outputs.append("hidden")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The TorchScript exporter maps nn.GRU to ONNX's GRU operator, which ONNX Runtime runs as one kernel.
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    loaded.model.eval()  # the exporter restores the module's mode; make sure it is eval whatever it was


def _quantize(src: Path, dst: Path) -> dict[str, Any]:
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    op_types = ["MatMul", "Gemm", "Gather"]
    logging.disable(logging.WARNING)  # its advice to pre-process the graph is for static quantisation
    try:
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=op_types,
            weight_type=QuantType.QInt8,
            per_channel=False,
            # 7-bit weights: on x86 without VNNI (AVX2 only) ONNX Runtime's u8 x s8 kernel adds pairs of products in
            # 16 bits, which saturate with full 8-bit weights (measured on an AVX2-only EPYC: churn off by 0.19).
            reduce_range=True,
            # Only weight matrices: the activations are quantised per batch at run time (dynamic quantisation).
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.disable(logging.NOTSET)
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "onnxruntime": onnxruntime.__version__,
        "op_types": op_types,
        "weight_type": "QInt8",
        "per_channel": False,
        "reduce_range": True,
    }


def export_onnx(path: Path, int8: bool = False) -> dict[str, Any]:
    """Export the artifact at ``path`` (fp32, and int8 from the fp32 graphs when asked); returns its ``exports``."""
    loaded = load_artifact(path)
    manifest = json.loads((path / MANIFEST).read_text())
    exports: dict[str, Any] = dict(manifest.get("exports", {}))
    common = {"format": "onnx", "opset": OPSET, "exporter": f"torch.onnx (TorchScript) {torch.__version__}"}
    fp32: dict[str, Any] = {**common, "graphs": {}}
    for ctx in context_lengths(loaded.config):
        name = graph_file("onnx", ctx)
        _write_atomically(path / name, lambda p, c=ctx: _export_graph(loaded, c, p))
        fp32["graphs"][str(ctx)] = {"file": name, "sha256": sha256_file(path / name)}
    exports["onnx"] = fp32
    if int8:
        q: dict[str, Any] = {**common, "graphs": {}}
        for ctx in context_lengths(loaded.config):
            name = graph_file("onnx-int8", ctx)
            src = path / fp32["graphs"][str(ctx)]["file"]
            q["quantisation"] = _write_atomically(path / name, lambda p, s=src: _quantize(s, p))
            q["graphs"][str(ctx)] = {"file": name, "sha256": sha256_file(path / name)}
        exports["onnx-int8"] = q
    manifest["exports"] = exports
    _write_atomically(path / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2, sort_keys=True)))
    return exports


def resolve(model: Path) -> Path:
    """An artifact folder, or the newest artifact of a model directory."""
    if (model / MANIFEST).is_file():
        return model
    versions = list_versions(model)
    if not versions:
        raise ArtifactError(f"{model}: no model artifacts (expected vNNNN-<arch> folders or a {MANIFEST})")
    return versions[0][1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="artifact folder, or a model dir (its newest)")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="export format (onnx)")
    parser.add_argument("--int8", action="store_true", help="also a dynamic int8 quantisation (runtime onnx-int8)")


def run(args: argparse.Namespace, settings: Any) -> int:
    try:
        path = resolve(args.model)
        exports = export_onnx(path, int8=args.int8)
    except ArtifactError as exc:
        print(f"intentstream export: {exc}")
        return 2
    for runtime, info in exports.items():
        for ctx, g in info["graphs"].items():
            print(f"{path / g['file']}  runtime={runtime} context_len={ctx} sha256={g['sha256'][:16]}…")
    return 0
