"""converter.sensitivity: the layer-by-layer empirical-Fisher pass and its use by the planner.

References are independent of the code under test: per-channel statistics come from torch autograd
through transformers' LlamaForCausalLM (one backward over the whole model), memory from torch's
saved-tensor hooks around the same reference, and the loss increase of quantizing a tensor from
transformers' model with that tensor replaced by its ATD round trip (KL to the unquantized model on
other text).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gguf_types
from converter import budget

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converter.calibration import tokenize_calibration  # noqa: E402
from converter.llama import LlamaModel, permute_qk  # noqa: E402
from converter.checkpoint import Checkpoint  # noqa: E402
from converter.sensitivity import FisherPass, measure_sensitivity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def hf_model(model_dir: Path, **config):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **config)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def hf_fisher(model, tokens: np.ndarray, importance_tokens: np.ndarray):
    """The reference: {HF module name: (E[y²], E[g²], E[y²g²])} of every linear and of the embedding
    lookup, from one autograd backward of the summed next-token cross-entropy of `tokens` through the
    whole model; E[y²] over all positions, the others summed over positions per predicted token.
    And {HF linear name: mean x² of its input} over importance_tokens (a forward only)."""
    outs, hooks = {}, []

    def keep(name):
        def hook(module, args, out):
            out.requires_grad_(True) if out.is_leaf else None
            out.retain_grad()
            outs[name] = out
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            hooks.append(module.register_forward_hook(keep(name)))
    ids = torch.from_numpy(tokens)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")
    loss.backward()
    n, n_pred = tokens.size, tokens[:, 1:].size
    ref = {}
    for name, y in outs.items():
        y2 = (y.detach().double() ** 2).reshape(-1, y.shape[-1])
        g2 = (y.grad.double() ** 2).reshape(-1, y.shape[-1])
        ref[name] = (y2.sum(0).numpy() / n, g2.sum(0).numpy() / n_pred, (y2 * g2).sum(0).numpy() / n_pred)
    for h in hooks:
        h.remove()
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, args[0].detach())))
    with torch.no_grad():
        model(torch.from_numpy(importance_tokens))
    for h in hooks:
        h.remove()
    return ref, {name: (x.double() ** 2).reshape(-1, x.shape[-1]).mean(0).numpy() for name, x in seen.items()}


def random_tokens(n_chunks: int, n_ctx: int, n_vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_vocab, (n_chunks, n_ctx), dtype=np.int64)


def assert_matches(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    # float32 forward and backward, summed in float64: agreement to float32 rounding (relative to the scale)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-5 * float(np.abs(ref).max()), err_msg=what)


@pytest.fixture(scope="module")
def tied_tiny(tmp_path_factory, llama3_dir) -> Path:
    """A random 2-layer Llama with a tied embedding (no lm_head.weight), as a safetensors checkpoint."""
    config = transformers.AutoConfig.from_pretrained(llama3_dir)
    config.tie_word_embeddings = True
    config.vocab_size = 512
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    out = tmp_path_factory.mktemp("tied-tiny")
    model.save_pretrained(out, safe_serialization=True)
    return out


# ----------------------------------------------------------------------------- statistics


def _check_against_reference(model_dir: Path, tokens: np.ndarray, fisher_chunks: int) -> None:
    sens = measure_sensitivity(model_dir, tokens, fisher_chunks=fisher_chunks)
    llama = LlamaModel(Checkpoint(model_dir))
    p = llama.params
    ref, ref_importance = hf_fisher(hf_model(model_dir), tokens[:fisher_chunks], tokens)
    assert sens.n_tokens == tokens[:fisher_chunks].size and sens.n_predicted == tokens[:fisher_chunks, 1:].size
    n_linear = 0
    for name, (y2, g2, yg2) in ref.items():
        if not name.startswith("model.layers."):
            continue
        gguf_name = llama.name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        heads = p.n_head if name.endswith("q_proj") else p.n_head_kv if name.endswith("k_proj") else None
        to_gguf = (lambda a: permute_qk(a, heads)) if heads else (lambda a: a)  # the planner's row order
        stats = sens.channels[gguf_name]
        assert_matches(stats.y2, to_gguf(y2), f"{gguf_name} E[y²]")
        assert_matches(stats.g2, to_gguf(g2), f"{gguf_name} E[g²]")
        assert_matches(stats.yg2, to_gguf(yg2), f"{gguf_name} E[y²g²]")
        np.testing.assert_allclose(sens.row_weights(gguf_name), 0.5 * to_gguf(yg2), rtol=1e-3)
        assert_matches(sens.importance[gguf_name], ref_importance[name], f"{gguf_name} mean x²")  # all chunks
        n_linear += 1
    assert n_linear == 7 * p.n_layer
    for ours, theirs, what in ((sens.channels["output.weight"], ref["lm_head"], "output"),
                               (sens.embedding_input, ref["model.embed_tokens"], "embedding")):
        for field, value in zip(("y2", "g2", "yg2"), theirs):
            assert_matches(getattr(ours, field), value, f"{what} {field}")
    # the input side is spread evenly over the vocabulary rows; a tied embedding adds the output side
    input_side = 0.5 * float(ref["model.embed_tokens"][2].sum()) / p.n_vocab
    output_side = 0.5 * ref["lm_head"][2]
    tied = "lm_head.weight" not in llama.checkpoint.tensors
    assert sens.tied == tied
    if tied:
        np.testing.assert_allclose(sens.row_weights("token_embd.weight"), input_side + output_side, rtol=1e-3)
        assert sens.row_weights("output.weight") is None
    else:
        np.testing.assert_allclose(sens.row_weights("token_embd.weight"), np.full(p.n_vocab, input_side), rtol=1e-3)
        np.testing.assert_allclose(sens.row_weights("output.weight"), output_side, rtol=1e-3)
    assert sens.sensitivity("token_embd.weight") == pytest.approx(float(sens.row_weights("token_embd.weight").sum()))
    assert sens.sensitivity("blk.0.attn_norm.weight") == 0.0


def test_statistics_match_transformers_autograd(llama3_dir):
    """llama3-tiny (untied, GQA, llama3 rope): the backward over 2 of 3 chunks, the importance over all 3."""
    tokens = tokenize_calibration((ROOT / "README.md").read_text(), llama3_dir, n_ctx=64, max_chunks=3)
    assert tokens.shape == (3, 64)
    _check_against_reference(llama3_dir, tokens, fisher_chunks=2)


def test_tied_embedding_statistics_match_transformers_autograd(tied_tiny):
    _check_against_reference(tied_tiny, random_tokens(2, 48, 512), fisher_chunks=2)


# ----------------------------------------------------------------------------- memory


class SavedForBackward:
    """Peak bytes of the activations autograd holds for a backward pass (each storage counted once), from
    torch's saved-tensor hooks: what a pass keeps alive "with grad". Constants (leaves that need no
    gradient: weights, norms, rope tables) are not counted: both passes hold one layer's weights."""

    def __init__(self):
        self.live: dict[int, list[int]] = {}  # storage pointer -> [holders, bytes]
        self.peak = 0

    def _total(self) -> int:
        return sum(b for _, b in self.live.values())

    def pack(self, t):
        if t.is_leaf and not t.requires_grad:
            return _Holder(t, None, self)
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        entry[0] += 1
        self.peak = max(self.peak, self._total())
        return _Holder(t, key, self)

    def release(self, key: int | None) -> None:
        if key is None:
            return
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[key]

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda holder: holder.tensor)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class _Holder:
    def __init__(self, tensor, key, owner):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner.release(self.key)


