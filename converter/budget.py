"""Per-tensor type choice under a size budget: `convert --target-size 95MB` / `--bpw 3.5`.

Three steps, each usable on its own:

1. Candidates (`candidate_types`): which types each tensor may get -- ATD with 1..4 planes for the
   attention/FFN matrices, stock or ATD types for token_embd/output, F32 for norms.
2. Error estimates (`estimate_tensor`): for each candidate, an importance-weighted relative error
   measured on a deterministic row sample, one tensor at a time (streaming).
3. Allocation (`plan_for_size`, `plan_for_bpw`): errors times each tensor's sensitivity give the
   estimated loss increase; the candidate per tensor that minimizes its sum within the budget is an
   exact multiple-choice knapsack over Pareto fronts (a convex-hull greedy if a front grows too
   large), with an exact final size check (GGUF padding and header included).

The result is a `Plan` (name -> type, plus a JSON summary for the GGUF metadata).

Error model (why). For y = W x, quantizing W adds e = (W - Ŵ) x; with the llama.cpp imatrix
h_j = E[x_j^2] and the usual diagonal approximation, output channel i gets the noise
E[e_i^2] = sum_j h_j (w_ij - ŵ_ij)^2 against the signal E[y_i^2] = sum_j h_j w_ij^2. The error of a
tensor is the mean over its channels of that noise-to-signal ratio: dimensionless (tensors of any
size and scale compare, the imatrix's scale cancels), and not dominated by the few "massive
activation" channels whose energy swamps a whole-tensor ratio. Measured on SmolLM2-135M (one
tensor quantized at a time, KL divergence to the unquantized model), this per-channel mean ranks
the tensors' real damage better than the whole-tensor ratio or the absolute output MSE (the
whole-tensor ratio called the massive-channel blk.11.ffn_down the most robust tensor of the
model; it is 7x more damaging than its neighbours). KL grows about linearly with it (exponent
1.1 between 1 and 2 planes), so the loss increases add up over tensors, as the knapsack assumes.
The remaining factor between roles and layers is the sensitivity table below.

Measured sensitivities (converter.sensitivity, `--calibration`) replace the table: each output row
i gets a weight w_i (loss per unit noise-to-signal ratio, from an empirical-Fisher pass over the
calibration text), the error becomes the w-weighted mean of the sampled rows' ratios and the
sensitivity the sum of w over all rows, so error x sensitivity estimates sum_i w_i r_i (a ratio
estimator: rows missing from the sample count at the weighted mean, which keeps a tensor whose few
high-weight rows the sample misses from looking harmless). Without them, the table.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Callable, Iterable, Sequence

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

import gguf_types

from .convert import fits_blocks, keeps_f32, tensor_nbytes
from .llama import EMBEDDINGS, LINEAR_WEIGHT
from .errors import AtdError

__all__ = [
    "BudgetError", "parse_size", "bpw_budget_bytes", "format_size",
    "EMBEDDINGS", "EMBED_STOCK_TYPES", "candidate_types", "tensor_nbytes",
    "ROLE_SENSITIVITY", "TIED_EMBEDDING_SENSITIVITY", "FIRST_LAYER_MULTIPLIER", "LAST_LAYER_MULTIPLIER",
    "sensitivity", "default_sensitivity", "weigh",
    "SAMPLE_MIN_ROWS", "SAMPLE_WEIGHTS", "sample_size", "sample_rows", "Option", "TensorOptions",
    "fixed_tensor", "estimate_tensor", "estimate_from_rows", "default_roundtrip", "sampled_source_rows",
    "RowWeightsFor",
    "estimate_sources",
    "solve", "solve_with_method", "Plan", "PlannedTensor", "make_plan", "plan_for_size", "plan_for_bpw",
    "smallest_plan",
    "gguf_header_nbytes", "gguf_string_kv_nbytes",
]

GGUF_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # GGUFWriter pads every tensor's data to this (32)
PLAN_VERSION = 1


class BudgetError(AtdError, ValueError):
    """Bad --target-size/--bpw input or an impossible budget (one line for the user)."""


# ----------------------------------------------------------------------------- sizes

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes from "95MB", "3.5 GB", "100MiB", "123456" (decimal units are powers of 10, *iB of 2).

    The unit is case-insensitive; a fractional byte count is rounded down (the size is an
    upper bound). Zero, negative, non-numeric and unknown units raise BudgetError.
    """
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BudgetError(f"invalid size {text!r}: expected a positive number with an optional unit "
                          "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. 95MB")
    try:
        nbytes = int(Decimal(m.group(1)) * _UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the regex admits only plain decimals
        raise BudgetError(f"invalid size {text!r}") from None
    if nbytes <= 0:
        raise BudgetError(f"invalid size {text!r}: must be at least 1 byte")
    return nbytes


def format_size(nbytes: int) -> str:
    """"89.2 MiB (93,532,160 bytes)"-style text for messages."""
    return f"{nbytes / 2**20:.1f} MiB ({nbytes:,} bytes)"


def bpw_budget_bytes(bpw: float, n_weights: int) -> int:
    """Tensor-data bytes allowed by `--bpw X`: floor(X * n_weights / 8)."""
    if not (isinstance(bpw, (int, float)) and math.isfinite(bpw) and bpw > 0):
        raise BudgetError(f"invalid --bpw {bpw!r}: must be a positive number of bits per weight")
    return int(Decimal(repr(float(bpw))) * n_weights / 8)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# ----------------------------------------------------------------------------- candidates

# stock types gguf-py 0.19.0 can quantize (gguf.quants) and llama.cpp reads for get_rows and matmul
EMBED_STOCK_TYPES: tuple[QT, ...] = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.BF16, QT.F16)
PLANES = (1, 2, 3, 4)
OUTPUT_MATRIX = "output.weight"
#: stock types the pinned ggml-cpu copies into an interleaved buffer when a matmul uses them (repack.cpp)
REPACKED_AT_LOAD: tuple[QT, ...] = (QT.Q4_0,)


