"""Tests for the ATD codec, the numpy reference fit and the gguf-py registration (gguf_types)."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
import gguf.quants

import gguf_types as G
from gguf_types import fit as F

ALL_N = (1, 2, 3, 4)
BLOCK_SIZES = (256, 64)


def _type(n: int, b: int) -> G.AtdType:
    return G.atd_type(f"ATD{n}" if b == 256 else f"ATD{n}_64")


def _rel_rmse(w: np.ndarray, y: np.ndarray) -> float:
    w = w.astype(np.float64)
    return float(np.linalg.norm(w - y) / np.linalg.norm(w))


def _random_scales(rng, shape) -> np.ndarray:
    """Random finite fp16 values drawn from random bit patterns (all exponents, both signs)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint32).astype(np.uint16)
    s = bits.view(np.float16)
    return np.where(np.isfinite(s), s, np.float16(1.5)).astype(np.float16)


# ----------------------------------------------------------------------------- constants


def test_constants_table():
    assert len(G.ATD_TYPES) == 8
    ids = [t.ggml_type for t in G.ATD_TYPES]
    # format 2: ids 1000..1007, clear of mainline ggml (0..42) and ik_llama.cpp (134..399)
    assert ids == list(range(1000, 1008))
    assert G.ATD_FORMAT_VERSION == 2
    assert G.ATD_ACT_TYPE_ID == 1008 and G.GGML_TYPE_COUNT_PATCHED == 1009
    assert not set(ids) & set(G.ATD_V1_TYPE_IDS)
    for n in ALL_N:
        t = G.atd_type(f"ATD{n}")
        # N fp16 scales + N planes of ceil(256/5) = 52 base-3 bytes
        assert (t.ggml_type, t.planes, t.block_size, t.type_size) == (999 + n, n, 256, 54 * n)
        assert t.bpw == pytest.approx(1.6875 * n)
        assert t.plane_bytes == 52 and t.ggml_name == f"atd{n}"
        t64 = G.atd_type(f"atd{n}_64")
        # ceil(64/5) = 13 bytes per plane
        assert (t64.ggml_type, t64.planes, t64.block_size, t64.type_size) == (1003 + n, n, 64, 15 * n)
        assert t64.bpw == pytest.approx(1.875 * n)
        assert t64.plane_bytes == 13 and t64.ggml_name == f"atd{n}_64"
        # trits are stored at <= 1.7 bits each (the bound), 1.6 bits in every full byte
        assert 8 * t.plane_bytes / 256 <= 1.7 and 8 * t64.plane_bytes / 64 <= 1.7
        assert G.atd_type(t.ggml_type) is t and G.atd_type(t64) is t64
        assert G.atd_type(gguf.GGMLQuantizationType(t.ggml_type)) is t
    with pytest.raises(KeyError):
        G.atd_type("Q4_0")
    with pytest.raises(ValueError):
        G.atd_type(8)
    with pytest.raises(ValueError):
        G.atd_type(202)  # a format-1 id


def test_atd_type_for():
    assert G.atd_type_for(3, 4096).name == "ATD3"
    assert G.atd_type_for(2, 14336).name == "ATD2"
    assert G.atd_type_for(2, 576).name == "ATD2_64"
    assert G.atd_type_for(1, 1536).name == "ATD1"
    assert G.atd_type_for(4, 192).name == "ATD4_64"
    assert G.atd_type_for(3, 100) is None
    assert G.atd_type_for(3, 96) is None
    assert G.fallback_type_name_for(96) == "Q8_0"
    assert G.fallback_type_name_for(100) == "F16"
    with pytest.raises(ValueError):
        G.atd_type_for(5, 256)


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("n", ALL_N)
def test_pack_unpack_roundtrip(n, b):
    rng = np.random.default_rng(100 * n + b)
    nb = 37
    trits = rng.integers(-1, 2, size=(nb, n, b)).astype(np.int8)
    scales = _random_scales(rng, (nb, n))
    data = G.pack_blocks(trits, scales)
    t = _type(n, b)
    assert data.dtype == np.uint8 and data.shape == (nb, t.type_size)
    t2, s2 = G.unpack_blocks(data)  # type inferred from type_size
    assert np.array_equal(t2, trits)
    assert np.array_equal(s2.view(np.uint16), scales.view(np.uint16))  # bit-exact, incl. -0.0 and subnormals
    t3, s3 = G.unpack_blocks(data, t)
    assert np.array_equal(t3, trits) and np.array_equal(s3.view(np.uint16), scales.view(np.uint16))