def _hf_backward_peak(model_dir: Path, tokens: np.ndarray, **config) -> int:
    model = hf_model(model_dir, **config)
    ids = torch.from_numpy(tokens)
    with SavedForBackward() as saved:
        emb = model.model.embed_tokens(ids).requires_grad_()
        logits = model(inputs_embeds=emb).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        loss.backward()
    return saved.peak


def test_backward_holds_one_layer_of_one_chunk(tied_tiny):
    """The layer-by-layer pass never holds more than one decoder layer's activations (of one chunk) with
    grad: its peak is that of transformers' model cut to one layer run on one chunk, a fraction of the
    whole model's autograd over the same chunks (2 layers x 4 chunks)."""
    tokens = random_tokens(4, 128, 512, seed=1)
    with SavedForBackward() as saved:
        measure_sensitivity(tied_tiny, tokens, fisher_chunks=4)
    one_layer_one_chunk = _hf_backward_peak(tied_tiny, tokens[:1], num_hidden_layers=1)
    whole = _hf_backward_peak(tied_tiny, tokens)
    assert saved.peak > 0
    assert saved.peak <= 1.25 * one_layer_one_chunk, (saved.peak, one_layer_one_chunk, whole)
    assert saved.peak < whole / 4, (saved.peak, one_layer_one_chunk, whole)