def _atd_types(cols: int) -> list[QT]:
    types = [gguf_types.atd_type_for(n, cols) for n in PLANES]
    return [gguf_types.gguf_qtype(t) for t in types if t is not None]


def _stock_fallback(shape: Sequence[int]) -> QT:
    """The converter's fallback for matrices ATD cannot hold: Q8_0 if the rows fill its blocks, else F16."""
    return QT.Q8_0 if fits_blocks(QT.Q8_0, tuple(shape)) else QT.F16


def candidate_types(name: str, shape: Sequence[int]) -> tuple[QT, ...]:
    """The types `name` may be written in under a budget (the lead may swap this policy out).

    norms/1-D: F32 only. Attention/FFN matrices: ATD1..ATD4 of their family (the stock fallback
    if the rows fit no ATD family). token_embd/output: EMBED_STOCK_TYPES whose blocks fit, and
    the ATD types (the patched llama.cpp runs get_rows and matmul on them).
    """
    shape = tuple(int(s) for s in shape)
    if keeps_f32(name, shape):
        return (QT.F32,)
    if LINEAR_WEIGHT.match(name):
        return tuple(_atd_types(shape[-1])) or (_stock_fallback(shape),)
    if name in EMBEDDINGS:
        stock = [t for t in EMBED_STOCK_TYPES if fits_blocks(t, shape)
                 # ggml-cpu repacks a Q4_0 output matrix on x86/ARM at load: a second copy in RAM
                 and not (name == OUTPUT_MATRIX and t in REPACKED_AT_LOAD)]
        return tuple(stock + _atd_types(shape[-1])) or (QT.F16,)
    return (_stock_fallback(shape),)


# ----------------------------------------------------------------------------- error estimates

#: rows sampled per tensor: at least SAMPLE_MIN_ROWS and at least SAMPLE_WEIGHTS weights (all rows if fewer)
SAMPLE_MIN_ROWS = 64
SAMPLE_WEIGHTS = 1 << 18