def _spec_byte(codes5) -> int:
    """The stored byte of 5 codes (digit 0 most significant): ceil(256 v / 243), v their base-3 value."""
    v = 0
    for c in codes5:
        v = 3 * v + c
    return -(-256 * v // 243)


def _spec_digits(byte: int) -> list[int]:
    """The decoder's digits of a byte: x_0 = byte, code = (3 x) >> 8, x_{k+1} = 3 x mod 256."""
    out, x = [], byte
    for _ in range(5):
        out.append((3 * x) >> 8)
        x = (3 * x) & 0xFF
    return out


def test_base3_bytes_exhaustive():
    """Every 5-code combination encodes to a byte that decodes back to it; 13 byte values are unused."""
    seen = set()
    for v in range(243):
        codes = [(v // 3 ** (4 - k)) % 3 for k in range(5)]
        byte = _spec_byte(codes)
        assert 0 <= byte <= 255 and _spec_digits(byte) == codes
        seen.add(byte)
    assert len(seen) == 243
    unused = sorted(set(range(256)) - seen)
    assert unused == [1, 20, 40, 60, 79, 99, 119, 138, 158, 178, 197, 217, 237]
    for byte in unused:  # an unused byte is rejected by the reference decoder
        data = G.pack_blocks(np.zeros((1, 1, 64), np.int8), np.ones((1, 1), np.float16))
        data[0, 2] = byte
        with pytest.raises(ValueError, match="canonical"):
            G.unpack_blocks(data)


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("n", ALL_N)
def test_byte_layout_by_hand(n, b):
    """Build one block byte by byte from the spec and compare with pack_blocks."""
    rng = np.random.default_rng(7 + n + b)
    trits = rng.integers(-1, 2, size=(n, b))
    scales = [float(x) for x in rng.standard_normal(n)]
    S = -(-b // 5)  # bytes per plane
    expected = bytearray(2 * n + n * S)
    for i, s in enumerate(scales):
        expected[2 * i:2 * i + 2] = np.array([s], dtype="<f2").tobytes()  # fp16 d[i], little endian
    for i in range(n):
        for j in range(S):
            # digit k of byte j is element S*k + j; slots past the block hold code 0
            codes = [int(trits[i, S * k + j]) + 1 if S * k + j < b else 0 for k in range(5)]
            expected[2 * n + i * S + j] = _spec_byte(codes)
    got = G.pack_blocks(trits[None].astype(np.int8), np.array([scales], dtype=np.float16))
    assert bytes(got[0]) == bytes(expected)
    # and the decoder's view: digit k over a plane's bytes = elements S*k .. S*k + S - 1
    plane0 = bytes(expected[2 * n:2 * n + S])
    digits = np.array([_spec_digits(x) for x in plane0])  # (S, 5)
    for k in range(5):
        lo, hi = S * k, min(b, S * (k + 1))
        assert np.array_equal(digits[: hi - lo, k] - 1, trits[0, lo:hi])
        assert (digits[hi - lo:, k] == 0).all()  # padding slots


def test_unpack_rejects_malformed_blocks():
    data = G.pack_blocks(np.zeros((1, 2, 256), np.int8), np.ones((1, 2), np.float16))
    bad = data.copy()
    bad[0, 4 + 10] = 40  # never written by the encoder
    with pytest.raises(ValueError, match="canonical"):
        G.unpack_blocks(bad)
    with pytest.raises(ValueError):
        G.dequantize(bad, G.atd_type("ATD2"))
    with pytest.raises(ValueError, match="canonical"):
        G.dequantize_fast(bad, "ATD2")
    assert "canonical" in G.validate_blocks(bad, "ATD2")
    bad = data.copy()
    bad[0, 4 + 52 + 50] = _spec_byte([1, 1, 1, 1, 2])  # byte 50 of plane 1: its last digit is element 258
    with pytest.raises(ValueError, match="padding"):
        G.unpack_blocks(bad)
    with pytest.raises(ValueError, match="padding"):
        G.dequantize_fast(bad, "ATD2")
    assert "padding" in G.validate_blocks(bad, "ATD2")
    bad = data.copy()
    bad[0, 2:4] = np.array([np.inf], dtype="<f2").view(np.uint8)
    assert "non-finite" in G.validate_blocks(bad, "ATD2")
    with pytest.raises(ValueError, match="non-finite"):
        G.dequantize(bad, "ATD2")
    with pytest.raises(ValueError, match="non-finite"):
        G.dequantize_fast(bad, "ATD2")
    assert G.validate_blocks(data, "ATD2") is None


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        G.pack_blocks(np.full((1, 1, 256), 2, np.int8), np.ones((1, 1), np.float16))
    with pytest.raises(ValueError):
        G.pack_blocks(np.zeros((1, 1, 128), np.int8), np.ones((1, 1), np.float16))
    with pytest.raises(ValueError):
        G.pack_blocks(np.zeros((1, 1, 256), np.int8), np.ones((1, 1), np.float32))


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("n", ALL_N)
def test_dequantize_closed_form(n, b):
    rng = np.random.default_rng(n * 31 + b)
    rows, bpr = 3, 5
    nb = rows * bpr
    trits = rng.integers(-1, 2, size=(nb, n, b)).astype(np.int8)
    scales = (rng.standard_normal((nb, n)) * 3).astype(np.float16)
    data = G.pack_blocks(trits, scales).reshape(rows, -1)
    y = G.dequantize(data, _type(n, b))
    assert y.dtype == np.float32 and y.shape == (rows, bpr * b)
    # independent scalar closed form: y = 0.0f; y += fp16->fp32(d_i) * t_i in plane order, float32
    expect = np.empty((nb, b), dtype=np.float32)
    for blk in range(nb):
        for j in range(b):
            acc = np.float32(0.0)
            for i in range(n):
                acc = np.float32(acc + np.float32(scales[blk, i]) * np.float32(trits[blk, i, j]))
            expect[blk, j] = acc
    assert np.array_equal(y.view(np.uint32), expect.reshape(rows, -1).view(np.uint32))
    fast = G.dequantize_fast(data, _type(n, b))  # the C decoder where built
    assert np.array_equal(fast.view(np.uint32), expect.reshape(rows, -1).view(np.uint32))


# ----------------------------------------------------------------------------- fit quality


@pytest.fixture(scope="module")
def gauss1024():
    return np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(gauss1024):
    res = {}
    for n in ALL_N:
        t = _type(n, 256)
        res["grid", n] = _rel_rmse(gauss1024, G.dequantize(G.quantize(gauss1024, t), t))
    for n in (2, 3):
        t = _type(n, 256)
        res["greedy", n] = _rel_rmse(gauss1024, G.dequantize(G.quantize(gauss1024, t, "greedy"), t))
    return res


def test_grid_rmse_thresholds(fitted):
    assert fitted["grid", 1] <= 0.437
    assert fitted["grid", 2] <= 0.173
    assert fitted["grid", 3] <= 0.065
    assert fitted["grid", 4] < fitted["grid", 3]


def test_greedy_worse_than_grid(fitted):
    assert fitted["greedy", 2] > fitted["grid", 2]
    assert fitted["greedy", 3] > fitted["grid", 3]


def test_greedy_single_plane_is_optimal():
    """N=1 greedy must match a brute force over all thresholds k (up to fp16 rounding of alpha)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    data = G.quantize(w, G.atd_type("ATD1"), "greedy")
    y = G.dequantize(data, G.atd_type("ATD1"))
    for r in range(4):
        a = np.sort(np.abs(w[r].astype(np.float64)))[::-1]
        # top-k plane with its least-squares scale mean(top-k): error = var part + untouched tail
        best = min(float(np.sum((a[:k] - a[:k].mean()) ** 2) + np.sum(a[k:] ** 2)) for k in range(1, 257))
        err = float(np.sum((w[r].astype(np.float64) - y[r]) ** 2))
        assert err <= best * (1 + 1e-3)


@pytest.mark.parametrize("method", F.METHODS)
def test_fit_deterministic(method):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    t = G.atd_type("ATD3")
    a = G.quantize(w, t, method)
    b = G.quantize(w.copy(), t, method)
    assert np.array_equal(a, b)
    # chunking does not change the bytes (blocks are independent)
    c = G.quantize(w, t, method, chunk_weights=1000)
    assert np.array_equal(a, c)


@pytest.mark.parametrize("method", F.METHODS)
@pytest.mark.parametrize("n", ALL_N)
def test_zero_block(n, method):
    w = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    w[0, 256:] = 0.0
    w[1, :256] = -0.0
    t = _type(n, 256)
    data = G.quantize(w, t, method)
    trits, scales = G.unpack_blocks(data.reshape(-1, t.type_size))
    for blk in (1, 2):
        assert np.all(scales[blk].view(np.uint16) == 0)  # +0.0 scales
        assert np.all(trits[blk] == 0)
        raw = data.reshape(-1, t.type_size)[blk]
        # all codes 1: 11111 (base 3) = 121 -> byte 128; bytes 48..51 end in a padding 0: 11110 -> 127
        planes = raw[2 * n:].reshape(n, 52)
        assert _spec_byte([1, 1, 1, 1, 1]) == 128 and _spec_byte([1, 1, 1, 1, 0]) == 127
        assert np.all(planes[:, :48] == 128) and np.all(planes[:, 48:] == 127)
    y = G.dequantize(data, t)
    assert np.all(y[0, 256:] == 0) and np.all(y[1, :256] == 0)
    assert _rel_rmse(w[0, :256], y[0, :256]) < 0.5


def test_tiny_magnitudes_flush_to_zero():
    w = (np.random.default_rng(1).standard_normal((4, 256)) * 1e-30).astype(np.float32)
    t = G.atd_type("ATD3")
    data = G.quantize(w, t)
    trits, scales = G.unpack_blocks(data.reshape(-1, t.type_size))
    assert np.all(scales.view(np.uint16) == 0) and np.all(trits == 0)  # flush to canonical +0.0, t = 0
    assert np.all(G.dequantize(data, t) == 0)


def test_small_but_representable_magnitudes():
    """1e-3 scale: scales are normal fp16 numbers, the relative error matches the unit-scale fit."""
    w = np.random.default_rng(2).standard_normal((32, 256)).astype(np.float32)
    t = G.atd_type("ATD3")
    e1 = _rel_rmse(w, G.dequantize(G.quantize(w, t), t))
    ws = (w * np.float32(1e-3)).astype(np.float32)
    e2 = _rel_rmse(ws, G.dequantize(G.quantize(ws, t), t))
    assert abs(e1 - e2) < 0.01


@pytest.mark.parametrize("method", F.METHODS)
def test_huge_magnitudes_raise(method):
    w = (np.random.default_rng(1).standard_normal((4, 256)) * 1e30).astype(np.float32)
    with pytest.raises(ValueError, match="fp16"):
        G.quantize(w, G.atd_type("ATD2"), method)
    big = np.full((1, 256), 3.0e38, dtype=np.float32)
    with pytest.raises(ValueError, match="fp16"):
        G.quantize(big, G.atd_type("ATD1"), method)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_raise(bad):
    w = np.ones((2, 256), dtype=np.float32)
    w[1, 17] = bad
    with pytest.raises(ValueError, match="non-finite"):
        G.quantize(w, G.atd_type("ATD2"))


def test_bad_importance_raises():
    w = np.ones((2, 256), dtype=np.float32)
    t = G.atd_type("ATD2")
    for imp in (np.full(256, np.nan), np.full(256, np.inf), -np.ones(256), np.ones(128)):
        with pytest.raises(ValueError, match="importance"):
            G.quantize(w, t, importance=imp)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        G.quantize(np.ones((2, 100), np.float32), G.atd_type("ATD2"))
    with pytest.raises(ValueError):
        G.quantize(np.ones(256, np.float32), G.atd_type("ATD2"))
    with pytest.raises(ValueError):
        G.quantize(np.ones((2, 256), np.float32), G.atd_type("ATD2"), method="magic")


@pytest.mark.parametrize("method", F.METHODS)
def test_importance_weighting(method):
    rng = np.random.default_rng(9)
    rows, cols = 128, 512
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    imp = np.exp(rng.standard_normal(cols) * 1.5).astype(np.float32)
    t = G.atd_type("ATD2")
    plain = G.quantize(w, t, method)
    weighted = G.quantize(w, t, method, importance=imp)
    assert not np.array_equal(plain, weighted)

    def werr(data):
        d = w.astype(np.float64) - G.dequantize(data, t)
        return float(np.sum(imp[None, :] * d * d))

    assert werr(weighted) < werr(plain)
    # uniform importance is the same as no importance (bit for bit)
    assert np.array_equal(G.quantize(w, t, method, importance=np.ones(cols, np.float32)), plain)


def test_block64_family_576_wide():
    w = np.random.default_rng(4).standard_normal((96, 576)).astype(np.float32)
    for n in ALL_N:
        t = G.atd_type_for(n, 576)
        assert t.block_size == 64
        data = G.quantize(w, t)
        assert data.shape == (96, 9 * t.type_size)
        e = _rel_rmse(w, G.dequantize(data, t))
        assert e < {1: 0.45, 2: 0.18, 3: 0.07, 4: 0.03}[n]


# ----------------------------------------------------------------------------- scalar reference


def _ref_fit_block(w, h, n, K=F.DEFAULT_CANDIDATES, iters=F.DEFAULT_ITERS):
    """Scalar, loop-by-loop re-implementation of the grid fit from docs/atd-format.md.

    Python floats are IEEE doubles evaluated exactly as written (no FMA), like C with
    -ffp-contract=off. Returns (trits[N][B], fp16 scale bits[N]).
    """
    B = len(w)
    w = [float(x) for x in w]
    hh = [1.0] * B if (h is None or all(x == 0 for x in h)) else [float(x) for x in h]
    M = (3 ** n - 1) // 2
    L = 3 ** n
    tab = [[(c // 3 ** (n - 1 - i)) % 3 - 1 for i in range(n)] for c in range(L)]

    def assign(levels):
        order = sorted(range(L), key=lambda c: (levels[c], c))
        mids = [(levels[order[k]] + levels[order[k + 1]]) * 0.5 for k in range(L - 1)]
        out = [[0] * B for _ in range(n)]
        for j in range(B):
            p = sum(1 for m in mids if m < w[j])
            for i in range(n):
                out[i][j] = tab[order[p]][i]
        return out

    amax = max(abs(x) for x in w)
    if amax == 0.0:
        alpha = [0.0] * n
        trits = [[0] * B for _ in range(n)]
    else:
        base = amax / M
        best = None
        for k in range(K):
            f = 0.30 + (0.70 * k) / (K - 1)
            dk = base * f
            q = [max(-M, min(M, round(x / dk))) for x in w]  # round(): half to even
            swq = 0.0
            sqq = 0.0
            for j in range(B):
                swq += (hh[j] * w[j]) * q[j]
                sqq += (hh[j] * q[j]) * q[j]
            ds = swq / sqq if sqq > 0.0 else dk
            err = 0.0
            for j in range(B):
                e = w[j] - ds * q[j]
                err += (hh[j] * e) * e
            if best is None or err < best[0]:
                best = (err, q, ds)
        _, q, ds = best
        trits = [[0] * B for _ in range(n)]
        for j in range(B):
            u = q[j] + M
            for i in range(n - 1, -1, -1):
                trits[i][j] = u % 3 - 1
                u //= 3
        alpha = [float(3 ** (n - 1 - i)) * ds for i in range(n)]
        for _ in range(iters):
            Gm = [[0.0] * n for _ in range(n)]
            rhs = [0.0] * n
            for a in range(n):
                for b in range(a, n):
                    acc = 0.0
                    for j in range(B):
                        acc += (hh[j] * trits[a][j]) * trits[b][j]
                    Gm[a][b] = acc
                acc = 0.0
                for j in range(B):
                    acc += (hh[j] * w[j]) * trits[a][j]
                rhs[a] = acc
            ok = True
            D = [0.0] * n
            Lm = [[0.0] * n for _ in range(n)]
            for j in range(n):
                acc = Gm[j][j]
                for k in range(j):
                    acc = acc - (Lm[j][k] * Lm[j][k]) * D[k]
                if not (Gm[j][j] > 0.0 and acc > F.SINGULAR_RTOL * Gm[j][j]):
                    ok = False
                    break
                D[j] = acc
                for i in range(j + 1, n):
                    acc2 = Gm[j][i]
                    for k in range(j):
                        acc2 = acc2 - (Lm[i][k] * Lm[j][k]) * D[k]
                    Lm[i][j] = acc2 / D[j]
            if ok:
                z = [0.0] * n
                for i in range(n):
                    acc = rhs[i]
                    for k in range(i):
                        acc = acc - Lm[i][k] * z[k]
                    z[i] = acc
                y = [z[i] / D[i] for i in range(n)]
                sol = [0.0] * n
                for i in range(n - 1, -1, -1):
                    acc = y[i]
                    for k in range(i + 1, n):
                        acc = acc - Lm[k][i] * sol[k]
                    sol[i] = acc
                if all(np.isfinite(sol)):
                    alpha = sol
            levels = []
            for c in range(L):
                acc = 0.0
                for i in range(n):
                    acc = acc + alpha[i] * tab[c][i]
                levels.append(acc)
            trits = assign(levels)
    s16 = [np.float16(np.float32(a)) for a in alpha]
    s16 = [np.float16(0.0) if s == 0 else s for s in s16]  # -0.0 -> +0.0
    levels = []
    for c in range(L):
        acc = np.float32(0.0)
        for i in range(n):
            acc = np.float32(acc + np.float32(s16[i]) * np.float32(tab[c][i]))
        levels.append(float(acc))
    trits = assign(levels)
    for i in range(n):
        if s16[i] == 0:
            trits[i] = [0] * B
    return trits, [int(np.array(s, dtype=np.float16).view(np.uint16)) for s in s16]


def _special_blocks(b: int, rng) -> np.ndarray:
    base = rng.standard_normal(b)
    blocks = [
        base,                                              # plain Gaussian
        rng.standard_t(2, size=b),                         # heavy tails
        np.round(base * 2) / 2,                            # many exact ties / repeated values
        np.where(rng.random(b) < 0.9, 0.0, base),          # mostly zeros
        3.0 * rng.integers(-1, 2, size=b),                 # values on a 3d grid: empty lower planes
        np.concatenate([np.full(b // 2, 0.25), np.full(b - b // 2, -0.25)]),  # two values
    ]
    return np.stack(blocks).astype(np.float32)


@pytest.mark.parametrize("b", BLOCK_SIZES)
@pytest.mark.parametrize("n", ALL_N)
def test_grid_matches_scalar_reference(n, b):
    rng = np.random.default_rng(1000 + 10 * n + b)
    blocks = _special_blocks(b, rng)
    if b == 256:
        blocks = blocks[[0, 2, 4]]  # keep the slow scalar loop short
    trits, scales = F.fit_blocks(blocks, n, "grid")
    for k, blk in enumerate(blocks):
        rt, rs = _ref_fit_block(blk, None, n)
        assert scales[k].view(np.uint16).tolist() == rs, f"block {k}"
        assert trits[k].tolist() == rt, f"block {k}"


@pytest.mark.parametrize("n", (2, 3))
def test_grid_matches_scalar_reference_with_importance(n):
    b = 64
    rng = np.random.default_rng(77 + n)
    blocks = _special_blocks(b, rng)[:4]
    imp = np.exp(rng.standard_normal((len(blocks), b)) * 2).astype(np.float32)
    imp[1, :10] = 0.0
    imp[2] = 0.0  # all-zero importance -> fitted unweighted
    trits, scales = F.fit_blocks(blocks, n, "grid", imp)
    for k, blk in enumerate(blocks):
        rt, rs = _ref_fit_block(blk, imp[k], n)
        assert scales[k].view(np.uint16).tolist() == rs, f"block {k}"
        assert trits[k].tolist() == rt, f"block {k}"
    t0, s0 = F.fit_blocks(blocks[2:3], n, "grid")
    assert np.array_equal(t0[0], trits[2]) and np.array_equal(s0[0].view(np.uint16), scales[2].view(np.uint16))


def test_stored_trits_are_nearest_levels():
    """After the final reassignment every weight decodes to its nearest representable level."""
    rng = np.random.default_rng(21)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    t = G.atd_type("ATD2")
    data = G.quantize(w, t)
    _, scales = G.unpack_blocks(data.reshape(-1, t.type_size))
    y = G.dequantize(data, t).reshape(-1, 256)
    wb = w.reshape(-1, 256).astype(np.float64)
    for blk in range(wb.shape[0]):
        s = scales[blk].astype(np.float32)
        levels = np.array([np.float32(np.float32(s[0] * a) + s[1] * c)
                           for a in (-1, 0, 1) for c in (-1, 0, 1)], dtype=np.float64)
        best = np.min(np.abs(wb[blk][:, None] - levels[None, :]), axis=1)
        assert np.array_equal(np.abs(wb[blk] - y[blk]), best)


# ----------------------------------------------------------------------------- gguf-py registration


def test_register_enum_and_sizes():
    G.register_with_gguf()
    G.register_with_gguf()  # idempotent
    Q = gguf.GGMLQuantizationType
    assert Q(1000).name == "ATD1"
    assert Q(1003).name == "ATD4"
    assert Q(1004).name == "ATD1_64" and Q(1007).name == "ATD4_64"
    assert Q["ATD3"] is Q(1002) and Q.ATD3 == 1002
    assert isinstance(Q(1002), Q) and int(Q(1002)) == 1002
    for v1_id in G.ATD_V1_TYPE_IDS:  # format 1's ids are not registered: such files are refused
        with pytest.raises(ValueError):
            Q(v1_id)
    assert gguf.GGML_QUANT_SIZES is gguf.constants.GGML_QUANT_SIZES
    for t in G.ATD_TYPES:
        assert gguf.GGML_QUANT_SIZES[Q(t.ggml_type)] == (t.block_size, t.type_size)
        assert G.gguf_qtype(t) is Q(t.ggml_type)
    assert Q(8).name == "Q8_0"  # stock members untouched


@pytest.mark.parametrize("name", ["ATD3", "ATD2_64"])
def test_gguf_quants_roundtrip(name):
    t = G.atd_type(name)
    qt = gguf.GGMLQuantizationType(t.ggml_type)
    cols = 512 if t.block_size == 256 else 576
    w = np.random.default_rng(8).standard_normal((40, cols)).astype(np.float32)
    ours = G.quantize(w, t)
    theirs = gguf.quants.quantize(w, qt)
    assert theirs.dtype == np.uint8 and np.array_equal(theirs, ours)
    assert np.array_equal(gguf.quants.dequantize(ours, qt), G.dequantize(ours, t))


def test_gguf_writer_reader_roundtrip(tmp_path):
    t = G.atd_type("ATD2")
    t64 = G.atd_type("ATD3_64")
    rng = np.random.default_rng(12)
    w = rng.standard_normal((24, 512)).astype(np.float32)
    w64 = rng.standard_normal((16, 576)).astype(np.float32)
    q, q64 = G.quantize(w, t), G.quantize(w64, t64)
    path = tmp_path / "atd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType(t.ggml_type))
    writer.add_tensor("blk.0.attn_q.weight", q64, raw_dtype=gguf.GGMLQuantizationType(t64.ggml_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    tensors = {x.name: x for x in reader.tensors}
    for name, tt, data, shape in (("blk.0.ffn_up.weight", t, q, w.shape), ("blk.0.attn_q.weight", t64, q64, w64.shape)):
        rt = tensors[name]
        assert rt.tensor_type == tt.ggml_type and rt.tensor_type.name == tt.name
        assert list(rt.shape) == [shape[1], shape[0]]  # ne0 = row length (elements), ne1 = rows
        assert rt.n_elements == shape[0] * shape[1]
        assert rt.n_bytes == data.nbytes
        assert np.array_equal(np.asarray(rt.data), data)
        deq = gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type)
        assert deq.shape == shape
        assert np.array_equal(deq, G.dequantize(data, tt))
