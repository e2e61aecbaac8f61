"""GPTQ error feedback for ATD (gguf_types.gptq) and the layer-by-layer calibration (converter.calibration).

References are independent of the code under test: activations and hidden states come from
transformers' LlamaForCausalLM, the plain fit is gguf_types.quantize, the output error is
computed from the activations (not from H), and the GPTQ algebra is checked against a textbook
float64 OBS loop with an explicitly downdated inverse Hessian (no Cholesky, no lazy batches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gguf_types
from gguf_types.gptq import gptq_quantize, hessian_error, prepare_hessian

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converter.calibration import (CalibrationError, GptqQuantizer, LayerwiseCalibration,  # noqa: E402
                                   tokenize_calibration)
from converter.llama import permute_qk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def calibration_text() -> str:
    return (ROOT / "README.md").read_text() + "\n" + (ROOT / "docs" / "atd-format.md").read_text()


def hf_model(model_dir: Path, n_layers: int):
    """transformers' model (float32, eager attention) truncated to its first n_layers layers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, num_hidden_layers=n_layers, attn_implementation="eager")
    return model.eval()


def hf_layer_outputs(model, tokens: np.ndarray, capture: str | None = None):
    """Hidden states after each decoder layer, and the inputs of the module named `capture`."""
    outs, seen = [], []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    if capture:
        hooks.append(model.get_submodule(capture).register_forward_hook(lambda m, i, o: seen.append(i[0])))
    with torch.no_grad():
        model(torch.from_numpy(tokens))
    for h in hooks:
        h.remove()
    return outs, (seen[0].reshape(-1, seen[0].shape[-1]).double().numpy() if capture else None)


def atd_levels(scales: np.ndarray, planes: int) -> np.ndarray:
    """All 3^N decoded levels per block (docs/atd-format.md §3: float32, plane 0 first)."""
    combos = np.array(np.meshgrid(*[[-1, 0, 1]] * planes, indexing="ij")).reshape(planes, -1).T
    y = np.zeros((scales.shape[0], len(combos)), dtype=np.float32)
    for i in range(planes):
        y = y + scales[:, i:i + 1].astype(np.float32) * combos[:, i].astype(np.float32)[None, :]
    return y


# ----------------------------------------------------------------------------- the real tensor


@pytest.fixture(scope="module")
def smollm2_down3(smollm2_dir):
    """SmolLM2 layer-3 mlp.down_proj and its input activations (transformers, ~500 tokens)."""
    tokens = tokenize_calibration(calibration_text(), smollm2_dir, n_ctx=256, max_chunks=2)
    model = hf_model(smollm2_dir, 4)
    _, x = hf_layer_outputs(model, tokens, "model.layers.3.mlp.down_proj")
    w = model.model.layers[3].mlp.down_proj.weight.detach().numpy().copy()
    return w, x, tokens


@pytest.mark.parametrize("planes", [2, 3])
def test_gptq_lowers_output_error_on_real_down_proj(smollm2_down3, planes):
    w, x, _ = smollm2_down3
    h = x.T @ x
    t = gguf_types.atd_type_for(planes, w.shape[1])
    plain = gguf_types.dequantize(gguf_types.quantize(w, t, importance=np.diag(h).astype(np.float32)), t)
    gptq = gguf_types.dequantize(gptq_quantize(w, h, t), t)

    def out_err(w_hat):  # Σ_tokens ||x (W - Ŵ)ᵀ||², from the activations themselves
        return float((((x @ (w.astype(np.float64) - w_hat).T)) ** 2).sum())

    ratio = out_err(gptq) / out_err(plain)
    assert ratio < 0.5, f"N={planes}: GPTQ/plain output error {ratio:.3f}"
    assert hessian_error(w, gptq, h) == pytest.approx(out_err(gptq), rel=1e-6)