def role_of(name: str) -> str:
    """"blk.3.ffn_down.weight" -> "ffn_down", "token_embd.weight" -> "token_embd"."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]


def sample_size(n_rows: int, n_cols: int, *, min_rows: int = SAMPLE_MIN_ROWS,
                sample_weights: int = SAMPLE_WEIGHTS) -> int:
    """Rows to sample: max(min_rows, sample_weights / n_cols), at most n_rows."""
    return min(n_rows, max(min_rows, -(-sample_weights // max(n_cols, 1))))


def sample_rows(n_rows: int, n_cols: int, *, min_rows: int = SAMPLE_MIN_ROWS,
                sample_weights: int = SAMPLE_WEIGHTS) -> np.ndarray:
    """Deterministic row sample: the centre row of each of k = sample_size() equal strata.

    Depends only on the shape, so a caller may load just these rows. Equal strata spread the
    sample over every head and channel group; every row when k = n_rows.
    """
    k = sample_size(n_rows, n_cols, min_rows=min_rows, sample_weights=sample_weights)
    return (np.arange(k, dtype=np.int64) * 2 + 1) * n_rows // (2 * k)


@dataclass(frozen=True)
class Option:
    """One candidate type of one tensor: exact data bytes and estimated error."""
    qtype: QT
    nbytes: int
    error: float
    rel_stderr: float = 0.0  # sampling standard error of `error`, relative


@dataclass(frozen=True)
class TensorOptions:
    """A tensor and its candidates (in candidate_types() order)."""
    name: str
    shape: tuple[int, ...]
    options: tuple[Option, ...]
    sampled_rows: int = 0

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "sampled_rows": self.sampled_rows,
                "options": [[o.qtype.name, o.nbytes, o.error, o.rel_stderr] for o in self.options]}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorOptions":
        options = tuple(Option(QT[t], int(b), float(e), float(s)) for t, b, e, s in d["options"])
        return cls(d["name"], tuple(d["shape"]), options, d.get("sampled_rows", 0))


def fixed_tensor(name: str, shape: Sequence[int], qtype: QT | None = None) -> TensorOptions:
    """A tensor with a single type (norms: F32) and no error: it only costs bytes."""
    shape = tuple(int(s) for s in shape)
    qtype = qtype if qtype is not None else candidate_types(name, shape)[0]
    return TensorOptions(name, shape, (Option(qtype, tensor_nbytes(qtype, shape), 0.0),))


# (type, float32 rows, importance or None) -> the values the file will hold for those rows
RoundTrip = Callable[[QT, np.ndarray, "np.ndarray | None"], np.ndarray]


def default_roundtrip(qtype: QT, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """Encode as the converter does (ATD: grid fit with the imatrix; stock: gguf.quants) and decode."""
    if gguf_types.is_atd_type_id(qtype):
        atype = gguf_types.atd_type(int(qtype))
        return gguf_types.dequantize_fast(gguf_types.quantize(rows, atype, importance=importance), atype)
    if qtype == QT.F32:
        return rows
    return gguf.quants.dequantize(gguf.quants.quantize(rows, qtype), qtype).reshape(rows.shape)


def _mean_and_rel_stderr(r: np.ndarray, sampled_fraction: float) -> tuple[float, float]:
    """Mean of the sampled per-row ratios and its relative standard error (finite population)."""
    k = r.size
    if k == 0:
        return 0.0, 0.0
    mean = float(r.mean())
    if k < 2 or sampled_fraction >= 1 or mean <= 0:
        return mean, 0.0
    return mean, float(math.sqrt((1.0 - sampled_fraction) * r.var(ddof=1) / k) / mean)


def _weighted_mean_and_rel_stderr(r: np.ndarray, weights: np.ndarray,
                                  sampled_fraction: float) -> tuple[float, float]:
    """sum(w r) / sum(w) and the ratio estimator's relative standard error (finite population)."""
    total = float(weights.sum())
    if r.size == 0 or not total > 0:
        return _mean_and_rel_stderr(r, sampled_fraction)  # no row carries weight: the plain mean
    mean = float(weights @ r) / total
    k = r.size
    if k < 2 or sampled_fraction >= 1 or mean <= 0:
        return mean, 0.0
    var = (1.0 - sampled_fraction) * float(np.square(weights * (r - mean)).sum()) / (k - 1) / k
    return mean, float(math.sqrt(var) / (total / k) / mean)


def estimate_from_rows(name: str, shape: Sequence[int], rows: np.ndarray, *,
                       types: Iterable[QT] | None = None, importance: np.ndarray | None = None,
                       roundtrip: RoundTrip = default_roundtrip,
                       row_weights: np.ndarray | None = None) -> TensorOptions:
    """The candidates of a tensor of `shape`, from the rows sample_rows(*shape) picks (in that order).

    error = mean over rows i of  sum_j h_j (w_ij - ŵ_ij)^2 / sum_j h_j w_ij^2  (h = importance, 1
    without or if all zero): the mean noise-to-signal ratio of the output channels. All-zero rows
    (no signal) are left out of the mean. The planner multiplies it by the tensor's sensitivity().
    row_weights (one >= 0 per given row, e.g. converter.sensitivity's measured loss per unit ratio):
    the mean is weighted by them (the plain mean if the live rows' weights are all zero).
    A type the encoder refuses (ATD: a scale beyond fp16) is left out (the stock fallback if none is
    left); an error that is not finite (F16 overflow) becomes inf, so it is never chosen.
    """
    shape = tuple(int(s) for s in shape)
    types = tuple(types) if types is not None else candidate_types(name, shape)
    w = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, shape[-1])
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32)
        if importance.shape != (shape[-1],):
            raise ValueError(f"{name}: importance has {importance.size} values, "
                             f"the tensor has {shape[-1]} columns")
    live_h = importance is not None and bool((importance > 0).any())
    h = importance.astype(np.float64) if live_h else np.ones(shape[-1])
    w64 = w.astype(np.float64)
    signal = np.square(w64) @ h
    live = signal > 0
    if row_weights is not None:
        row_weights = np.asarray(row_weights, dtype=np.float64).reshape(-1)
        if row_weights.shape != (w.shape[0],) or not (np.isfinite(row_weights).all() and (row_weights >= 0).all()):
            raise ValueError(f"{name}: row_weights must be {w.shape[0]} finite values >= 0 (one per row)")
    n_total = int(np.prod(shape[:-1], dtype=np.int64))
    options = []
    for qtype in types:
        nbytes = tensor_nbytes(qtype, shape)
        if qtype == QT.F32:
            options.append(Option(qtype, nbytes, 0.0))
            continue
        try:
            with np.errstate(all="ignore"):  # out-of-range stock encodings: judged by their error below
                decoded = roundtrip(qtype, w, importance)
        except ValueError:
            if gguf_types.is_atd_type_id(qtype):
                continue  # e.g. a plane scale beyond fp16: the converter cannot write this type
            raise
        with np.errstate(over="ignore", invalid="ignore"):
            noise = np.square(w64 - decoded.astype(np.float64)) @ h
            ratio, fraction = noise[live] / signal[live], w.shape[0] / n_total
            mean, rel_se = (_mean_and_rel_stderr(ratio, fraction) if row_weights is None else
                            _weighted_mean_and_rel_stderr(ratio, row_weights[live], fraction))
        options.append(Option(qtype, nbytes, mean if math.isfinite(mean) else math.inf, rel_se))
    if not options:  # as the format asks (docs/atd-format.md §7): keep such a tensor in a stock type
        fallback = _stock_fallback(shape)
        if fallback in types:
            raise ValueError(f"{name}: none of the candidate types {[q.name for q in types]} can encode it")
        return estimate_from_rows(name, shape, rows, types=(fallback,), importance=importance,
                                  roundtrip=roundtrip, row_weights=row_weights)
    return TensorOptions(name, shape, tuple(options), sampled_rows=w.shape[0])


