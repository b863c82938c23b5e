"""Inference runtimes of a loaded artifact: PyTorch (CPU or CUDA) and ONNX Runtime (fp32 or dynamic int8).

Every runtime computes one function, ``ScoringGraph``: from a batch's model inputs, the hidden state before it and
each row's last real output position, the calibrated probabilities at every output position and the hidden state at
each row's last position. The engine keeps only that hidden state (rows are right-padded, so it sits at a different
position in each row), so it is gathered where the model ran and only it is copied back: a GRU step's states at
every position would be ``gru_hidden`` floats per position instead of per row. A plain GRU on PyTorch without
staging (the CPU) takes the rows end to end instead, unpadded (``TorchRunner.run_rows``).

ONNX graphs live in the artifact folder (models/export.py writes them): one per context length the engine passes
(``context_lengths``), because the model slices its input with a Python int that the exporter bakes in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from models.model import IntentModel, ModelConfig, probabilities

log = logging.getLogger("intentstream.worker")
RUNTIMES = ("torch", "onnx", "onnx-int8")
INPUTS = ("type", "category", "numeric")
STATE_INPUTS = ("h0", "last")


def context_lengths(config: ModelConfig) -> tuple[int, ...]:
    """The ``context_len`` values stream/scoring.py passes: a hybrid steps with CNN context or rebuilds from 0."""
    return (0, config.context_len) if config.arch == "hybrid" else (0,)


class ScoringGraph(nn.Module):
    """The model, its calibration and the gather of each row's last hidden state: what every runtime runs."""

    def __init__(self, model: IntentModel, calibration: dict[str, list[float]], context_len: int):
        super().__init__()
        self.model = model
        self.calibration = calibration
        self.context_len = context_len

    def forward_rows(
        self,
        type_idx: torch.Tensor,
        category_idx: torch.Tensor,
        numeric: torch.Tensor,
        lengths: np.ndarray,
        h0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same function over rows laid end to end instead of right-padded (a plain GRU's, context 0:
        ``IntentModel.forward_rows``): calibrated probabilities at every position [N, 3] and each row's hidden state
        after its last position [B, H]."""
        out, last = self.model.forward_rows(type_idx, category_idx, numeric, lengths, h0)
        return probabilities(out, self.calibration), last

    def forward(
        self,
        type_idx: torch.Tensor,
        category_idx: torch.Tensor,
        numeric: torch.Tensor,
        h0: torch.Tensor | None = None,  # [B, H]
        last: torch.Tensor | None = None,  # [B] int64: each row's last real output position
        lengths: torch.Tensor | None = None,  # [B] int64 on the CPU: last + 1, to step a GRU over real positions only
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # ``lengths`` is PyTorch's alone (not exported: ONNX Runtime's GRU operator runs the padded rows)
        out, states = self.model(type_idx, category_idx, numeric, h0=h0, context_len=self.context_len, lengths=lengths)
        probs = probabilities(out, self.calibration)
        if states is None or last is None:
            return probs, None
        # repeat and [:, 0] rather than expand and squeeze: exported without the shape arithmetic and the If node
        # that -1 and squeeze become, a few µs per batch in ONNX Runtime
        idx = last.view(-1, 1, 1).repeat(1, 1, states.shape[-1])
        return probs, torch.gather(states, 1, idx)[:, 0]


class Runner(Protocol):
    runtime: str

    def run(
        self, x: dict[str, np.ndarray], h0: np.ndarray | None, last: np.ndarray, ctx: int, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities [B, T - ctx, 3], hidden state at ``last`` [B, H] or None); arrays the caller may keep."""
        ...


def bucket(n: int) -> int:
    """The next power of two: a few distinct shapes, so that CUDA graphs or compiled kernels can be reused."""
    return 1 << max(0, n - 1).bit_length()


class HostStaging:
    """Host buffers reused across batches, pinned when the device is CUDA so that copies to and from it can be
    non-blocking. A buffer grows to the bucket of the largest shape seen and is never shrunk."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of ``shape`` into the named buffer, reallocated only when it does not fit."""
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or any(s > c for s, c in zip(shape, buf.shape, strict=True)):
            cap = tuple(bucket(max(s, c)) for s, c in zip(shape, buf.shape if buf is not None else shape, strict=True))
            buf = self.buffers[name] = torch.zeros(cap, dtype=dtype, pin_memory=self.pin)
        return buf[tuple(slice(0, s) for s in shape)]

    def put(self, name: str, array: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """``array`` in the leading corner of a zeroed ``shape`` view (the padding of a bucketed batch)."""
        view = self.buffer(name, shape, torch.from_numpy(array[:0]).dtype)
        view.zero_()
        view[tuple(slice(0, s) for s in array.shape)].numpy()[...] = array
        return view


class TorchRunner:
    """PyTorch on the device the model's weights are on. On CUDA (``staging``): inputs staged in pinned reused
    buffers and copied without blocking, results gathered on the device and copied back into pinned buffers, one
    synchronisation per batch; batch shapes bucketed to powers of two (``buckets``). On the CPU neither helps: the
    inputs are used in place (``torch.from_numpy``), so both default to off there."""

    runtime = "torch"

    def __init__(
        self,
        model: IntentModel,
        calibration: dict[str, list[float]],
        staging: bool | None = None,
        buckets: bool | None = None,
    ):
        cuda = next(model.parameters()).device.type == "cuda"
        self.graphs = {c: ScoringGraph(model, calibration, c).eval() for c in context_lengths(model.config)}
        self.stateful = model.config.has_state
        self.hidden_size = model.config.gru_hidden
        self.staging = HostStaging(pin=cuda) if (cuda if staging is None else staging) else None
        self.buckets = cuda if buckets is None else buckets
        # Rows end to end, no padding (``run_rows``): a plain GRU used in place; CUDA keeps its staged, bucketed
        # shapes (not measured there: no GPU was available to this change).
        self.rows = self.staging is None and model.config.arch == "gru" and not model.config.rate_state

    def run(
        self, x: dict[str, np.ndarray], h0: np.ndarray | None, last: np.ndarray, ctx: int, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray | None]:
        graph = self.graphs[ctx]
        b, t = x["type"].shape
        if self.staging is None:
            return self._run_in_place(graph, x, h0, last, device)
        bp, tp = (bucket(b), bucket(t)) if self.buckets else (b, t)
        st = self.staging

        def to_device(name: str, array: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
            return st.put(name, array, shape).to(device, non_blocking=True)

        args = [to_device(k, x[k], (bp, tp, *x[k].shape[2:])) for k in INPUTS]
        lengths = None
        if self.stateful:
            assert h0 is not None
            args += [to_device("h0", h0, (bp, h0.shape[1])), to_device("last", last, (bp,))]
            lengths = torch.ones(bp, dtype=torch.int64)  # the bucket's padding rows: one step each
            lengths[:b] = torch.from_numpy(last + 1)
        with torch.inference_mode():
            probs, hidden = graph(*args, lengths=lengths)
            probs_host = st.buffer("probs", (b, t - ctx, 3), torch.float32)
            probs_host.copy_(probs[:b, : t - ctx], non_blocking=True)
            hidden_host = None
            if hidden is not None:
                hidden_host = st.buffer("hidden", (b, self.hidden_size), torch.float32)
                hidden_host.copy_(hidden[:b], non_blocking=True)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        # Copies: the buffers are overwritten by the next batch while the engine may still hold these results.
        return probs_host.numpy().copy(), None if hidden_host is None else hidden_host.numpy().copy()

    def run_rows(
        self, x: dict[str, torch.Tensor], h0: np.ndarray, lengths: np.ndarray, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, 3] at every position of the rows laid end to end, hidden state after each row's last
        position [B, H]); only where ``rows`` holds."""
        type_idx, category_idx, numeric = (x[k].to(device) for k in INPUTS)
        with torch.inference_mode():
            probs, hidden = self.graphs[0].forward_rows(
                type_idx, category_idx, numeric, lengths, torch.from_numpy(h0).to(device)
            )
            return probs.float().cpu().numpy(), hidden.float().cpu().numpy()

    def _run_in_place(
        self, graph: ScoringGraph, x: dict[str, np.ndarray], h0: np.ndarray | None, last: np.ndarray, device: Any
    ) -> tuple[np.ndarray, np.ndarray | None]:
        args = [torch.from_numpy(x[k]).to(device) for k in INPUTS]
        lengths = None
        if self.stateful:
            assert h0 is not None
            args += [torch.from_numpy(h0).to(device), torch.from_numpy(last).to(device)]
            lengths = torch.from_numpy(last + 1)
        with torch.inference_mode():
            probs, hidden = graph(*args, lengths=lengths)
            return probs.float().cpu().numpy(), None if hidden is None else hidden.float().cpu().numpy()


class OnnxRunner:
    """ONNX Runtime: one session per context length; CUDA's execution provider when the device is CUDA and the
    installed onnxruntime has it, the CPU's otherwise."""

    def __init__(self, runtime: str, graphs: dict[int, Path], stateful: bool, threads: int, device: torch.device):
        import onnxruntime as ort

        self.runtime = runtime
        self.stateful = stateful
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:  # the device setting asks for the GPU: say why the model runs on the CPU instead
                log.warning(
                    "event=runtime_on_cpu runtime=%s: the installed onnxruntime has no CUDA execution provider "
                    "(install onnxruntime-gpu); scoring on the CPU",
                    runtime,
                )
        self.providers = providers
        self.sessions = {c: ort.InferenceSession(str(p), opts, providers=providers) for c, p in graphs.items()}
        self.outputs = ["probs", "hidden"] if stateful else ["probs"]

    def run(
        self, x: dict[str, np.ndarray], h0: np.ndarray | None, last: np.ndarray, ctx: int, device: torch.device
    ) -> tuple[np.ndarray, np.ndarray | None]:
        feed = {k: x[k] for k in INPUTS}
        if self.stateful:
            assert h0 is not None
            feed["h0"], feed["last"] = h0, last
        out = self.sessions[ctx].run(self.outputs, feed)
        return out[0], out[1] if self.stateful else None
