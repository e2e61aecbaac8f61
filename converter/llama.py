"""Llama architecture: hyperparameters, tensor names and transforms, as llama.cpp's converter writes them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import gguf
import numpy as np

from .checkpoint import Checkpoint, TensorRef
from .errors import AtdError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# GGUF names of the attention/FFN weight matrices (what ATD rewrites) and of the embedding matrices
LINEAR_WEIGHT = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
EMBEDDINGS = ("token_embd.weight", "output.weight")
ARCH = gguf.MODEL_ARCH.LLAMA
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_ROPE_TYPES_WITHOUT_KEYS = (None, "default", "llama3")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d{1,9})\.")


def _find(config: dict, *keys: str) -> Any:
    return next((config[k] for k in keys if k in config), None)


# far above any real model, far below what would exhaust memory while building per-layer tables
_MAX_DIMENSION = 1 << 24


def _positive_int(config: dict, key: str, default: int | None = None, limit: int = _MAX_DIMENSION) -> int:
    """config[key] as an int in 1..limit (an integral float like 2048.0 counts); null or absent
    takes `default`."""
    value = config.get(key)
    if value is None:
        if default is None:
            raise AtdError(f"config.json: missing Llama hyperparameter {key}")
        value = default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise AtdError(f"config.json: {key} must be an integer from 1 to {limit}, got {value!r}")
    return value


def _positive_float(config: dict, key: str, where: str = "config.json") -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AtdError(f"{where}: {key} must be a finite number > 0, got {value!r}")
    return value


@dataclass(frozen=True)
class LlamaParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int | None
    rms_eps: float | None
    rope: dict

    @classmethod
    def from_config(cls, config: dict) -> "LlamaParams":
        archs = config.get("architectures") or []
        if not isinstance(archs, list):
            archs = [archs]
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise AtdError(f"unsupported architecture {archs or config.get('model_type')!r}: "
                           f"atd-gguf converts {', '.join(SUPPORTED_ARCHITECTURES)}")
        n_head = _positive_int(config, "num_attention_heads")
        n_embd = _positive_int(config, "hidden_size")
        n_head_kv = _positive_int(config, "num_key_value_heads", default=n_head)
        if n_head % n_head_kv:
            raise AtdError(f"config.json: num_attention_heads ({n_head}) is not a multiple of "
                           f"num_key_value_heads ({n_head_kv})")
        head_dim = _positive_int(config, "head_dim", default=n_embd // n_head)
        if head_dim % 2:  # rope rotates pairs of dimensions
            raise AtdError(f"config.json: head_dim must be even, got {head_dim}")
        n_ctx_key = next((k for k in ("max_position_embeddings", "n_ctx", "n_positions")
                          if config.get(k) is not None), None)
        eps_key = next((k for k in ("rms_norm_eps", "norm_eps") if config.get(k) is not None), None)
        params = cls(
            n_layer=_positive_int(config, "num_hidden_layers"),
            n_embd=n_embd,
            n_ff=_positive_int(config, "intermediate_size"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=_positive_int(config, "vocab_size"),
            n_ctx=_positive_int(config, n_ctx_key, limit=2**32 - 1) if n_ctx_key else None,
            rms_eps=_positive_float(config, eps_key) if eps_key else None,
            rope=_rope_parameters(config),
        )
        rope_type = params.rope.get("rope_type")
        if rope_type not in _ROPE_TYPES_WITHOUT_KEYS and rope_type != "linear":
            raise AtdError(f"config.json: rope scaling type {rope_type!r} is not supported")
        for key in ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if params.rope.get(key) is not None:
                _positive_float(params.rope, key, where="config.json rope parameters")
        if rope_type == "llama3" and params.rope.get("low_freq_factor", 1.0) >= params.rope.get("high_freq_factor", 4.0):
            raise AtdError("config.json: rope parameters need low_freq_factor < high_freq_factor")
        return params

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape, for checking that config and weights agree."""
        q_rows, kv_rows = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        shapes = {"model.embed_tokens.weight": (self.n_vocab, self.n_embd),
                  "model.norm.weight": (self.n_embd,),
                  "lm_head.weight": (self.n_vocab, self.n_embd)}
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (self.n_embd,),
                p + "post_attention_layernorm.weight": (self.n_embd,),
                p + "self_attn.q_proj.weight": (q_rows, self.n_embd),
                p + "self_attn.k_proj.weight": (kv_rows, self.n_embd),
                p + "self_attn.v_proj.weight": (kv_rows, self.n_embd),
                p + "self_attn.o_proj.weight": (self.n_embd, q_rows),
                p + "mlp.gate_proj.weight": (self.n_ff, self.n_embd),
                p + "mlp.up_proj.weight": (self.n_ff, self.n_embd),
                p + "mlp.down_proj.weight": (self.n_embd, self.n_ff),
            })
        return shapes