def estimate_tensor(name: str, w: np.ndarray, *, types: Iterable[QT] | None = None,
                    importance: np.ndarray | None = None,
                    roundtrip: RoundTrip = default_roundtrip, min_rows: int = SAMPLE_MIN_ROWS,
                    sample_weights: int = SAMPLE_WEIGHTS, row_weights: np.ndarray | None = None) -> TensorOptions:
    """estimate_from_rows() on the sample_rows() of the full tensor `w` (rows, cols).

    row_weights: one per row of `w` (or None). 1-D tensors and norms get their single fixed type
    without any work.
    """
    shape = tuple(int(s) for s in w.shape)
    types = tuple(types) if types is not None else candidate_types(name, shape)
    if len(shape) < 2 or types == (QT.F32,):
        return fixed_tensor(name, shape, types[0])
    w2 = w.reshape(-1, shape[-1])
    idx = sample_rows(w2.shape[0], shape[-1], min_rows=min_rows, sample_weights=sample_weights)
    return estimate_from_rows(name, shape, w2[idx], types=types, importance=importance, roundtrip=roundtrip,
                              row_weights=_sampled_weights(name, row_weights, w2.shape[0], idx))


def _sampled_weights(name: str, row_weights, n_rows: int, idx: np.ndarray) -> np.ndarray | None:
    if row_weights is None:
        return None
    row_weights = np.asarray(row_weights, dtype=np.float64).reshape(-1)
    if row_weights.size != n_rows:
        raise ValueError(f"{name}: {row_weights.size} row weights for a tensor of {n_rows} rows")
    return row_weights[idx]


#: (GGUF name) -> per-row weights of that tensor (GGUF row order) or None (the plain mean)
RowWeightsFor = Callable[[str], "np.ndarray | None"]


def sampled_source_rows(source) -> np.ndarray:
    """The sample_rows() of a converter.llama.SourceTensor (in its GGUF row order), reading only those
    rows from the checkpoint."""
    rows, cols = source.shape[0], int(np.prod(source.shape[1:], dtype=np.int64))
    return source.load_row_indices(sample_rows(rows, cols)).reshape(-1, cols)


def estimate_sources(sources, *, types_for: Callable[[str, tuple[int, ...]], Sequence[QT]] = candidate_types,
                     importance_for: Callable[[str, int], "np.ndarray | None"] = lambda name, cols: None,
                     progress: Callable[[str], None] | None = None,
                     row_weights_for: RowWeightsFor | None = None) -> list[TensorOptions]:
    """estimate_from_rows() for every tensor of a model (converter.llama.SourceTensor), one at a time.

    types_for(name, shape): the candidates; importance_for(name, cols): the imatrix vector or None;
    row_weights_for(name): measured per-row weights or None (converter.sensitivity.Sensitivities.row_weights).
    Tensors with a single candidate (norms) cost no work.
    """
    out = []
    for source in sources:
        shape = tuple(int(d) for d in source.shape)
        types = tuple(types_for(source.name, shape))
        if len(shape) < 2 or len(types) == 1:
            out.append(fixed_tensor(source.name, shape, types[0]))
            continue
        if progress is not None:
            progress(source.name)
        rows = sampled_source_rows(source)
        if not np.isfinite(rows).all():
            raise AtdError(f"tensor {source.name} contains NaN or Inf values")
        weights = None if row_weights_for is None else row_weights_for(source.name)
        n_rows = source.shape[0]
        out.append(estimate_from_rows(source.name, shape, rows, types=types,
                                      importance=importance_for(source.name, shape[-1]),
                                      row_weights=_sampled_weights(source.name, weights, n_rows,
                                                                   sample_rows(n_rows, rows.shape[-1]))))
    return out


