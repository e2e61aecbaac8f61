"""Numpy reference fit for ATD types (see docs/atd-format.md, section "Fit").

Everything on the exactness-critical path is written so that a C port can reproduce the
bytes exactly:

* all reductions over a block run in float64, sequentially over the block positions
  j = 0..B-1 (``_seqsum``), never np.sum/np.dot/linalg (pairwise or BLAS order);
* every float64 expression is evaluated in the order written in the comments (a C port must
  compile with -ffp-contract=off so that a*b+c is not fused into an FMA);
* rounding to integers uses np.rint (round half to even, C nearbyint in the default mode);
* sorting is stable, keyed by (value, index); -0.0 and +0.0 compare equal.

Work arrays are position-major, shape (B, nblocks): row j holds element j of every block,
so the sequential reduction ``acc += x[j]`` is a contiguous vector add.
"""

from __future__ import annotations

import numpy as np

from . import _native
from .atd import AtdType, atd_type, pack_blocks

__all__ = [
    "DEFAULT_ITERS",
    "DEFAULT_CANDIDATES",
    "CHUNK_WEIGHTS",
    "SINGULAR_RTOL",
    "METHODS",
    "grid_factors",
    "fit_blocks",
    "quantize",
]

#: alternations (LS refit of scales, then trit reassignment) after the grid start
DEFAULT_ITERS = 6
#: number of candidate grid steps per block in the grid start (K)
DEFAULT_CANDIDATES = 32
#: rows are processed in chunks of about this many weights (bounds memory)
CHUNK_WEIGHTS = 1 << 20
#: LDL^T pivot D_j <= SINGULAR_RTOL * G_jj (or G_jj <= 0) => the block keeps its previous scales
SINGULAR_RTOL = 1e-10

METHODS = ("grid", "greedy")


def grid_factors(n_candidates: int = DEFAULT_CANDIDATES) -> list[float]:
    """f_k = 0.30 + (0.70 * k) / (K - 1) in float64 (C: 0.30 + (0.70 * (double)k) / (double)(K - 1))."""
    if n_candidates < 2:
        raise ValueError("need at least 2 grid candidates")
    return [0.30 + 0.70 * k / (n_candidates - 1) for k in range(n_candidates)]


_COMBO_CACHE: dict[int, np.ndarray] = {}