def test_output_is_valid_canonical_and_deterministic(smollm2_down3):
    w, x, _ = smollm2_down3
    h = x.T @ x
    t = gguf_types.atd_type("ATD2")
    data = gptq_quantize(w, h, t)
    assert data.shape == (w.shape[0], w.shape[1] // t.block_size * t.type_size) and data.dtype == np.uint8
    trits, scales = gguf_types.unpack_blocks(data, t)  # raises on an invalid code
    assert set(np.unique(trits)) <= {-1, 0, 1}
    assert np.isfinite(scales.astype(np.float32)).all()
    zero_plane = scales == 0
    assert not trits[zero_plane].any()  # §4: a plane with scale 0 has all trits 0
    assert not np.signbit(scales[zero_plane]).any()  # stored as +0.0
    np.testing.assert_array_equal(gguf_types.pack_blocks(trits, scales), data.reshape(-1, t.type_size))
    # every weight decodes to one of its block's 3^N levels
    y = gguf_types.dequantize(data, t).reshape(-1, t.block_size)
    levels = atd_levels(scales, t.planes)
    assert (y[:, :, None] == levels[:, None, :]).any(axis=2).all()
    assert np.array_equal(gptq_quantize(w, h, t), data)  # determinism: byte-identical
    assert np.array_equal(gptq_quantize(w, prepare_hessian(h), t), data)  # prepared once = same


# ----------------------------------------------------------------------------- the algebra


def naive_gptq(w, h, t, damp, act_order, importance):
    """Textbook GPTQ/OBS in float64: quantize column j, e = (w_j - q_j) / Hinv_jj,
    W -= e Hinv[j, :], then remove j from Hinv (Hinv -= Hinv[:, j] Hinv[j, :] / Hinv_jj).
    ATD scales: fitted by gguf_types.quantize on the block's current weights at its first column."""
    rows, cols = w.shape
    B = t.block_size
    d = np.diag(h).astype(np.float64)
    mean = d.mean()
    hd = h.astype(np.float64).copy()
    hd[np.diag_indices(cols)] = np.where(d == 0, mean, d) + damp * mean
    hinv = np.linalg.inv(hd)
    W = w.astype(np.float64).copy()
    q = np.zeros_like(W)
    order = np.argsort(-d, kind="stable") if act_order else np.arange(cols)
    levels = {}
    for j in order:
        b = j // B
        if b not in levels:
            packed = gguf_types.quantize(W[:, b * B:(b + 1) * B].astype(np.float32), t,
                                         importance=importance[b * B:(b + 1) * B])
            levels[b] = atd_levels(gguf_types.unpack_blocks(packed, t)[1], t.planes).astype(np.float64)
        lv = levels[b]
        dist = np.abs(W[:, j:j + 1] - lv)
        best = np.where(dist == dist.min(axis=1, keepdims=True), lv, np.inf).min(axis=1)  # ties: lower level
        q[:, j] = best
        e = (W[:, j] - best) / hinv[j, j]
        W -= np.outer(e, hinv[j])
        hinv -= np.outer(hinv[:, j], hinv[j]) / hinv[j, j]
    return q


@pytest.mark.parametrize("act_order", [False, True])
def test_matches_textbook_gptq(act_order):
    rng = np.random.default_rng(1)
    rows, cols = 12, 192  # three ATD1_64 blocks; block_cols=48 and inner blocks cut them unevenly
    x = rng.standard_normal((400, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)) / np.sqrt(cols))
    x *= rng.gamma(1.0, 1.0, cols)  # unequal column scales: act_order reorders
    h = x.T @ x
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    t = gguf_types.atd_type("ATD2_64")
    imp = np.diag(h).astype(np.float32)
    ours = gguf_types.dequantize(gptq_quantize(w, h, t, damp=0.05, act_order=act_order, block_cols=48,
                                               importance=imp), t)
    ref = naive_gptq(w, h, t, 0.05, act_order, imp)
    # float32 vs float64 arithmetic may flip a near-tie and change the rest of that row's path
    assert np.mean(ours == ref) > 0.9
    assert hessian_error(w, ours, h) == pytest.approx(hessian_error(w, ref, h), rel=0.03)