# ----------------------------------------------------------------------------- sensitivity

# Sensitivity: expected loss increase (KL to the unquantized model, nats per token) per unit of the
# mean channel noise-to-signal ratio that estimate_tensor() measures. The fallback when the user's
# model has not been measured (no --calibration; converter.sensitivity otherwise). Measured on SmolLM2-135M
# (imatrix-weighted ATD1/ATD2, one tensor quantized at a time, 512 held-out tokens): geometric means
# over the middle layers; the spread within a role is about x1.5 (sd of log 0.13..0.48).
ROLE_SENSITIVITY: dict[str, float] = {
    "attn_q": 0.03, "attn_k": 0.03, "attn_v": 0.05, "attn_output": 0.045,
    "ffn_gate": 0.08, "ffn_up": 0.08, "ffn_down": 0.08,
    # SmolLM2's tied embedding quantized in one role only (Q4_0, Q5_0, ATD3_64, ATD4_64, no imatrix):
    # input 0.51..0.75, output 5.3..13.4 (ATD x2 above Q4_0/Q5_0)
    "token_embd": 0.6, "output": 9.0,
}
#: token_embd that is also the output matrix (no output.weight): both roles (measured 5.9..13.7, ~0.6 + 9)
TIED_EMBEDDING_SENSITIVITY = 10.0
# The first and the last block are more sensitive (measured, relative to the middle layers:
# first x2.7..x6.6, last x3..x23; attention q/k/v are not). llama.cpp's mixes give them more bits too.
FIRST_LAYER_MULTIPLIER: dict[str, float] = {"attn_output": 3.0, "ffn_gate": 3.0, "ffn_up": 3.0, "ffn_down": 6.0}
LAST_LAYER_MULTIPLIER: dict[str, float] = {"ffn_gate": 3.0, "ffn_up": 10.0, "ffn_down": 20.0}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def sensitivity(name: str, n_layers: int, *, tied_embeddings: bool) -> float:
    """Loss increase per unit of estimated error for tensor `name` (see ROLE_SENSITIVITY)."""
    role = role_of(name)
    if role == "token_embd" and tied_embeddings:
        return TIED_EMBEDDING_SENSITIVITY
    factor = ROLE_SENSITIVITY.get(role, 1.0)
    m = _BLOCK.match(name)
    if m and int(m.group(1)) == 0:
        factor *= FIRST_LAYER_MULTIPLIER.get(role, 1.0)
    if m and int(m.group(1)) == n_layers - 1:
        factor *= LAST_LAYER_MULTIPLIER.get(role, 1.0)
    return factor


def default_sensitivity(names: Iterable[str]) -> Callable[[str], float]:
    """sensitivity() for a model given by its tensor names (layer count and tied embedding from them)."""
    names = list(names)
    n_layers = 1 + max((int(m.group(1)) for m in map(_BLOCK.match, names) if m), default=-1)
    tied = "token_embd.weight" in names and "output.weight" not in names
    return lambda name: sensitivity(name, n_layers, tied_embeddings=tied)


def weigh(tensors: Sequence[TensorOptions], sensitivity_of: Callable[[str], float] | None = None
          ) -> list[TensorOptions]:
    """The tensors with every option's error multiplied by the tensor's sensitivity."""
    sensitivity_of = sensitivity_of or default_sensitivity(t.name for t in tensors)
    out = []
    for t in tensors:
        f = sensitivity_of(t.name)
        if not (math.isfinite(f) and f >= 0):
            raise ValueError(f"{t.name}: sensitivity must be finite and >= 0, got {f}")
        out.append(TensorOptions(t.name, t.shape, tuple(Option(o.qtype, o.nbytes, o.error * f, o.rel_stderr)
                                                        for o in t.options), t.sampled_rows))
    return out


# ----------------------------------------------------------------------------- the knapsack

MAX_FRONT = 1 << 17  # Pareto-front entries before the exact solver gives way to the greedy one