def _rope_parameters(config: dict) -> dict:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(rope, dict) and "full_attention" in rope:
        rope = rope["full_attention"]
    if not isinstance(rope, dict):
        raise AtdError("config.json: rope_parameters/rope_scaling must be a JSON object")
    rope = dict(rope)
    if "rope_theta" not in rope and (theta := _find(config, "rope_theta", "rotary_emb_base")) is not None:
        rope["rope_theta"] = theta
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    if "original_max_position_embeddings" not in rope and "original_max_position_embeddings" in config:
        rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
    return rope


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> GGML's interleaved rope order."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(params: LlamaParams) -> np.ndarray:
    """The rope_freqs.weight tensor of Llama-3.1-style scaling (rope_type llama3)."""
    rope = params.rope
    base = rope.get("rope_theta", 10000.0)
    dim = params.head_dim
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    # float32 throughout, as the reference's torch arithmetic is
    f32 = np.float32
    freqs = f32(1.0) / (f32(base) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    factors = []
    for freq in freqs:
        wavelen = f32(2 * math.pi) / freq
        if wavelen < old_ctx / high:
            factors.append(f32(1.0))
        elif wavelen > old_ctx / low:
            factors.append(f32(factor))
        else:
            smooth = (f32(old_ctx) / wavelen - f32(low)) / f32(high - low)
            factors.append(f32(1.0) / ((f32(1.0) - smooth) / f32(factor) + smooth))
    return np.array(factors, dtype=np.float32)


@dataclass(frozen=True)
class SourceTensor:
    """One output tensor: its GGUF name, float32 shape, and how to produce its values."""
    name: str
    shape: tuple[int, ...]
    ref: TensorRef | None
    permute_heads: int | None = None
    values: np.ndarray | None = None

    def load(self) -> np.ndarray:
        if self.values is not None:
            return self.values
        assert self.ref is not None
        data = self.ref.load()
        return permute_qk(data, self.permute_heads) if self.permute_heads else data

    @property
    def row_group(self) -> int:
        """Rows that only load together: a rope head's rows are permuted among themselves."""
        return self.shape[0] // self.permute_heads if self.permute_heads else 1

    def load_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of load(), reading only those rows (multiples of row_group)."""
        if self.values is not None or len(self.shape) < 2:
            return self.load()[start:stop]
        assert self.ref is not None and start % self.row_group == 0 and (stop - start) % self.row_group == 0
        data = self.ref.load_rows(start, stop)
        return permute_qk(data, (stop - start) // self.row_group) if self.permute_heads else data

    def load_row_indices(self, rows: np.ndarray) -> np.ndarray:
        """Rows of load() at the given indices, reading only those rows (any row, rope heads too)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.values is not None or len(self.shape) < 2 or self.ref is None:
            return self.load()[rows]
        return self.ref.load_row_indices(self.source_rows(rows))

    def source_rows(self, rows: np.ndarray) -> np.ndarray:
        """The checkpoint rows of the given rows of load(): permute_qk moves row s * half + j of a head
        (s = 0, 1; j < half) to 2 * j + s."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.permute_heads:
            return rows
        head_rows = self.row_group
        head, r = np.divmod(rows, head_rows)
        return head * head_rows + (r % 2) * (head_rows // 2) + r // 2


class LlamaModel:
    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.params = LlamaParams.from_config(checkpoint.config)
        self._check_layer_count()
        self.name_map = gguf.get_tensor_name_map(ARCH, self.params.n_layer)
        self._check_shapes()

    def _check_layer_count(self) -> None:
        """num_hidden_layers must match the layers the weights hold, before any per-layer table is built."""
        layers = {int(m.group(1)) for n in self.checkpoint.tensors if (m := _LAYER_INDEX.match(n))}
        if len(layers) != self.params.n_layer or (layers and max(layers) != len(layers) - 1):
            raise AtdError(f"config.json: num_hidden_layers is {self.params.n_layer} but the weights hold "
                           f"{len(layers)} layer(s) numbered up to {max(layers, default=-1)} "
                           "(config and weights disagree)")

    def _check_shapes(self) -> None:
        expected = self.params.expected_shapes()
        tensors = self.checkpoint.tensors
        for name, ref in tensors.items():
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            if name not in expected:
                raise AtdError(f"tensor {name} {list(ref.shape)} is not part of a LlamaForCausalLM "
                               f"with {self.params.n_layer} layers (config and weights disagree)")
            if ref.shape != expected[name]:
                raise AtdError(f"tensor {name} has shape {list(ref.shape)} but config.json implies "
                               f"{list(expected[name])} (config and weights disagree)")
        missing = [n for n in expected if n not in tensors and n != "lm_head.weight"]
        if missing:
            raise AtdError(f"checkpoint lacks {len(missing)} tensor(s) config.json requires, e.g. {missing[0]}")

    def tensors(self) -> Iterator[SourceTensor]:
        """Output tensors in llama.cpp's converter order: generated ones first, then checkpoint order."""
        p = self.params
        if p.rope.get("rope_type") == "llama3":
            factors = llama3_rope_factors(p)
            yield SourceTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                               factors.shape, None, values=factors)
        for name, ref in self.checkpoint.tensors.items():
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            new_name = self.name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise AtdError(f"cannot map tensor {name!r} to a GGUF name")
            heads = None
            if name.endswith("q_proj.weight"):
                heads = p.n_head
            elif name.endswith("k_proj.weight"):
                heads = p.n_head_kv
            yield SourceTensor(new_name, ref.shape, ref, permute_heads=heads)

    def add_hparams(self, writer: gguf.GGUFWriter, file_type: int) -> None:
        """llama.* keys, in the reference converter's order."""
        p = self.params
        writer.add_block_count(p.n_layer)
        if p.n_ctx is not None:
            writer.add_context_length(p.n_ctx)
        writer.add_embedding_length(p.n_embd)
        writer.add_feed_forward_length(p.n_ff)
        writer.add_head_count(p.n_head)
        writer.add_head_count_kv(p.n_head_kv)
        if p.rope.get("rope_type") == "linear" and p.rope.get("factor") is not None:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(p.rope["factor"])
        if (theta := p.rope.get("rope_theta")) is not None:
            writer.add_rope_freq_base(theta)
        if p.rms_eps is not None:
            writer.add_layer_norm_rms_eps(p.rms_eps)
        if "head_dim" in self.checkpoint.config and self.checkpoint.config["head_dim"] is not None:
            writer.add_key_length(p.head_dim)
            writer.add_value_length(p.head_dim)
        writer.add_file_type(file_type)
        writer.add_vocab_size(p.n_vocab)
        writer.add_rope_dimension_count(p.head_dim)