@pytest.mark.parametrize("atype", ["ATD3", "ATD1_64"])
def test_diagonal_hessian_is_the_plain_fit(atype):
    """No correlations: nothing propagates, so GPTQ must give the plain fit's bytes exactly."""
    t = gguf_types.atd_type(atype)
    rng = np.random.default_rng(2)
    g = rng.standard_normal(2 * t.block_size)
    w = np.stack([g * 0.1, rng.standard_t(2, g.size),      # Gaussian, heavy tails
                  np.round(g * 2) / 2,                       # repeated values
                  np.where(rng.random(g.size) < 0.9, 0.0, g),  # mostly zeros
                  3.0 * rng.integers(-1, 2, g.size),         # on a 3d grid: empty planes, zero scales
                  np.zeros(g.size)]).astype(np.float32)      # a zero row
    d = rng.gamma(1.0, 1.0, w.shape[1])
    d[5] = 0.0  # a dead column too
    imp = rng.random(w.shape[1]).astype(np.float32)
    for act_order in (False, True):
        got = gptq_quantize(w, np.diag(d), t, act_order=act_order, importance=imp)
        np.testing.assert_array_equal(got, gguf_types.quantize(w, t, importance=imp))
    # the default fit weights: 1/U_jj² - λ, which for a diagonal H is diag H (the imatrix), and
    # the mean of diag H for the dead column (fitted as an average column, not ignored)
    expect = np.where(d == 0, d.mean(), d)
    np.testing.assert_allclose(prepare_hessian(np.diag(d), damp=0.1).fit_importance(), expect, rtol=1e-5)


# ----------------------------------------------------------------------------- edge cases


def test_zero_matrix_and_single_block():
    t = gguf_types.atd_type("ATD3_64")
    h = np.random.default_rng(3).standard_normal((64, 64))
    h = h @ h.T
    zero = np.zeros((4, 64), np.float32)
    np.testing.assert_array_equal(gptq_quantize(zero, h, t), gguf_types.quantize(zero, t))  # canonical zeros
    np.testing.assert_array_equal(gptq_quantize(zero, np.zeros((64, 64)), t), gguf_types.quantize(zero, t))
    one = np.random.default_rng(4).standard_normal((1, 64)).astype(np.float32)  # one row, one block
    y = gguf_types.dequantize(gptq_quantize(one, h, t), t)
    plain = gguf_types.dequantize(gguf_types.quantize(one, t, importance=np.diag(h).astype(np.float32)), t)
    assert hessian_error(one, y, h) <= hessian_error(one, plain, h) * 1.001


def test_dead_column_and_magnitudes():
    rng = np.random.default_rng(5)
    t = gguf_types.atd_type("ATD2_64")
    x = rng.standard_normal((300, 128))
    x[:, 10] = 0.0  # an input that is never active: diag H = 0
    h = x.T @ x
    w = (rng.standard_normal((6, 128)) * 0.05).astype(np.float32)
    y = gguf_types.dequantize(gptq_quantize(w, h, t), t)
    assert np.isfinite(y).all()
    # the dead column is rounded like an average column (not zeroed): within a level step of w
    assert np.abs(y[:, 10] - w[:, 10]).max() < 0.5 * np.abs(w).max()
    for scale in (1e-6, 1e3):  # tiny and large weights stay in fp16's range (docs/atd-format.md §7)
        ys = gguf_types.dequantize(gptq_quantize(w * np.float32(scale), h, t), t)
        assert np.linalg.norm(ys - w * scale) < 0.5 * np.linalg.norm(w * scale)
    with pytest.raises(ValueError, match="overflows fp16"):
        gptq_quantize(w * np.float32(1e6), h, t)


