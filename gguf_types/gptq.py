"""GPTQ-style Hessian error feedback for the ATD fit of one weight matrix.

GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") quantizes the columns of W one at a time and spreads each column's
rounding error over the columns not yet quantized, so that the layer output X·Wᵀ on the
calibration activations X changes as little as possible. It minimizes the Hessian-weighted error

    tr((W - Ŵ) H (W - Ŵ)ᵀ) = Σ_tokens ||x (W - Ŵ)ᵀ||²,   H = Σ_tokens xᵀx   (cols × cols)

API (numpy in and out; torch does the dense linear algebra inside)::

    prepare_hessian(hessian, *, damp=0.01, act_order=True) -> PreparedHessian
        Damps and factorizes H once (the upper Cholesky factor of H⁻¹). q/k/v share one
        input and gate/up share one: prepare once, pass the result to gptq_quantize for each.
    gptq_quantize(w, hessian, atype, *, damp=None, act_order=None, block_cols=128,
                  importance=None) -> (rows, cols // B * type_size) uint8
        The packed ATD bytes (gguf_types.pack_blocks), decodable by gguf_types.dequantize.
        `hessian` is H (cols × cols, any float dtype; float64 recommended) or a PreparedHessian.
        damp/act_order default to 0.01/True, or to the PreparedHessian's own values (passing
        different ones with a PreparedHessian is a ValueError).
    hessian_error(w, w_hat, hessian) -> float
        tr((W - Ŵ) H (W - Ŵ)ᵀ) in float64.

The algorithm (the paper's Algorithm 1 with lazy batches, plus ATD's per-block scales):

* Damping: λ = damp · mean(diag H) is added to the diagonal. A dead column (diag H = 0: its input
  was always 0) first gets diag = mean(diag H): it is fitted as an average column instead of being
  zeroed as in the GPTQ reference code (the calibration loss cannot see it, so it simply stays close
  to its original value). H = 0 becomes a multiple of the identity (a plain fit).
  damp = 0.01 is the paper's value for ≳ 100 calibration tokens per column; with fewer tokens
  the fit overfits the calibration text and a larger damp generalizes better (measured: the best
  damp is ≈ cols / n_tokens; converter.calibration.GptqQuantizer uses max(0.01, cols / n_tokens)).
* U = upper Cholesky factor of (H + λI)⁻¹, without forming H⁻¹: with J the reversal permutation,
  J H J = L Lᵀ gives H⁻¹ = Uᵀ U for U = J L⁻¹ J. One Cholesky and one blocked in-place triangular
  inverse, in float64 (~2n³/3 flops instead of the ~4n³/3 of inverse-then-Cholesky); U is then
  stored in float32 like the weights being updated.
* Columns are processed in lazy blocks of `block_cols` (split into inner blocks of 16): a
  column's scaled error e = (w - q) / U_jj goes to the rest of its inner block at once (rank 1),
  to the rest of the lazy block after the inner block, and to all later columns after the lazy
  block, as one matmul W[:, i2:] -= E · U[i1:i2, i2:] each.
* ATD: the fp16 scales of an ATD block (B consecutive columns of a row) are fitted by the
  reference fit (gguf_types.quantize, its C port when built) on the block's current,
  error-updated weights when GPTQ reaches the first column of that block in the processing order.
  Column j's weight in that fit is 1/U_jj² - λ: 1/U_jj² is its weight in GPTQ's loss (the loss is
  Σ_j e_j²), minus the damping (PreparedHessian.fit_importance); `importance` replaces it.
  Then each column is rounded to the nearest level the decoder produces from those fp16 scales
  (float32 levels, ties to the lower level: the rule of docs/atd-format.md §6.3), and planes
  whose scale is 0 get all trits 0 (§4), so all-zero blocks are canonical. With a diagonal H
  nothing propagates and the bytes equal gguf_types.quantize's with the same importance.
* act_order (descending diag H first) is on by default: with a damp suited to the token count it
  lowered the held-out Hessian error by 1-11% on SmolLM2's attention and down projections and
  changed gate/up by ±1%; sequential GPTQ of all of SmolLM2 at N=2 reached held-out perplexity
  14.9 with it and 15.8 without (N=3: 10.48 / 10.49). ATD blocks stay B consecutive columns, so with act_order a block's
  scales are fitted when its first column in the processing order is reached, on the current
  values of all its columns (updates still pending in the lazy block included); its later
  columns are rounded to those scales after further updates.

Determinism: the same inputs give the same bytes on the same machine with the same number of
torch threads. The per-column work is numpy (sequential); the matmuls are torch/MKL, whose
results may differ in the last bits across thread counts and CPUs (MKL does not promise
otherwise; 1 and 2 threads gave identical bytes here), which can flip a rounding decision; their
buffers come from torch's aligned allocator so that alignment does not vary between runs.
Cost (2 idle cores): a 14336-wide H takes 33 s to prepare, GPTQ of a 4096×14336 down_proj 12 s
and of a 14336×4096 gate_proj 8 s (ATD3). Peak memory: the caller's H, one float64 copy of it
during prepare_hessian, U (float32 n²) and a few copies of w -- 5.1 GB RSS for the down_proj with
its float64 H (1.5 GB of it the caller's), 1.2 GB for the gate_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .atd import AtdType, atd_type, pack_blocks, unpack_blocks
from .fit import _combo_trits, _levels32, quantize

__all__ = [
    "DEFAULT_DAMP",
    "DEFAULT_ACT_ORDER",
    "DEFAULT_BLOCK_COLS",
    "PreparedHessian",
    "prepare_hessian",
    "gptq_quantize",
    "hessian_error",
]

#: relative damping λ = damp · mean(diag H), as in the GPTQ paper
DEFAULT_DAMP = 0.01
#: process columns by descending diag H (measured: pays on attention/down, neutral on gate/up)
DEFAULT_ACT_ORDER = True
#: lazy-batch width (columns quantized before one trailing matmul update)
DEFAULT_BLOCK_COLS = 128
# the triangular inverse works on column blocks of this width
_INV_BLOCK = 256
# weights packed per pack_blocks call (bounds the int8 trit temporaries)
_PACK_WEIGHTS = 1 << 22


def _torch():
    import torch  # lazy: only the GPTQ path needs torch
    return torch


@dataclass(frozen=True, eq=False)
class PreparedHessian:
    """A damped, factorized Hessian, ready for gptq_quantize (shareable between linears).

    u: (cols, cols) float32 torch tensor, upper Cholesky factor of (H + λI)⁻¹ in processing order.
    perm: processing order (original column index at each position), int64 numpy.
    diag: diag of the undamped input H (float64, original order); dead: diag == 0.
    """
    u: object
    perm: np.ndarray
    diag: np.ndarray
    dead: np.ndarray
    damp: float
    act_order: bool
    lam: float  # the damping added to the diagonal, damp · mean(diag H)

    @property
    def cols(self) -> int:
        return int(self.perm.shape[0])

    def fit_importance(self) -> np.ndarray:
        """Per original column: max(1/U_jj² - λ, 0), the default weights of the scale fits.

        1/U_jj² is column j's weight in GPTQ's loss on the damped H (the loss is Σ_j e_j²,
        e_j = (w_j - q_j) / U_jj); subtracting the damping λ keeps strong damping from flattening
        it (for a diagonal H it is exactly diag H, llama.cpp's imatrix). Measured on SmolLM2
        (held-out error): as good as 1/U_jj² at damp 0.01, better at damp >= 1, and better than
        diag H.
        """
        d = self.u.diagonal().double().numpy()
        imp = np.empty(self.cols, dtype=np.float64)
        imp[self.perm] = np.maximum(1.0 / (d * d) - self.lam, 0.0)
        return imp.astype(np.float32)


def _check_hessian(hessian) -> np.ndarray:
    h = np.asarray(hessian)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] == 0:
        raise ValueError(f"hessian must be a square (cols, cols) matrix, got shape {h.shape}")
    if not (np.issubdtype(h.dtype, np.floating) or np.issubdtype(h.dtype, np.integer)):
        raise ValueError(f"hessian must be numeric, got {h.dtype}")
    for r0 in range(0, h.shape[0], 1024):  # by row blocks: no n² temporary
        if not np.isfinite(h[r0:r0 + 1024]).all():
            raise ValueError("hessian contains NaN/Inf")
    if (np.diagonal(h) < 0).any():
        raise ValueError("hessian has a negative diagonal entry (it must be Σ xᵀx, positive semi-definite)")
    return h


def _invert_lower_inplace(L, nb: int = _INV_BLOCK) -> None:
    """L (n × n lower triangular, float64 torch) := L⁻¹, in place, blocked from the bottom right.

    For a column block j: inv[e:, j:e] = -(inv[e:, e:] @ L[e:, j:e]) @ inv(L[j:e, j:e]); the
    product with the lower-triangular inv[e:, e:] skips its zero upper part row block by row block.
    """
    torch = _torch()
    n = L.shape[0]
    starts = list(range(0, n, nb))
    for j in reversed(starts):
        e = min(j + nb, n)
        d_inv = torch.linalg.solve_triangular(L[j:e, j:e], torch.eye(e - j, dtype=L.dtype), upper=False)
        if e < n:
            b = L[e:, j:e]
            x = torch.empty_like(b)
            for r0 in range(e, n, 4 * nb):
                r1 = min(r0 + 4 * nb, n)
                torch.matmul(L[r0:r1, e:r1], b[: r1 - e], out=x[r0 - e: r1 - e])
            L[e:, j:e] = -(x @ d_inv)
        L[j:e, j:e] = d_inv


def prepare_hessian(hessian, *, damp: float = DEFAULT_DAMP, act_order: bool = DEFAULT_ACT_ORDER) -> PreparedHessian:
    """Damp H, choose the column order, and compute U = chol(H⁻¹) (upper) in that order."""
    torch = _torch()
    if not (isinstance(damp, (int, float)) and np.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    h = _check_hessian(hessian)
    n = h.shape[0]
    diag = np.diagonal(h).astype(np.float64)
    dead = diag == 0.0
    mean = float(diag.mean())
    if mean == 0.0:  # no calibration signal at all: a multiple of the identity, i.e. the plain fit
        mean = 1.0
    # stable sort of -diag: ties (and dead columns, at the end) keep their column order
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    rev = perm[::-1].copy()
    a = torch.empty((n, n), dtype=torch.float64)  # J P H Pᵀ J (P: act_order), factorized in place
    for r0 in range(0, n, 1024):
        a[r0:r0 + 1024] = torch.from_numpy(np.asarray(h[rev[r0:r0 + 1024]][:, rev], dtype=np.float64))
    dg = a.diagonal()
    dg[torch.from_numpy(dead[rev])] = mean
    dg += damp * mean
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(a, out=(a, info))
    if int(info) != 0:
        raise ValueError(f"hessian is not positive definite after damping (damp={damp}); "
                         "it must be Σ xᵀx over calibration tokens, or use a larger damp")
    _invert_lower_inplace(a)  # a = L⁻¹, lower triangular
    u = torch.empty((n, n), dtype=torch.float32)
    step = 1024
    for r0 in range(0, n, step):  # U = J L⁻¹ J, row chunk by row chunk
        r1 = min(r0 + step, n)
        u[r0:r1] = a[n - r1: n - r0].flip((0, 1))
    del a
    return PreparedHessian(u=u, perm=perm.astype(np.int64), diag=diag, dead=dead, damp=float(damp),
                           act_order=bool(act_order), lam=damp * mean)


def _check_weights(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"gptq_quantize expects a 2-D (rows, cols) weight matrix, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"gptq_quantize expects floating point weights, got {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN/Inf")
    return w


def _check_importance(importance, cols: int) -> np.ndarray:
    h = np.asarray(importance, dtype=np.float64).reshape(-1)
    if h.shape[0] != cols:
        raise ValueError(f"importance must be a vector of length cols={cols}, got shape {np.shape(importance)}")
    if not np.isfinite(h).all() or (h < 0).any():
        raise ValueError("importance must be finite and >= 0")
    return h.astype(np.float32)


class _BlockLevels:
    """The decoder's sorted levels of one ATD block column (every row), for nearest-level lookups."""

    def __init__(self, scales: np.ndarray, planes: int):
        levels = _levels32(scales.astype(np.float32).T, planes)  # (rows, 3^N) float32, as dequantize
        order = np.argsort(levels, axis=1, kind="stable")  # ties: the lower combo index first (§6.3)
        srt = np.take_along_axis(levels, order, axis=1)
        s64 = srt.astype(np.float64)
        # position-major (level, row) arrays: one column of weights is compared row-wise contiguously
        self.mids = np.ascontiguousarray(((s64[:, :-1] + s64[:, 1:]) * 0.5).T)
        self.srt = np.ascontiguousarray(srt.T)
        self.order = np.ascontiguousarray(order.T.astype(np.uint8))
        self.rows = np.arange(srt.shape[0])
        self._below = np.empty(self.mids.shape, dtype=bool)

    def nearest(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(level values float32, combo indices) for one column w (rows,) float32: the level at
        sorted position p = number of midpoints strictly below w (docs/atd-format.md §6.3)."""
        np.less(self.mids, w.astype(np.float64), out=self._below)
        pos = np.count_nonzero(self._below, axis=0)
        return self.srt[pos, self.rows], self.order[pos, self.rows]


def gptq_quantize(w, hessian, atype: "AtdType | str | int", *, damp: float | None = None,
                  act_order: bool | None = None, block_cols: int = DEFAULT_BLOCK_COLS,
                  importance=None) -> np.ndarray:
    """ATD bytes (rows, cols // B * type_size) of w (rows, cols) fitted with GPTQ error feedback."""
    t = atd_type(atype)
    w = _check_weights(w)
    rows, cols = w.shape
    if cols % t.block_size != 0:
        raise ValueError(f"{t.name}: row length {cols} is not a multiple of the block size {t.block_size}")
    if not (isinstance(block_cols, (int, np.integer)) and block_cols >= 1):
        raise ValueError(f"block_cols must be a positive integer, got {block_cols!r}")
    if isinstance(hessian, PreparedHessian):
        prep = hessian
        if (damp is not None and damp != prep.damp) or (act_order is not None and act_order != prep.act_order):
            raise ValueError("damp/act_order differ from those the PreparedHessian was made with")
    else:
        prep = prepare_hessian(hessian, damp=DEFAULT_DAMP if damp is None else damp,
                               act_order=DEFAULT_ACT_ORDER if act_order is None else act_order)
    if prep.cols != cols:
        raise ValueError(f"hessian is {prep.cols}×{prep.cols} but the weights have {cols} columns")
    imp = prep.fit_importance() if importance is None else _check_importance(importance, cols)
    combos, scales = _Gptq(w, prep, t, imp, int(block_cols)).run()
    return _pack(combos, scales, t)


class _Gptq:
    """The column loop. Per-column work is numpy (single-threaded, no thread start-up per tiny
    op); the block updates are torch matmuls. Lazy blocks of `block_cols` columns are split into
    inner blocks of _INNER columns: a quantized column's error goes to the rest of its inner block
    at once (rank 1), to the rest of the lazy block after the inner block, and to all later
    columns after the lazy block (one matmul each)."""

    _INNER = 16

    def __init__(self, w: np.ndarray, prep: PreparedHessian, t: AtdType, imp: np.ndarray, block_cols: int):
        torch = _torch()
        self.t, self.imp, self.bs = t, imp, block_cols
        self.rows, self.cols = w.shape
        self.perm = prep.perm
        self.pos_of = np.empty(self.cols, dtype=np.int64)
        self.pos_of[self.perm] = np.arange(self.cols)
        self.u = prep.u  # torch float32 (cols, cols)
        # working copy in processing order; matmul operands are torch-allocated (aligned the same every run)
        self.W = torch.empty((self.rows, self.cols), dtype=torch.float32)
        np.take(w, self.perm, axis=1, out=self.W.numpy())

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        torch = _torch()
        t, rows, cols, B = self.t, self.rows, self.cols, self.t.block_size
        combos = np.empty((cols, rows), dtype=np.uint8)  # chosen level combo, processing order
        scales = np.zeros((rows, cols // B, t.planes), dtype=np.float16)
        open_blocks: dict[int, _BlockLevels] = {}
        left: dict[int, int] = {}
        for i1 in range(0, cols, self.bs):
            i2 = min(i1 + self.bs, cols)
            W1 = torch.empty((i2 - i1, rows), dtype=torch.float32).numpy()  # column k of the block is W1[k]
            W1[:] = self.W[:, i1:i2].numpy().T
            E1 = torch.zeros((i2 - i1, rows), dtype=torch.float32).numpy()  # scaled errors (w - q) / U_pp
            u1 = self.u[i1:i2, i1:i2].numpy()
            for j1 in range(0, i2 - i1, self._INNER):
                j2 = min(j1 + self._INNER, i2 - i1)
                for k in range(j1, j2):
                    p = i1 + k
                    b = int(self.perm[p]) // B
                    lv = open_blocks.get(b)
                    if lv is None:  # first column of ATD block b: fit its scales on the current weights
                        cur = self._current(self.pos_of[b * B:(b + 1) * B], W1, E1, i1, i2, j1, j2, k)
                        packed = quantize(cur, t, importance=self.imp[b * B:(b + 1) * B])
                        _, s16 = unpack_blocks(packed, t)
                        scales[:, b] = s16
                        lv = open_blocks[b] = _BlockLevels(s16, t.planes)
                        left[b] = B
                    q, combos[p] = lv.nearest(W1[k])
                    err = (W1[k] - q) / u1[k, k]
                    E1[k] = err
                    if k + 1 < j2:
                        W1[k + 1:j2] -= u1[k, k + 1:j2, None] * err[None, :]
                    left[b] -= 1
                    if left[b] == 0:
                        del open_blocks[b], left[b]
                if j2 < i2 - i1:  # W1[j2:] -= U[j1:j2, j2:]ᵀ E1[j1:j2]
                    torch.from_numpy(W1[j2:]).addmm_(torch.from_numpy(u1[j1:j2, j2:]).T,
                                                      torch.from_numpy(E1[j1:j2]), alpha=-1.0)
            if i2 < cols:  # W[:, i2:] -= E1ᵀ U[i1:i2, i2:]
                self.W[:, i2:].addmm_(torch.from_numpy(E1).T, self.u[i1:i2, i2:], alpha=-1.0)
        return np.ascontiguousarray(combos[self.pos_of].T), scales

    def _current(self, bpos: np.ndarray, W1, E1, i1: int, i2: int, j1: int, j2: int, k: int) -> np.ndarray:
        """Current (error-updated) values (rows, len(bpos)) of the columns at processing positions
        bpos (all >= i1 + k, not yet quantized), including the updates still pending:
        in the inner block they are applied; in the rest of the lazy block those of columns
        j1..k-1 are pending; beyond the lazy block those of columns 0..k-1 of the lazy block."""
        torch = _torch()
        out = np.empty((self.rows, len(bpos)), dtype=np.float32)
        rel = bpos - i1
        for region, sel in enumerate((rel < j2, (rel >= j2) & (rel < i2 - i1), rel >= i2 - i1)):
            if not sel.any():
                continue
            if region == 0:
                vals = W1[rel[sel]].T
            elif region == 1:
                vals = W1[rel[sel]].T - E1[j1:k].T @ self.u[i1 + j1:i1 + k][:, bpos[sel]].numpy()
            else:
                pos = torch.from_numpy(bpos[sel])
                vals = (self.W[:, pos] - torch.from_numpy(E1[:k]).T @ self.u[i1:i1 + k][:, pos]).numpy()
            out[:, sel] = vals
        return out


def _pack(combos: np.ndarray, scales: np.ndarray, t: AtdType) -> np.ndarray:
    """combos (rows, cols) in column order + scales (rows, nb, N) -> packed bytes (rows, nb * type_size)."""
    rows, cols = combos.shape
    B, n = t.block_size, t.planes
    nb = cols // B
    tab = _combo_trits(n)
    out = np.empty((rows, nb * t.type_size), dtype=np.uint8)
    step = max(1, _PACK_WEIGHTS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        trits = tab[combos[r0:r1]]  # (r, cols, N)
        trits = np.ascontiguousarray(trits.reshape(r1 - r0, nb, B, n).transpose(0, 1, 3, 2))  # (r, nb, N, B)
        s = scales[r0:r1]
        trits[s == 0] = 0  # a plane with scale 0 has all trits 0 (canonical, §4)
        packed = pack_blocks(trits.reshape(-1, n, B), s.reshape(-1, n))
        out[r0:r1] = packed.reshape(r1 - r0, nb * t.type_size)
    return out


def hessian_error(w, w_hat, hessian) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) in float64: the output error Σ_tokens ||x (W - Ŵ)ᵀ||²."""
    d = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    if h.shape != (d.shape[1], d.shape[1]):
        raise ValueError(f"hessian shape {h.shape} does not match weights with {d.shape[1]} columns")
    return float(np.einsum("ij,ij->", d @ h, d))