def _pareto(costs: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Indices of the options no other option beats (cheaper-or-equal and strictly better), by cost."""
    order = np.lexsort((np.arange(costs.size), errors, costs))
    keep, best = [], math.inf
    for i in order:
        if errors[i] < best:
            keep.append(int(i))
            best = errors[i]
    return np.array(keep, dtype=np.int64)


def _solve_exact(costs: list[np.ndarray], errors: list[np.ndarray], budget: int,
                 max_front: int) -> list[int] | None:
    """Multiple-choice knapsack by merging Pareto fronts tensor by tensor; None if it grows too big."""
    min_rest = np.concatenate([np.cumsum([c.min() for c in costs[::-1]])[::-1], [0]])
    f_cost, f_err = np.zeros(1, np.int64), np.zeros(1)
    trail = []  # per tensor: (parent index, option index) of every front entry
    for t, (c, e) in enumerate(zip(costs, errors)):
        n_cost = (f_cost[:, None] + c[None, :]).ravel()
        n_err = (f_err[:, None] + e[None, :]).ravel()
        parent = np.repeat(np.arange(f_cost.size), c.size)
        choice = np.tile(np.arange(c.size), f_cost.size)
        ok = n_cost <= budget - min_rest[t + 1]  # the rest must still fit at its cheapest
        n_cost, n_err, parent, choice = n_cost[ok], n_err[ok], parent[ok], choice[ok]
        order = np.lexsort((choice, parent, n_err, n_cost))
        n_cost, n_err, parent, choice = n_cost[order], n_err[order], parent[order], choice[order]
        prev_min = np.minimum.accumulate(np.concatenate([[np.inf], n_err[:-1]]))
        keep = n_err < prev_min  # strictly better than everything cheaper (ties: the cheapest)
        f_cost, f_err = n_cost[keep], n_err[keep]
        trail.append((parent[keep], choice[keep]))
        if f_cost.size > max_front:
            return None
    i = f_cost.size - 1  # the front's errors fall with cost: the last entry is the best
    picks = []
    for parent, choice in reversed(trail):
        picks.append(int(choice[i]))
        i = int(parent[i])
    return picks[::-1]


def _solve_greedy(costs: list[np.ndarray], errors: list[np.ndarray], budget: int) -> list[int]:
    """Lagrangian / convex-hull greedy: upgrades in order of error saved per byte while they fit.

    Its error is at most the exact optimum for (budget - the largest hull step).
    """
    hulls = []
    for c, e in zip(costs, errors):
        hull = []  # lower convex hull of the options, cheapest first
        for i in _pareto(c, e):
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                if (e[b] - e[a]) * (c[i] - c[a]) >= (e[i] - e[a]) * (c[b] - c[a]):
                    hull.pop()  # b lies on or above the segment a-i
                else:
                    break
            hull.append(int(i))
        hulls.append(hull)
    steps = [((errors[t][h[k]] - errors[t][h[k + 1]]) / (costs[t][h[k + 1]] - costs[t][h[k]]), t, k)
             for t, h in enumerate(hulls) for k in range(len(h) - 1)]
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    level = [0] * len(costs)
    used = sum(int(costs[t][h[0]]) for t, h in enumerate(hulls))
    for _, t, k in steps:
        h = hulls[t]
        if level[t] != k:
            continue  # an earlier step of this tensor did not fit
        extra = int(costs[t][h[k + 1]] - costs[t][h[k]])
        if used + extra <= budget:
            used += extra
            level[t] = k + 1
    return [hulls[t][level[t]] for t in range(len(costs))]


def solve_with_method(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int, *,
                      max_front: int = MAX_FRONT) -> tuple[list[int] | None, str]:
    """solve() and which solver answered: "exact" or "greedy"."""
    c = [np.asarray(x, dtype=np.int64) for x in costs]
    e = [np.asarray(x, dtype=np.float64) for x in errors]
    if len(c) != len(e) or any(x.size == 0 or x.shape != y.shape for x, y in zip(c, e)):
        raise ValueError("every tensor needs at least one option, with one error per cost")
    if any(np.isnan(x).any() for x in e):
        raise ValueError("errors must not be NaN")
    if sum(int(x.min()) for x in c) > budget:
        return None, "exact"
    picks = _solve_exact(c, e, budget, max_front)
    return (picks, "exact") if picks is not None else (_solve_greedy(c, e, budget), "greedy")


def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int, *,
          max_front: int = MAX_FRONT) -> list[int] | None:
    """Pick one option (index) per tensor minimizing sum(errors) with sum(costs) <= budget.

    Exact (Pareto-front dynamic programme) unless a front exceeds max_front entries, then the
    convex-hull greedy. Deterministic. None if even the cheapest options exceed the budget.
    """
    return solve_with_method(costs, errors, budget, max_front=max_front)[0]


# ----------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: QT
    nbytes: int
    error: float


@dataclass
class Plan:
    """The chosen type of every tensor, in model order, and what it adds up to.

    file_bytes = pad(overhead_bytes) + sum(pad(nbytes)) with pad = GGUF alignment: the exact size
    of the GGUF file GGUFWriter writes (when overhead_bytes is its header + KV + tensor infos).
    """
    tensors: tuple[PlannedTensor, ...]
    target: str = ""           # "size 100.6MiB" / "bpw 4.5": what was asked
    budget_bytes: int = 0      # the limit it was solved for (file bytes or tensor bytes, see target)
    overhead_bytes: int = 0
    alignment: int = GGUF_ALIGNMENT
    method: str = "exact"      # "exact" | "greedy"
    _by_name: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    def type_for(self, name: str) -> QT:
        """The planned type (KeyError for a tensor the plan does not know)."""
        return self._by_name[name].qtype

    @property
    def types(self) -> dict[str, QT]:
        return {t.name: t.qtype for t in self.tensors}

    @property
    def n_weights(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        data = sum(_pad(t.nbytes, self.alignment) for t in self.tensors)
        return _pad(self.overhead_bytes, self.alignment) + data

    @property
    def bpw(self) -> float:
        """8 * tensor data bytes / weights, over every tensor (as llama.cpp and `atd-gguf inspect` report)."""
        return 8.0 * self.tensor_bytes / self.n_weights if self.tensors else 0.0

    @property
    def error(self) -> float:
        return float(sum(t.error for t in self.tensors))

    def summary(self) -> dict:
        """Compact plan facts for the GGUF metadata (`atd.plan`) and `atd-gguf inspect`."""
        per_type: dict[str, list[int]] = {}
        for t in self.tensors:
            n, w, b = per_type.get(t.qtype.name, [0, 0, 0])
            per_type[t.qtype.name] = [n + 1, w + int(np.prod(t.shape, dtype=np.int64)), b + t.nbytes]
        return {
            "version": PLAN_VERSION, "target": self.target, "budget_bytes": self.budget_bytes,
            "method": self.method, "file_bytes": self.file_bytes, "tensor_bytes": self.tensor_bytes,
            "n_weights": self.n_weights, "bpw": round(self.bpw, 4), "est_error": float(f"{self.error:.6g}"),
            "types": {k: dict(tensors=n, weights=w, bytes=b) for k, (n, w, b) in sorted(per_type.items())},
            "embeddings": {t.name: t.qtype.name for t in self.tensors if t.name in EMBEDDINGS},
        }

    def summary_json(self) -> str:
        return json.dumps(self.summary(), separators=(",", ":"), sort_keys=True)

    def to_json(self) -> str:
        """The summary plus every tensor's choice; from_json() reads it back."""
        d = self.summary() | {"overhead_bytes": self.overhead_bytes, "alignment": self.alignment,
                              "tensors": [[t.name, list(t.shape), t.qtype.name, t.nbytes, t.error]
                                          for t in self.tensors]}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            tensors = tuple(PlannedTensor(n, tuple(s), QT[q], int(b), float(e))
                            for n, s, q, b, e in d["tensors"])
            return cls(tensors, d["target"], int(d["budget_bytes"]), int(d["overhead_bytes"]),
                       int(d["alignment"]), d["method"])
        except (ValueError, KeyError, TypeError) as e:
            raise BudgetError(f"unreadable plan JSON ({type(e).__name__}: {e})") from None

    def layer_table(self) -> str:
        """Text table: one row per linear role, one column per layer, the planes (or type) chosen."""
        grid: dict[str, dict[int, str]] = {}
        for t in self.tensors:
            m = re.match(r"^blk\.(\d+)\.(\w+)\.weight$", t.name)
            if m and LINEAR_WEIGHT.match(t.name):
                a = gguf_types.atd_type(int(t.qtype)) if gguf_types.is_atd_type_id(t.qtype) else None
                grid.setdefault(m.group(2), {})[int(m.group(1))] = str(a.planes) if a else "s"
        layers = sorted({i for row in grid.values() for i in row})
        lines = [f"{'layer':<12}" + "".join(f"{i % 10}" for i in layers)]
        lines += [f"{role:<12}" + "".join(row.get(i, ".") for i in layers) for role, row in grid.items()]
        return "\n".join(lines)


def make_plan(tensors: Sequence[TensorOptions], picks: Sequence[int], **kw) -> Plan:
    """The Plan of option picks[i] for tensors[i] (kw: the Plan's other fields)."""
    chosen = [(t, t.options[i]) for t, i in zip(tensors, picks, strict=True)]
    return Plan(tuple(PlannedTensor(t.name, t.shape, o.qtype, o.nbytes, o.error) for t, o in chosen), **kw)


def smallest_plan(tensors: Sequence[TensorOptions], **kw) -> Plan:
    """Every tensor at its cheapest option (ties: the lower error)."""
    def cheapest(t: TensorOptions) -> int:
        return min(range(len(t.options)), key=lambda i: (t.options[i].nbytes, t.options[i].error, i))
    return make_plan(tensors, [cheapest(t) for t in tensors], **kw)


def _overhead(overhead, plan: Plan) -> int:
    n = overhead(plan) if callable(overhead) else overhead
    if n < 0:
        raise ValueError(f"overhead must be >= 0 bytes, got {n}")
    return int(n)


def plan_for_size(tensors: Sequence[TensorOptions], target_bytes: int, *,
                  overhead: int | Callable[[Plan], int] = 0, alignment: int = GGUF_ALIGNMENT, target: str = "",
                  sensitivity_of: Callable[[str], float] | None = None, max_front: int = MAX_FRONT) -> Plan:
    """The plan of least estimated loss increase whose GGUF file is at most target_bytes.

    tensors: every tensor of the file, in file order, with estimate_tensor()'s raw errors; they are
    weighed by sensitivity_of (default: default_sensitivity() of the tensor names).
    overhead: bytes before the tensor data (header + KV + tensor infos), or a function of the plan
    that returns them when they depend on it, e.g. with the plan's summary stored as a KV string:
        base = gguf_header_nbytes(writer)       # writer: all other KV pairs and the tensor infos
        overhead = lambda plan: base + gguf_string_kv_nbytes("atd.plan", plan.summary_json())
    Tensor data is counted padded to `alignment`, as GGUFWriter writes it, so the file is exactly
    plan.file_bytes <= target_bytes. Raises BudgetError naming the smallest possible size if even
    the smallest plan does not fit.
    """
    tensors = weigh(tensors, sensitivity_of)
    kw = dict(target=target or f"size {target_bytes}", budget_bytes=int(target_bytes), alignment=alignment)
    floor_plan = smallest_plan(tensors, **kw)
    floor_plan.overhead_bytes = _overhead(overhead, floor_plan)
    if floor_plan.file_bytes > target_bytes:
        raise BudgetError(f"target {format_size(target_bytes)} is below the smallest possible file, "
                          f"{format_size(floor_plan.file_bytes)} (every tensor at its smallest type)")
    costs = [[_pad(o.nbytes, alignment) for o in t.options] for t in tensors]
    errors = [[o.error for o in t.options] for t in tensors]
    reserve = _pad(floor_plan.overhead_bytes, alignment)
    for attempt in range(8):
        picks, method = solve_with_method(costs, errors, target_bytes - reserve, max_front=max_front)
        if picks is None:
            break
        plan = make_plan(tensors, picks, method=method, **kw)
        plan.overhead_bytes = _overhead(overhead, plan)
        if plan.file_bytes <= target_bytes:
            return plan
        # the overhead grew with the plan (e.g. a longer summary): reserve more and solve again
        reserve = max(reserve, _pad(plan.overhead_bytes, alignment)) + alignment * (2 ** attempt - 1)
    return floor_plan


def plan_for_bpw(tensors: Sequence[TensorOptions], bpw: float, *,
                 sensitivity_of: Callable[[str], float] | None = None, max_front: int = MAX_FRONT) -> Plan:
    """The plan of least estimated loss increase with at most `bpw` bits per weight.

    Counts, as llama.cpp and `atd-gguf inspect` do, all tensor data bytes (no header, no padding)
    over all weights of every tensor in the file (norms included; a tied embedding once).
    tensors and sensitivity_of as in plan_for_size().
    """
    tensors = weigh(tensors, sensitivity_of)
    n = sum(t.n_weights for t in tensors)
    budget = bpw_budget_bytes(bpw, n)
    kw = dict(target=f"bpw {bpw:g}", budget_bytes=budget, alignment=1)
    floor_plan = smallest_plan(tensors, **kw)
    if floor_plan.tensor_bytes > budget:
        raise BudgetError(f"--bpw {bpw:g} is below the smallest possible, {floor_plan.bpw:.4f} bpw "
                          f"({format_size(floor_plan.tensor_bytes)} of tensor data)")
    costs = [[o.nbytes for o in t.options] for t in tensors]
    errors = [[o.error for o in t.options] for t in tensors]
    picks, method = solve_with_method(costs, errors, budget, max_front=max_front)
    return make_plan(tensors, picks, method=method, **kw)


# ----------------------------------------------------------------------------- GGUF header size


def gguf_header_nbytes(writer: gguf.GGUFWriter) -> int:
    """Bytes GGUFWriter writes before the tensor data (header, KV data, tensor infos), unpadded.

    Measured by writing a copy of the writer's header to a temporary file; `writer` is unchanged
    and must not have opened a file yet: GGUFWriter(path=None) with its KV data and add_tensor_info()
    entries (not add_tensor(), whose data would be copied). A tensor info is the same size whatever
    its type, so placeholder types will do.
    """
    probe = copy.deepcopy(writer)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/header.gguf"
        probe.write_header_to_file(path=path)
        probe.write_kv_data_to_file()
        probe.write_ti_data_to_file()
        n = probe.fout[0].tell()
        probe.close()
    return n


def gguf_string_kv_nbytes(key: str, value: str) -> int:
    """Bytes of one string KV pair (GGUF v3): key (u64 length, UTF-8), type (u32), value (u64 length, UTF-8)."""
    return 8 + len(key.encode()) + 4 + 8 + len(value.encode())