def test_bad_input_raises_value_error(llama3_dir):
    t = gguf_types.atd_type("ATD1_64")
    w = np.ones((2, 64), np.float32)
    h = np.eye(64)
    with pytest.raises(ValueError, match="hessian is 65"):
        gptq_quantize(w, np.eye(65), t)
    with pytest.raises(ValueError, match="square"):
        gptq_quantize(w, np.ones((64, 32)), t)
    bad = h.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, bad, t)
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq_quantize(w, -h, t)
    w_bad = w.copy()
    w_bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        gptq_quantize(w_bad, h, t)
    with pytest.raises(ValueError, match="not a multiple"):
        gptq_quantize(np.ones((2, 96), np.float32), np.eye(96), t)
    with pytest.raises(ValueError, match="differ"):
        gptq_quantize(w, prepare_hessian(h, damp=0.1), t, damp=0.2)
    with pytest.raises(ValueError, match="empty"):
        tokenize_calibration("  \n", llama3_dir)
    with pytest.raises(ValueError, match="tokens"):
        tokenize_calibration("Too short for one chunk.", llama3_dir, n_ctx=512)
    assert issubclass(CalibrationError, ValueError)


# ----------------------------------------------------------------------------- calibration forward


@pytest.mark.parametrize("which, n_layers", [("llama3", 2), ("smollm2", 3)])
def test_layerwise_forward_matches_transformers(which, n_layers, request):
    model_dir = request.getfixturevalue(f"{which}_dir")
    tokens = tokenize_calibration(calibration_text(), model_dir, n_ctx=96, max_chunks=2)
    ref, x_down = hf_layer_outputs(hf_model(model_dir, n_layers), tokens, f"model.layers.{n_layers - 1}.mlp.down_proj")
    cal = LayerwiseCalibration(model_dir, tokens)
    for i in range(n_layers):
        assert cal.run_layer() == i
        scale = ref[i].abs().max().item()
        assert (cal.hidden - ref[i]).abs().max().item() <= 2e-6 * scale, f"layer {i}"
    # the imatrix statistic of the last down_proj: mean x² of transformers' down_proj input
    stats = cal.mean_sq(f"blk.{n_layers - 1}.ffn_down.weight")
    np.testing.assert_allclose(stats, (x_down ** 2).mean(0), rtol=1e-4, atol=1e-7)


def test_sequential_gptq_on_llama3_tiny(llama3_dir):
    tokens = tokenize_calibration(calibration_text(), llama3_dir, n_ctx=128, max_chunks=2)
    assert tokens[0, 0] == 128000  # Llama-3 adds BOS (llama-imatrix does too)
    cal = LayerwiseCalibration(llama3_dir, tokens, GptqQuantizer(lambda name, shape: "ATD3"))
    plain = LayerwiseCalibration(llama3_dir, tokens)  # no quantization
    model = hf_model(llama3_dir, 2)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    t = gguf_types.atd_type("ATD3")
    kinds = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    heads = {"attn_q": 4, "attn_k": 2}
    for layer in range(2):
        for kind, hf in kinds.items():
            name = f"blk.{layer}.{kind}.weight"
            w = sd[f"model.layers.{layer}.{hf}.weight"]
            w_gguf = permute_qk(w, heads[kind]) if kind in heads else w  # llama.cpp's row order
            y = gguf_types.dequantize(cal.encoded(name), t)
            assert y.shape == w.shape
            rel = np.linalg.norm(y - w_gguf) / np.linalg.norm(w_gguf)
            assert rel < 0.15, f"{name}: relative error {rel:.3f} (rows in the wrong order?)"
            with pytest.raises(KeyError):
                cal.encoded(name)  # released once taken
        # later layers see the earlier quantization: layer 1's inputs differ from the plain run's
        assert not np.allclose(cal.mean_sq(f"blk.{layer}.ffn_down.weight"),
                               plain.mean_sq(f"blk.{layer}.ffn_down.weight"), rtol=1e-3)
    assert cal.next_layer == 2
