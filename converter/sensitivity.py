"""Measured sensitivities: how much each tensor's quantization error raises the loss, from the
calibration text (an empirical-Fisher estimate), for the size planner (converter.budget).

API::

    measure_sensitivity(model_dir, tokens, *, fisher_chunks=FISHER_CHUNKS, progress=None) -> Sensitivities
        One forward pass over all of `tokens` ((n_chunks, n_ctx), converter.calibration's
        tokenize_calibration) collects the imatrix-like mean x² of every linear input; a backward
        pass over the first `fisher_chunks` chunks gives the per-channel gradient statistics.
    Sensitivities
        .row_weights(gguf_name) -> (rows,) float64 | None   loss per unit noise-to-signal ratio of
                                                            each output row (GGUF row order)
        .sensitivity(gguf_name) -> float                     their sum (0.0 for tensors outside the
                                                            measurement: norms, rope_freqs)
        .importance: {gguf_name: mean x²}                    the forward pass's statistics
        .channels: {gguf_name: ChannelStats}                 E[y²], E[g²], E[y²g²] per output channel

The estimate (why). A linear's output y gets quantization noise ε; with g = ∂loss/∂y the
second-order (empirical-Fisher) expansion of the loss is ΔL ≈ ½ E[(Σ_i g_i ε_i)²] ≈ ½ Σ_i E[g_i² ε_i²]
(the channels' noise independent of each other). The planner knows each output row's
noise-to-signal ratio r_i; taking the noise at every position proportional to that position's own
signal, ε_i² ≈ r_i y_i²:

    ΔL ≈ Σ_i w_i r_i,    w_i = ½ E[y_i² g_i²].

Not ½ E[y_i²] E[g_i²] (noise independent of the gradient): signal and gradient are correlated
across positions -- the positions with massive activations (the first token, attention sinks) have
large outputs and small gradients -- and the product of the means then overstates some tensors
by up to 10x. Measured on smollm2-135m-continuous (64 tensors of every role in layers 0, 1, 5,
10, 15, 20, 25, 28, 29 plus token_embd, each alone at ATD1, KL to the unquantized model on 1k
held-out tokens; calibration 4 x 512 tokens): Spearman rank correlation of predicted and measured
loss 0.88 with E[y²g²], 0.76 with E[y²]E[g²], 0.57 with one scalar per tensor (below); the hand
table, fitted on this very model, 0.84; the noise-to-signal ratio alone 0.35. Both E[y²] and E[g²]
are recorded too (ChannelStats).

loss = the mean cross-entropy of the next tokens of the calibration text, so ΔL is in nats per
token, the unit the hand table in converter.budget approximates (KL to the unquantized model;
the prediction is within x1.3 of it in the median). g is the gradient of the summed loss at each
position (it includes the effect on later positions through attention); expectations are sums
over positions per predicted token, except E[y²] (the mean over all positions).

* The output matrix (lm_head, or the tied embedding in that role): y = the logits, one channel per
  vocabulary row, g = softmax - one-hot of the next token.
* token_embd as the input lookup: y = the embedding rows of the tokens, one channel per hidden
  dimension, g = ∂loss/∂(layer 0's input). Its noise is per vocabulary row in the planner (a row's
  error enters the hidden channels of that token), so this side is spread evenly over the rows:
  Σ_j w_j / n_vocab each. A tied embedding adds both sides row by row.

Per-row weights, not one scalar per tensor: the planner estimates Σ_i w_i r_i on its row sample as
(Σ_all w) · (Σ_sampled w_i r_i / Σ_sampled w_i) (converter.budget.estimate_from_rows), the ratio
mean weighted by how much each row matters. One scalar (Σ w times the plain mean ratio) ranks much
worse (0.57 above): the rows that matter are fitted differently from the rest (e.g. a massive
channel of ffn_down has the most signal, thus the smallest ratio under an imatrix-weighted fit).

Memory: the forward pass is converter.calibration's LayerwiseCalibration over all chunks; the hidden
states at every layer boundary of the first fisher_chunks chunks are kept (n_layer · fisher_chunks ·
n_ctx · n_embd float32: 2.1 GB for a Llama-3-8B shape with the default 8 × 512 tokens). The backward
pass recomputes one decoder layer for one chunk at a time with autograd, from its stored input, and
backpropagates the incoming gradient, so at most one chunk of one layer's activations is held with
grad. The output matrix is loaded once (float32, 2.1 GB for a 128256 × 4096 lm_head); its logits
and their gradient are computed in position slices without autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .calibration import LayerwiseCalibration, _LlamaMath
from .llama import permute_qk

__all__ = ["FISHER_CHUNKS", "ChannelStats", "Sensitivities", "measure_sensitivity", "FisherPass"]

#: calibration chunks the backward pass uses (the forward pass uses them all): 8 × 512 tokens
FISHER_CHUNKS = 8
LOGIT_SLICE = 1 << 25  # logits (positions x vocabulary) per slice of the output matrix's pass: 128 MB

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"


def _torch():
    import torch
    return torch


@dataclass
class ChannelStats:
    """Per output channel, float64: y2 = E[y²] (mean over positions); g2 = E[g²] and yg2 = E[y² g²]
    (sums over positions per predicted token)."""
    y2: np.ndarray
    g2: np.ndarray
    yg2: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        """w_i = ½ E[y_i² g_i²]: loss per unit noise-to-signal ratio of channel i."""
        return 0.5 * self.yg2


@dataclass
class Sensitivities:
    """The measurement (see the module docstring); row weights are in GGUF row order."""
    channels: dict[str, ChannelStats]
    embedding_input: ChannelStats          # token_embd as the input lookup, per hidden channel
    tied: bool                             # no output.weight: token_embd is also the output matrix
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    n_tokens: int = 0                      # positions of the backward pass
    n_predicted: int = 0                   # of them, positions with a next token

    def row_weights(self, name: str) -> np.ndarray | None:
        if name == TOKEN_EMBD:
            n_rows = self._n_vocab()
            rows = np.full(n_rows, float(self.embedding_input.weights.sum()) / n_rows)
            return rows + self.channels[OUTPUT].weights if self.tied else rows
        if name == OUTPUT and self.tied:
            return None  # no such tensor in the file
        stats = self.channels.get(name)
        return None if stats is None else stats.weights

    def sensitivity(self, name: str) -> float:
        w = self.row_weights(name)
        return 0.0 if w is None else float(w.sum())

    def _n_vocab(self) -> int:
        return int(self.channels[OUTPUT].y2.size)


# ----------------------------------------------------------------------------- the pass


class FisherPass:
    """The forward and layer-by-layer backward pass (measure_sensitivity() runs it)."""

    def __init__(self, model_dir: str | Path, tokens: np.ndarray, *, fisher_chunks: int = FISHER_CHUNKS,
                 progress: Callable[[str], None] | None = None):
        if fisher_chunks < 1:
            raise ValueError(f"fisher_chunks must be >= 1, got {fisher_chunks}")
        self.tokens = np.asarray(tokens)
        self.calibration = LayerwiseCalibration(model_dir, self.tokens)  # validates the tokens
        self.model = self.calibration.model
        self.k = min(int(fisher_chunks), self.tokens.shape[0])
        self.math = _LlamaMath(self.model, self.tokens.shape[1])
        self.progress = progress or (lambda name: None)
        self.n_tokens = self.k * self.tokens.shape[1]
        self.n_predicted = self.k * (self.tokens.shape[1] - 1)
        self.sums: dict[str, list[np.ndarray]] = {}  # gguf name -> [Σ y², Σ g², Σ y²g²]

    def run(self) -> Sensitivities:
        torch = _torch()
        p = self.model.params
        inputs = []  # the first k chunks' input of every layer
        while self.calibration.next_layer < p.n_layer:
            self.progress(f"forward layer {self.calibration.next_layer}")
            inputs.append(self.calibration.hidden[: self.k].clone())
            self.calibration.run_layer()
        embedded = inputs[0]  # layer 0's input: the embedding rows
        importance = self.calibration.statistics()
        final = self.calibration.hidden[: self.k].clone()
        self.calibration.hidden = None  # the forward pass is done: free its states
        self.progress("output")
        grad = self._head(final)
        del final
        for i in reversed(range(p.n_layer)):
            self.progress(f"backward layer {i}")
            grad = self._layer_backward(i, inputs.pop(), grad)
        self._add(TOKEN_EMBD, embedded, grad)
        embedding_input = self._stats_of(self.sums.pop(TOKEN_EMBD))
        channels = {name: self._stats_of(s) for name, s in self.sums.items()}
        tied = "lm_head.weight" not in self.model.checkpoint.tensors
        return Sensitivities(channels, embedding_input, tied, importance, self.n_tokens, self.n_predicted)

    # -- pieces

    def _stats_of(self, sums: list[np.ndarray]) -> ChannelStats:
        return ChannelStats(sums[0] / self.n_tokens, sums[1] / self.n_predicted, sums[2] / self.n_predicted)

    def _add(self, name: str, y, g) -> None:
        """Adds Σ y², Σ g², Σ y²g² over the positions of one piece, per channel (the last dimension)."""
        y2 = (y.double() ** 2).reshape(-1, y.shape[-1])
        g2 = (g.double() ** 2).reshape(-1, g.shape[-1])
        sums = [y2.sum(0).numpy(), g2.sum(0).numpy(), (y2 * g2).sum(0).numpy()]
        if name in self.sums:
            for total, add in zip(self.sums[name], sums):
                total += add
        else:
            self.sums[name] = sums

    def _load(self, hf_name: str):
        return _torch().from_numpy(self.model.checkpoint.tensors[hf_name].load())

    def _head(self, hidden):
        """Final norm, output matrix, next-token cross-entropy: the gradient w.r.t. the last layer's
        output, and the output matrix's statistics (per vocabulary row)."""
        torch = _torch()
        ckpt = self.model.checkpoint.tensors
        norm = ckpt["model.norm.weight"].load()
        w = self._load("lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight")
        targets = torch.from_numpy(self.tokens[: self.k, 1:].astype(np.int64))
        C, T, _ = hidden.shape
        step = max(1, LOGIT_SLICE // w.shape[0])
        grad = torch.zeros_like(hidden)
        for c in range(C):
            for t0 in range(0, T, step):
                x = hidden[c, t0:t0 + step].clone().requires_grad_()
                normed = self.math.rms_norm(x, norm)
                logits = normed.detach() @ w.T  # (positions, vocabulary)
                dlogits = torch.softmax(logits, dim=-1)
                n = min(t0 + step, T - 1) - t0  # positions of this slice with a next token
                if n > 0:
                    dlogits[torch.arange(n), targets[c, t0:t0 + n]] -= 1.0
                dlogits[max(n, 0):] = 0.0  # the last position predicts nothing
                self._add(OUTPUT, logits, dlogits)
                normed.backward(dlogits @ w)
                grad[c, t0:t0 + step] = x.grad
        return grad

    def _layer_backward(self, i: int, inputs, grad_out):
        """Recomputes layer i chunk by chunk with autograd from its stored inputs, backpropagates
        grad_out and records every linear's E[y²], E[g²]; returns the gradient w.r.t. the inputs."""
        torch = _torch()
        pre = f"model.layers.{i}."
        weights = {leaf: self._load(f"{pre}{'self_attn' if leaf in _ATTN else 'mlp'}.{leaf}.weight")
                   for leaf in _ATTN + _MLP}
        norms = (self.model.checkpoint.tensors[pre + "input_layernorm.weight"].load(),
                 self.model.checkpoint.tensors[pre + "post_attention_layernorm.weight"].load())
        grad_in = torch.empty_like(inputs)
        for c in range(inputs.shape[0]):
            x = inputs[c:c + 1].clone().requires_grad_()
            outs: dict[str, object] = {}
            out = self._layer_forward(x, weights, norms, outs)
            for y in outs.values():
                y.retain_grad()
            out.backward(grad_out[c:c + 1])
            for leaf, y in outs.items():
                self._add(self._gguf_name(pre, leaf), y.detach(), y.grad)
            grad_in[c:c + 1] = x.grad
            del x, outs, out
        return grad_in

    def _layer_forward(self, x, weights, norms, outs: dict):
        """One decoder layer (LlamaDecoderLayer) on _LlamaMath's norm and attention; every linear's
        output is left in outs[hf_leaf]."""
        torch = _torch()
        m = self.math

        def linear(leaf, inp):
            outs[leaf] = inp @ weights[leaf].T
            return outs[leaf]

        a_in = m.rms_norm(x, norms[0])
        h = x + linear("o_proj", m.attention(*(linear(leaf, a_in) for leaf in _ATTN[:3])))
        m_in = m.rms_norm(h, norms[1])
        act = torch.nn.functional.silu(linear("gate_proj", m_in)) * linear("up_proj", m_in)
        return h + linear("down_proj", act)

    def _gguf_name(self, pre: str, leaf: str) -> str:
        sub = "self_attn" if leaf in _ATTN else "mlp"
        return self.model.name_map.get_name(f"{pre}{sub}.{leaf}.weight", try_suffixes=(".weight",))

    def permuted(self, channels: dict[str, ChannelStats]) -> dict[str, ChannelStats]:
        """q/k rows in GGUF (interleaved rope) order, as the planner and the file have them."""
        p = self.model.params
        out = {}
        for name, s in channels.items():
            heads = p.n_head if ".attn_q." in name else p.n_head_kv if ".attn_k." in name else None
            out[name] = ChannelStats(*(permute_qk(a, heads) for a in (s.y2, s.g2, s.yg2))) if heads else s
        return out


def measure_sensitivity(model_dir: str | Path, tokens: np.ndarray, *, fisher_chunks: int = FISHER_CHUNKS,
                        progress: Callable[[str], None] | None = None) -> Sensitivities:
    """The Sensitivities of the checkpoint in model_dir on the calibration tokens (module docstring)."""
    fisher = FisherPass(model_dir, tokens, fisher_chunks=fisher_chunks, progress=progress)
    result = fisher.run()
    result.channels = fisher.permuted(result.channels)
    return result
