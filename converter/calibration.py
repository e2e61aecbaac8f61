"""Layer-by-layer calibration of a Llama checkpoint: Hessians for GPTQ, imatrix statistics, and
the packed ATD tensors of sequential GPTQ.

API::

    tokenize_calibration(text, model_dir, *, n_ctx=512, max_chunks=32) -> (n_chunks, n_ctx) int64
        The checkpoint's tokenizer.json (`tokenizers`), no special tokens inside the text; each
        chunk starts with BOS when the model adds one (the GGUF's add_bos flag, as llama-imatrix
        does), then n_ctx - 1 (or n_ctx) consecutive text tokens. Too little text: ValueError.
    LayerwiseCalibration(model_dir, tokens, quantizer=None)
        .encoded(gguf_name) -> (rows, nbytes) uint8   packed ATD bytes in the GGUF layout
        .mean_sq(gguf_name) -> (cols,) float32        mean x² per input column (imatrix-like)
        .run_layer() -> int                           advance one decoder layer (done lazily by
                                                      encoded/mean_sq); .hidden: (n_chunks, n_ctx, n_embd)
        .statistics() -> {gguf_name: mean x²}          every layer run: the whole imatrix
    GptqQuantizer(atype_for, *, damp="auto", act_order=True, block_cols=128)
        The quantizer callback for GPTQ; atype_for(gguf_name, (rows, cols)) -> ATD type or None
        (None: the tensor stays float in the forward pass and is not encoded here).
        damp="auto" is auto_damp(cols, n_tokens) = max(0.01, cols / n_tokens) (see there).
    calibrate(model_dir, text, atype_for, *, n_ctx=512, max_chunks=32, damp="auto", act_order=True,
              block_cols=128) -> LayerwiseCalibration      tokenize + GptqQuantizer + LayerwiseCalibration

A quantizer is any callable (gguf_name, weight (rows, cols) float32 in HF row order, InputStats)
-> QuantizedTensor | None; quantizer=None runs the plain (unquantized) model and only collects
statistics, which is what a budget planner wants before it picks per-tensor plane counts.

Sequential GPTQ, as in the paper: per layer, q/k/v are quantized on the Hessian of their shared
input; the attention output is then computed with the quantized q/k/v and feeds o's Hessian;
o is quantized and the residual stream updated with it; gate/up are quantized on the post-norm
input, down on the SwiGLU activations of the quantized gate/up; the layer's output (with every
quantized weight) is the next layer's input. So later layers see earlier quantization errors.

Memory: one layer's weights (float32), one input's Hessian at a time (float64, the largest
n_ff² = 1.6 GB for 14336, plus its factorization, see gguf_types.gptq) and the layer's
activations, the hidden states of the calibration tokens (n_chunks · n_ctx · n_embd float32), and
the packed tensors not yet consumed. The embedding rows are gathered from the memory-mapped
checkpoint (the table is never loaded whole). Measured on a Llama-3-8B-shaped layer (4096 /
14336, GQA 32/8) with 4 chunks of 512 tokens, ATD3: peak RSS 5.6 GiB, 100 s per layer on 2 idle
cores (60 s of it ffn_down: H, its factorization, GPTQ).

End to end (SmolLM2-135M, all linears ATD, perplexity on 4k held-out tokens of other text;
F32 10.16): N=2: imatrix fit 16.5 → sequential GPTQ 14.9 with 4k calibration tokens (16.1 → 13.6
with 16k); N=3: 10.46 → 10.48 (16k: 10.38 → 10.38), i.e. no gain over the imatrix fit at 3 planes.

Why torch and not llama.cpp runs the forward pass: GPTQ needs the full Σ xᵀx of every linear
input (llama-imatrix only gives the diagonal), a layer's weights must be replaced by their
quantized values before the next linear of the same layer runs, and a GGUF would have to be
rewritten and reloaded for every step. The float32 torch forward is ~100 lines, matches
transformers to float32 rounding (tests/test_gptq.py) and uses the HF weight layout directly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

import gguf_types
from gguf_types.gptq import (DEFAULT_ACT_ORDER, DEFAULT_BLOCK_COLS, DEFAULT_DAMP, PreparedHessian, gptq_quantize,
                             prepare_hessian)

from .checkpoint import Checkpoint, TensorRef
from .errors import AtdError
from .llama import LlamaModel, llama3_rope_factors, permute_qk

DEFAULT_CTX = 512
DEFAULT_MAX_CHUNKS = 32
_LAYER = re.compile(r"^blk\.(\d+)\.")
# the linears of a decoder layer, in the order sequential GPTQ quantizes them
_ATTN_IN = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


class CalibrationError(AtdError, ValueError):
    """Unusable calibration input (a ValueError, shown by the CLI as one line)."""


def _torch():
    try:
        import torch
    except ImportError:
        raise CalibrationError("--calibration runs the model in torch, which is not installed "
                               "(pip install torch; `make install` installs the CPU wheel)") from None
    return torch


# ----------------------------------------------------------------------------- tokens


def tokenize_calibration(text: str, model_dir: str | Path, *, n_ctx: int = DEFAULT_CTX,
                         max_chunks: int = DEFAULT_MAX_CHUNKS) -> np.ndarray:
    """(n_chunks, n_ctx) int64 token ids of `text` (see the module docstring)."""
    from tokenizers import Tokenizer

    from .vocab import SpecialVocab

    if n_ctx < 2 or max_chunks < 1:
        raise CalibrationError(f"need n_ctx >= 2 and max_chunks >= 1, got {n_ctx} and {max_chunks}")
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CalibrationError(f"{model_dir}: no tokenizer.json to tokenize the calibration text with")
    if not text or not text.strip():
        raise CalibrationError("the calibration text is empty")
    ids = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    special = SpecialVocab(model_dir, load_merges=False)
    bos = special.special_token_ids.get("bos") if special.add_special_token.get("bos") else None
    per_chunk = n_ctx - (bos is not None)
    n_chunks = min(len(ids) // per_chunk, max_chunks)
    if n_chunks == 0:
        raise CalibrationError(f"the calibration text has {len(ids)} tokens; one chunk of n_ctx={n_ctx} "
                               f"needs {per_chunk}")
    body = np.asarray(ids[: n_chunks * per_chunk], dtype=np.int64).reshape(n_chunks, per_chunk)
    if bos is None:
        return body
    return np.concatenate([np.full((n_chunks, 1), bos, dtype=np.int64), body], axis=1)


# ----------------------------------------------------------------------------- statistics


class InputStats:
    """The calibration activations of one linear input and their statistics: mean x² per column
    (always) and H = Σ xᵀx (float64, computed on first use, so a statistics-only pass or a tensor
    the quantizer leaves alone never pays the tokens · cols² products)."""

    _SLICE = 512  # tokens per float32 product; the slices are summed in float64

    def __init__(self, x) -> None:
        """x: (..., cols) float32 torch activations (kept until this object is dropped)."""
        self._x = x.reshape(-1, x.shape[-1])
        self.n_tokens = int(self._x.shape[0])
        self._hessian: np.ndarray | None = None
        self._prepared: dict[tuple[float, bool], PreparedHessian] = {}
        sq = np.zeros(self._x.shape[1], dtype=np.float64)
        for xs in self._slices():
            sq += (xs.double() ** 2).sum(0).numpy()
        self._mean_sq = (sq / max(self.n_tokens, 1)).astype(np.float32)

    def _slices(self):
        return (self._x[t0:t0 + self._SLICE] for t0 in range(0, self.n_tokens, self._SLICE))

    @property
    def hessian(self) -> np.ndarray:
        """H = Σ xᵀx over the calibration tokens, (cols, cols) float64."""
        if self._hessian is None:
            torch = _torch()
            h = torch.zeros((self._x.shape[1],) * 2, dtype=torch.float64)
            for xs in self._slices():
                h += (xs.T @ xs).double()
            self._hessian = h.numpy()
        return self._hessian

    def mean_sq(self) -> np.ndarray:
        """Mean x² per input column (llama-imatrix's statistic)."""
        return self._mean_sq

    def prepared(self, damp: float, act_order: bool) -> PreparedHessian:
        """The factorized Hessian, computed once per (damp, act_order) and shared (q/k/v, gate/up)."""
        key = (float(damp), bool(act_order))
        if key not in self._prepared:
            self._prepared[key] = prepare_hessian(self.hessian, damp=damp, act_order=act_order)
        return self._prepared[key]


@dataclass(frozen=True)
class QuantizedTensor:
    data: np.ndarray             # (rows, nbytes) uint8 in HF row order
    atype: gguf_types.AtdType


class Quantizer(Protocol):
    def __call__(self, gguf_name: str, weight: np.ndarray, stats: InputStats) -> QuantizedTensor | None: ...


AtypeFor = Callable[[str, tuple[int, int]], "gguf_types.AtdType | str | int | None"]


def auto_damp(cols: int, n_tokens: int) -> float:
    """GPTQ damping for a calibration set of n_tokens: max(0.01, cols / n_tokens).

    0.01 is the paper's value (≳ 100 tokens per column). With fewer tokens per column H is
    poorly determined (rank ≤ n_tokens) and GPTQ overfits the calibration text. On SmolLM2
    (Hessian-weighted error on held-out text; q_proj and down_proj at 2k and 8k calibration
    tokens, o/gate/up at 8k) the damp with the lowest held-out error was ≈ cols / n_tokens:
    0.1 at 14 tokens per column, 0.3 at 4-5, ~1 at 1.3; at damp 0.01 and 1.3 tokens per
    column GPTQ was 1.3-1.9x worse than the plain fit on held-out text.
    """
    return max(DEFAULT_DAMP, cols / max(n_tokens, 1))


class GptqQuantizer:
    """Quantizer callback: GPTQ with the ATD type atype_for(gguf_name, shape) (None: keep float).

    damp: a number, or "auto" (auto_damp(cols, n_tokens) per input)."""

    def __init__(self, atype_for: AtypeFor, *, damp: float | str = "auto", act_order: bool = DEFAULT_ACT_ORDER,
                 block_cols: int = DEFAULT_BLOCK_COLS) -> None:
        if damp != "auto" and not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
            raise CalibrationError(f"damp must be 'auto' or a finite number >= 0, got {damp!r}")
        self.atype_for, self.damp, self.act_order, self.block_cols = atype_for, damp, act_order, block_cols

    def __call__(self, gguf_name: str, weight: np.ndarray, stats: InputStats) -> QuantizedTensor | None:
        atype = self.atype_for(gguf_name, tuple(weight.shape))
        if atype is None:
            return None
        atype = gguf_types.atd_type(atype)
        damp = auto_damp(weight.shape[1], stats.n_tokens) if self.damp == "auto" else float(self.damp)
        data = gptq_quantize(weight, stats.prepared(damp, self.act_order), atype, block_cols=self.block_cols)
        return QuantizedTensor(data, atype)


# ----------------------------------------------------------------------------- the forward pass


class _LlamaMath:
    """The LlamaForCausalLM decoder math in float32 torch, HF weight layout."""

    def __init__(self, model: LlamaModel, n_ctx: int):
        torch = _torch()
        p = model.params
        self.p = p
        self.eps = 1e-6 if p.rms_eps is None else float(p.rms_eps)
        rope = p.rope
        theta = float(rope.get("rope_theta", 10000.0))
        dim = p.head_dim
        # as transformers: base ** (arange(0, dim, 2) / dim) in float32
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if rope.get("rope_type") == "llama3":  # the same factors llama.cpp gets as rope_freqs.weight
            inv_freq = inv_freq / torch.from_numpy(llama3_rope_factors(p))
        elif rope.get("rope_type") == "linear":
            inv_freq = inv_freq / float(rope.get("factor", 1.0))
        freqs = torch.arange(n_ctx, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()  # (n_ctx, head_dim)
        self.mask = torch.full((n_ctx, n_ctx), float("-inf")).triu(1)

    def rms_norm(self, x, weight):
        torch = _torch()
        var = x.pow(2).mean(-1, keepdim=True)
        return torch.from_numpy(weight) * (x * torch.rsqrt(var + self.eps))

    def _rope(self, x):  # x: (C, heads, T, head_dim), HF rotate-half layout
        torch = _torch()
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos + rot * self.sin

    def attention(self, q, k, v):
        """q (C, T, H·d), k/v (C, T, Hkv·d) -> (C, T, H·d): causal GQA softmax attention."""
        torch = _torch()
        p = self.p
        C, T, _ = q.shape
        q = self._rope(q.view(C, T, p.n_head, p.head_dim).transpose(1, 2))
        k = self._rope(k.view(C, T, p.n_head_kv, p.head_dim).transpose(1, 2))
        v = v.view(C, T, p.n_head_kv, p.head_dim).transpose(1, 2)
        groups = p.n_head // p.n_head_kv
        out = torch.empty((C, p.n_head, T, p.head_dim), dtype=torch.float32)
        for c in range(C):  # one chunk at a time bounds the (heads, T, T) scores
            kc = k[c].repeat_interleave(groups, dim=0)
            vc = v[c].repeat_interleave(groups, dim=0)
            scores = (q[c] @ kc.transpose(-1, -2)) * (p.head_dim ** -0.5) + self.mask[:T, :T]
            out[c] = torch.softmax(scores, dim=-1) @ vc
        return out.transpose(1, 2).reshape(C, T, p.n_head * p.head_dim)


class LayerwiseCalibration:
    """Runs the decoder one layer at a time over the calibration tokens (see the module docstring)."""

    def __init__(self, model_dir: str | Path, tokens: np.ndarray, quantizer: Quantizer | None = None):
        torch = _torch()
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise CalibrationError(f"tokens must be a non-empty (n_chunks, n_ctx) integer array, got {tokens.shape}")
        self.model = LlamaModel(Checkpoint(Path(model_dir)))
        p = self.model.params
        if tokens.min() < 0 or tokens.max() >= p.n_vocab:
            raise CalibrationError(f"token ids must be in [0, {p.n_vocab})")
        self.quantizer = quantizer
        self._math = _LlamaMath(self.model, tokens.shape[1])
        self.hidden = torch.from_numpy(self._embedding_rows(tokens))  # (C, T, n_embd) float32
        self.next_layer = 0
        self._encoded: dict[str, np.ndarray] = {}
        self._mean_sq: dict[str, np.ndarray] = {}

    # -- public

    def encoded(self, gguf_name: str) -> np.ndarray:
        """Packed ATD bytes (rows, nbytes) of a linear in the GGUF layout; runs layers as needed and
        releases the tensor (a second call for the same name raises KeyError)."""
        self._run_until(gguf_name)
        try:
            return self._encoded.pop(gguf_name)
        except KeyError:
            raise KeyError(f"{gguf_name}: not encoded by the calibration (not quantized, or already taken)") from None

    def mean_sq(self, gguf_name: str) -> np.ndarray:
        """Mean x² per input column of a linear (imatrix statistic); runs layers as needed."""
        self._run_until(gguf_name)
        try:
            return self._mean_sq[gguf_name]
        except KeyError:
            raise KeyError(f"{gguf_name}: no statistics (not a linear weight of this model)") from None

    def statistics(self) -> dict[str, np.ndarray]:
        """Runs every remaining layer; the mean x² per input column of every linear (the imatrix)."""
        while self.next_layer < self.model.params.n_layer:
            self.run_layer()
        return dict(self._mean_sq)

    def run_layer(self) -> int:
        """Runs the next decoder layer; returns its index."""
        i = self.next_layer
        if i >= self.model.params.n_layer:
            raise IndexError("all layers have run")
        self.hidden = self._layer(i, self.hidden)
        self.next_layer = i + 1
        return i

    # -- internals

    def _run_until(self, gguf_name: str) -> None:
        m = _LAYER.match(gguf_name)
        if m is None or int(m.group(1)) >= self.model.params.n_layer:
            raise KeyError(f"{gguf_name}: not a decoder-layer tensor of this model")
        while self.next_layer <= int(m.group(1)):
            self.run_layer()

    def _ref(self, hf_name: str) -> TensorRef:
        return self.model.checkpoint.tensors[hf_name]

    def _embedding_rows(self, tokens: np.ndarray) -> np.ndarray:
        ref = self._ref("model.embed_tokens.weight")
        raw = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}[ref.dtype]  # the dtypes Checkpoint accepts
        table = ref.local.mmap_bytes().view(raw).reshape(ref.shape)
        rows = table[tokens.reshape(-1)]
        rows = (rows.astype(np.uint32) << 16).view(np.float32) if ref.dtype == "BF16" else rows.astype(np.float32)
        return rows.reshape(*tokens.shape, ref.shape[1])

    def _linear(self, layer: int, hf_leaf: str, stats: InputStats):
        """The weight (torch, HF layout) the forward pass uses: quantized+dequantized when the
        quantizer takes it (the packed GGUF-layout bytes are kept for encoded())."""
        torch = _torch()
        sub = "self_attn" if hf_leaf in _ATTN_IN + ("o_proj",) else "mlp"
        hf_name = f"model.layers.{layer}.{sub}.{hf_leaf}.weight"
        gguf_name = self.model.name_map.get_name(hf_name, try_suffixes=(".weight",))
        self._mean_sq[gguf_name] = stats.mean_sq()
        w = self._ref(hf_name).load()
        q = None if self.quantizer is None else self.quantizer(gguf_name, w, stats)
        if q is None:
            return torch.from_numpy(w)
        p = self.model.params
        heads = {"q_proj": p.n_head, "k_proj": p.n_head_kv}.get(hf_leaf)
        # rows are quantized independently, so permuting the packed rows = quantizing the GGUF rows
        self._encoded[gguf_name] = permute_qk(q.data, heads) if heads else q.data
        return torch.from_numpy(gguf_types.dequantize(q.data, q.atype))

    def _layer(self, i: int, x):
        torch = _torch()
        m = self._math
        pre = f"model.layers.{i}."
        a_in = m.rms_norm(x, self._ref(pre + "input_layernorm.weight").load())
        stats = InputStats(a_in)
        wq, wk, wv = (self._linear(i, leaf, stats) for leaf in _ATTN_IN)
        attn = m.attention(a_in @ wq.T, a_in @ wk.T, a_in @ wv.T)
        del wq, wk, wv, a_in, stats
        stats = InputStats(attn)
        h = x + attn @ self._linear(i, "o_proj", stats).T
        del attn, stats
        m_in = m.rms_norm(h, self._ref(pre + "post_attention_layernorm.weight").load())
        stats = InputStats(m_in)
        wg, wu = (self._linear(i, leaf, stats) for leaf in _MLP_IN)
        act = torch.nn.functional.silu(m_in @ wg.T) * (m_in @ wu.T)
        del wg, wu, m_in, stats
        stats = InputStats(act)
        return h + act @ self._linear(i, "down_proj", stats).T


def calibrate(model_dir: str | Path, text: str, atype_for: AtypeFor, *, n_ctx: int = DEFAULT_CTX,
              max_chunks: int = DEFAULT_MAX_CHUNKS, damp: float | str = "auto",
              act_order: bool = DEFAULT_ACT_ORDER, block_cols: int = DEFAULT_BLOCK_COLS) -> LayerwiseCalibration:
    """Sequential GPTQ over the checkpoint with `text` as calibration data (lazy: nothing runs yet)."""
    tokens = tokenize_calibration(text, model_dir, n_ctx=n_ctx, max_chunks=max_chunks)
    quantizer = GptqQuantizer(atype_for, damp=damp, act_order=act_order, block_cols=block_cols)
    return LayerwiseCalibration(model_dir, tokens, quantizer)