def _combo_trits(n: int) -> np.ndarray:
    """(3^N, N) int8 table: combo c = sum_i (t_i + 1) * 3^(N-1-i)  (plane 0 = most significant digit)."""
    tab = _COMBO_CACHE.get(n)
    if tab is None:
        c = np.arange(3 ** n)
        tab = np.empty((3 ** n, n), dtype=np.int8)
        for i in range(n):
            tab[:, i] = (c // 3 ** (n - 1 - i)) % 3 - 1
        tab.setflags(write=False)
        _COMBO_CACHE[n] = tab
    return tab


def _seqsum(x: np.ndarray) -> np.ndarray:
    """Sequential float64 sum over axis 0: acc = 0.0; for j: acc += x[j]."""
    acc = np.zeros(x.shape[1:], dtype=np.float64)
    for j in range(x.shape[0]):
        acc += x[j]
    return acc


# ----------------------------------------------------------------------------- trit assignment


def _assign_nearest(w: np.ndarray, levels: np.ndarray, n: int) -> np.ndarray:
    """Nearest of the 3^N levels for every weight; ties go to the lower level.

    w: (B, nb) float64; levels: (nb, 3^N) float64, column c = combo c.
    Rule: stable sort of the levels by (value, combo index); midpoints m_k = (l_k + l_{k+1}) * 0.5;
    chosen sorted index p = number of midpoints strictly < w; trits = combo at sorted position p.
    Returns trits (N, B, nb) int8.
    """
    B, nb = w.shape
    L = levels.shape[1]
    order = np.argsort(levels, axis=1, kind="stable")
    srt = np.take_along_axis(levels, order, axis=1)
    mids = np.ascontiguousarray(((srt[:, :-1] + srt[:, 1:]) * 0.5).T)  # (L-1, nb), non-decreasing in k
    # p = count of midpoints strictly below w (a C port may use a binary search: same result)
    pos = np.zeros((B, nb), dtype=np.uint8)  # 3^4 - 1 = 80 midpoints at most
    below = np.empty((B, nb), dtype=bool)
    for k in range(L - 1):
        np.less(mids[k], w, out=below)
        pos += below
    order_t = np.ascontiguousarray(order.T)  # (L, nb)
    combo = np.take_along_axis(order_t, pos.astype(np.intp), axis=0)  # (B, nb)
    tab = _combo_trits(n)
    trits = np.empty((n, B, nb), dtype=np.int8)
    for i in range(n):
        np.take(tab[:, i], combo, out=trits[i])
    return trits


def _levels64(alpha: np.ndarray, n: int) -> np.ndarray:
    """levels[b, c] = sum_i alpha_i * t_i(c), float64, sequential in plane order from 0.0."""
    tab = _combo_trits(n).astype(np.float64)
    acc = np.zeros((alpha.shape[1], tab.shape[0]), dtype=np.float64)
    for i in range(n):
        acc = acc + alpha[i][:, None] * tab[:, i][None, :]
    return acc


def _levels32(scales32: np.ndarray, n: int) -> np.ndarray:
    """Decoder levels: y = 0.0f; y = y + d_i * (float)t_i in float32 (exactly as dequantize)."""
    tab = _combo_trits(n).astype(np.float32)
    acc = np.zeros((scales32.shape[1], tab.shape[0]), dtype=np.float32)
    for i in range(n):
        acc = acc + scales32[i][:, None] * tab[:, i][None, :]
    return acc


# ----------------------------------------------------------------------------- grid method


def _grid_start(w: np.ndarray, h: np.ndarray | None, n: int, n_candidates: int):
    """Balanced-ternary grid start. Returns alpha (N, nb) float64, trits (N, B, nb) int8."""
    B, nb = w.shape
    M = (3 ** n - 1) // 2
    amax = np.max(np.abs(w), axis=0)  # max is order independent
    zero = amax == 0.0
    base = amax / float(M)  # C: (double)amax / (double)M
    factors = grid_factors(n_candidates)
    hw = w if h is None else h * w  # (h_j * w_j)
    best_err = np.full(nb, np.inf)
    best_k = np.zeros(nb, dtype=np.intp)
    best_d = np.zeros(nb)
    q = np.empty_like(w)
    tmp = np.empty_like(w)
    for k, f in enumerate(factors):
        dk = base * f  # (amax / M) * f_k
        dk[zero] = 1.0  # zero blocks: any divisor gives q = 0
        np.divide(w, dk, out=q)  # w_j / d_k
        np.rint(q, out=q)
        np.clip(q, -M, M, out=q)
        swq = _seqsum(np.multiply(hw, q, out=tmp))  # sum (h_j * w_j) * q_j
        if h is None:
            sqq = _seqsum(np.multiply(q, q, out=tmp))  # sum q_j * q_j
        else:
            np.multiply(h, q, out=tmp)
            sqq = _seqsum(np.multiply(tmp, q, out=tmp))  # sum (h_j * q_j) * q_j
        ok = sqq > 0.0
        ds = np.where(ok, swq / np.where(ok, sqq, 1.0), dk)  # d* = swq / sqq, or d_k if sqq == 0
        ds[zero] = 0.0
        np.multiply(q, ds, out=tmp)  # d* * q_j
        np.subtract(w, tmp, out=tmp)  # e_j = w_j - d* * q_j
        if h is None:
            err = _seqsum(np.multiply(tmp, tmp, out=tmp))  # sum e_j * e_j
        else:
            e2 = np.multiply(h, tmp)
            err = _seqsum(np.multiply(e2, tmp, out=e2))  # sum (h_j * e_j) * e_j
        better = err < best_err  # strict: first candidate wins ties
        best_err[better] = err[better]
        best_k[better] = k
        best_d[better] = ds[better]
    # recompute q for the winning candidate (same expression as in the loop)
    fk = np.asarray(factors)[best_k]
    dk = base * fk
    dk[zero] = 1.0
    np.divide(w, dk, out=q)
    np.rint(q, out=q)
    np.clip(q, -M, M, out=q)
    # balanced ternary digits, t_0 most significant: u = q + M has base-3 digits (t_i + 1)
    u = (q + M).astype(np.int64)
    trits = np.empty((n, B, nb), dtype=np.int8)
    for i in range(n - 1, -1, -1):
        trits[i] = u % 3 - 1
        u //= 3
    alpha = np.empty((n, nb))
    for i in range(n):
        alpha[i] = float(3 ** (n - 1 - i)) * best_d  # 3^(N-1-i) * d*
    return alpha, trits


def _refit_scales(w: np.ndarray, h: np.ndarray | None, trits: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Least-squares scales for fixed trits: G alpha = b via LDL^T, vectorized over blocks.

    G_ab = sum_j (h_j * t_aj) * t_bj  (a <= b), b_a = sum_j (h_j * w_j) * t_aj, all _seqsum.
    Blocks with a pivot D_j <= SINGULAR_RTOL * G_jj (or G_jj <= 0) keep their previous scales.
    """
    n = trits.shape[0]
    tf = trits.astype(np.float64)
    hw = w if h is None else h * w
    G: dict[tuple[int, int], np.ndarray] = {}
    rhs = []
    for a in range(n):
        ht = tf[a] if h is None else h * tf[a]
        for b in range(a, n):
            G[a, b] = _seqsum(ht * tf[b])
        rhs.append(_seqsum(hw * tf[a]))
    del tf
    nb = w.shape[1]
    ok = np.ones(nb, dtype=bool)
    D: list[np.ndarray] = []
    Lm: dict[tuple[int, int], np.ndarray] = {}
    with np.errstate(all="ignore"):
        for j in range(n):
            acc = G[j, j].copy()
            for k in range(j):
                acc = acc - (Lm[j, k] * Lm[j, k]) * D[k]  # D_j = G_jj - sum_k (L_jk * L_jk) * D_k
            ok &= (G[j, j] > 0.0) & (acc > SINGULAR_RTOL * G[j, j])
            dj = np.where(acc > 0.0, acc, 1.0)
            D.append(dj)
            for i in range(j + 1, n):
                acc2 = G[j, i].copy()
                for k in range(j):
                    acc2 = acc2 - (Lm[i, k] * Lm[j, k]) * D[k]
                Lm[i, j] = acc2 / dj  # L_ij = (G_ij - sum_k (L_ik * L_jk) * D_k) / D_j
        z: list[np.ndarray] = []
        for i in range(n):  # forward: z_i = b_i - sum_{k<i} L_ik * z_k  (k ascending)
            acc = rhs[i].copy()
            for k in range(i):
                acc = acc - Lm[i, k] * z[k]
            z.append(acc)
        y = [z[i] / D[i] for i in range(n)]
        sol: list[np.ndarray | None] = [None] * n
        for i in range(n - 1, -1, -1):  # back: a_i = y_i - sum_{k>i} L_ki * a_k  (k ascending)
            acc = y[i].copy()
            for k in range(i + 1, n):
                acc = acc - Lm[k, i] * sol[k]
            sol[i] = acc
        new = np.stack(sol)
    ok &= np.isfinite(new).all(axis=0)
    return np.where(ok[None, :], new, alpha)


def _round_scales(alpha: np.ndarray) -> np.ndarray:
    """float64 -> float32 -> float16 (both round-to-nearest-even); overflow raises ValueError."""
    with np.errstate(over="ignore"):
        s16 = alpha.astype(np.float32).astype(np.float16)
    if not np.isfinite(s16).all():
        bad = np.abs(alpha[~np.isfinite(s16)]).max()
        raise ValueError(
            f"ATD plane scale {bad:.6g} overflows fp16 (max 65504): the tensor's magnitude is too large "
            "for ATD's fp16 scales; rescale the tensor or keep it in F32/F16/BF16")
    s16[s16 == 0] = 0  # canonical +0.0 for scales that round to -0.0
    return s16


def _finalize(w: np.ndarray, alpha: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Round scales to fp16, reassign trits against the decoder's float32 levels, zero dead planes."""
    s16 = _round_scales(alpha)  # (N, nb)
    s32 = s16.astype(np.float32)
    levels = _levels32(s32, n).astype(np.float64)
    trits = _assign_nearest(w, levels, n)
    dead = s16 == 0  # (N, nb): plane contributes nothing -> canonical t = 0
    for i in range(n):
        trits[i][:, dead[i]] = 0
    return trits, s16


def _fit_grid(w, h, n, iters, n_candidates):
    alpha, trits = _grid_start(w, h, n, n_candidates)
    for _ in range(iters):
        alpha = _refit_scales(w, h, trits, alpha)
        trits = _assign_nearest(w, _levels64(alpha, n), n)
    return _finalize(w, alpha, n)


# ----------------------------------------------------------------------------- greedy method


def _fit_greedy(w, h, n):
    """Greedy: exact optimal single ternary plane per block on the residual, N times.

    Works on (nb, B). Scale alpha = S_k / H_k rounded to fp16; residual updated with the fp16 scale.
    """
    wb = np.ascontiguousarray(w.T)  # (nb, B)
    hb = None if h is None else np.ascontiguousarray(h.T)
    nb, B = wb.shape
    r = wb.copy()
    trits = np.zeros((n, B, nb), dtype=np.int8)
    scales = np.zeros((n, nb), dtype=np.float16)
    rank_of = np.empty((nb, B), dtype=np.intp)
    ar = np.arange(B)
    for i in range(n):
        a = np.abs(r)
        order = np.argsort(-a, axis=1, kind="stable")  # descending |r|, ties by index
        a_s = np.take_along_axis(a, order, axis=1)
        if hb is None:
            S = np.cumsum(a_s, axis=1)  # cumsum is sequential
            H = np.broadcast_to(np.arange(1, B + 1, dtype=np.float64), (nb, B))
        else:
            h_s = np.take_along_axis(hb, order, axis=1)
            S = np.cumsum(h_s * a_s, axis=1)
            H = np.cumsum(h_s, axis=1)
        with np.errstate(all="ignore"):
            score = np.where(H > 0, S * S / np.where(H > 0, H, 1.0), -1.0)
        k = np.argmax(score, axis=1)  # first maximum; plane = top (k+1) elements
        Sk = S[np.arange(nb), k]
        Hk = H[np.arange(nb), k]
        alpha = np.where(Hk > 0, Sk / np.where(Hk > 0, Hk, 1.0), 0.0)
        s16 = _round_scales(alpha)
        np.put_along_axis(rank_of, order, np.broadcast_to(ar, (nb, B)), axis=1)
        t = (np.sign(r) * (rank_of <= k[:, None])).astype(np.int8)
        t[s16 == 0] = 0
        r = r - s16.astype(np.float64)[:, None] * t
        trits[i] = t.T
        scales[i] = s16
    return trits, scales


# ----------------------------------------------------------------------------- public API


def _check_weights(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"ATD quantize expects a 2-D (rows, cols) weight matrix, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"ATD quantize expects floating point weights, got {w.dtype}")
    w = w.astype(np.float32, copy=False)
    finite = np.isfinite(w)
    if not finite.all():
        bad = np.argwhere(~finite)
        r, c = bad[0]
        raise ValueError(
            f"weights contain {len(bad)} non-finite value(s) (NaN/Inf), first at [{r}, {c}] = {w[r, c]}")
    return w


def _check_importance(importance, cols: int) -> np.ndarray | None:
    if importance is None:
        return None
    h = np.asarray(importance)
    if not np.issubdtype(h.dtype, np.floating) and not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"importance must be numeric, got {h.dtype}")
    h = h.astype(np.float32, copy=False).reshape(-1) if h.ndim <= 1 else h
    if h.ndim != 1 or h.shape[0] != cols:
        raise ValueError(f"importance must be a vector of length cols={cols}, got shape {np.shape(importance)}")
    if not np.isfinite(h).all():
        raise ValueError("importance contains NaN/Inf")
    if (h < 0).any():
        raise ValueError("importance contains negative values")
    return h


def fit_blocks(blocks: np.ndarray, planes: int, method: str = "grid", importance: np.ndarray | None = None,
               *, iters: int = DEFAULT_ITERS, n_candidates: int = DEFAULT_CANDIDATES
               ) -> tuple[np.ndarray, np.ndarray]:
    """Fit independent blocks.

    blocks: (nb, B) float32 (already validated finite); importance: (nb, B) float32 >= 0 or None.
    Returns trits (nb, N, B) int8 and scales (nb, N) float16.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ATD fit method {method!r}; choose from {METHODS}")
    if not 1 <= planes <= 4:
        raise ValueError(f"ATD supports 1..4 planes, got {planes}")
    w = np.ascontiguousarray(np.asarray(blocks, dtype=np.float32).T).astype(np.float64)  # (B, nb)
    h = None
    if importance is not None:
        h = np.ascontiguousarray(np.asarray(importance, dtype=np.float32).T).astype(np.float64)
        dead = ~(h != 0).any(axis=0)  # block with all-zero importance: fit it unweighted
        if dead.any():
            h[:, dead] = 1.0
    if method == "grid":
        trits, scales = _fit_grid(w, h, planes, iters, n_candidates)
    else:
        trits, scales = _fit_greedy(w, h, planes)
    return np.ascontiguousarray(trits.transpose(2, 0, 1)), np.ascontiguousarray(scales.T)


def quantize(w: np.ndarray, atype: "AtdType | str | int", method: str = "grid",
             importance: np.ndarray | None = None, *, iters: int = DEFAULT_ITERS,
             n_candidates: int = DEFAULT_CANDIDATES, chunk_weights: int = CHUNK_WEIGHTS) -> np.ndarray:
    """Quantize a (rows, cols) weight matrix to ATD bytes of shape (rows, cols // B * type_size).

    importance: optional per-column weights h_j >= 0 (llama.cpp imatrix: mean x_j^2), broadcast over rows.
    The default grid fit runs in C (gguf_types._atd_c, all cores; ATD_THREADS=k limits them) when the
    extension is built, with the same bytes; ATD_NO_NATIVE=1 forces this numpy code.
    """
    t = atd_type(atype)
    if method not in METHODS:
        raise ValueError(f"unknown ATD fit method {method!r}; choose from {METHODS}")
    w = _check_weights(w)
    cols = w.shape[1]
    if cols % t.block_size != 0:
        raise ValueError(f"{t.name}: row length {cols} is not a multiple of the block size {t.block_size}")
    h = _check_importance(importance, cols)
    if (method == "grid" and iters == DEFAULT_ITERS and n_candidates == DEFAULT_CANDIDATES
            and _native.native_available()):
        # the C port of this fit (ggml-ext/atd-quants.c): the same bytes, threaded over rows
        return _native.quantize_rows(w, t, h, chunk_weights=chunk_weights)
    return _quantize_numpy(w, t, method, h, iters, n_candidates, chunk_weights)


def _quantize_numpy(w: np.ndarray, t: AtdType, method: str, h: np.ndarray | None, iters: int,
                    n_candidates: int, chunk_weights: int = CHUNK_WEIGHTS) -> np.ndarray:
    """The numpy fit of quantize() on validated input (float32 w, checked importance h or None)."""
    rows, cols = w.shape
    B = t.block_size
    bpr = cols // B
    out = np.empty((rows, bpr * t.type_size), dtype=np.uint8)
    rpc = max(1, chunk_weights // max(cols, 1))
    hb_row = None if h is None else h.reshape(bpr, B)
    for r0 in range(0, rows, rpc):
        r1 = min(rows, r0 + rpc)
        blocks = w[r0:r1].reshape((r1 - r0) * bpr, B)
        hb = None if hb_row is None else np.tile(hb_row, (r1 - r0, 1))
        trits, scales = fit_blocks(blocks, t.planes, method, hb, iters=iters, n_candidates=n_candidates)
        out[r0:r1] = pack_blocks(trits, scales).reshape(r1 - r0, bpr * t.type_size)
    return out
