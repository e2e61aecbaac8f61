"""converter.budget: size parsing, candidates, error estimates, the knapsack, exact file sizes."""

from __future__ import annotations

import itertools
import json
import math
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import gguf_types
from converter import budget
from converter.budget import BudgetError, Option, TensorOptions

# ----------------------------------------------------------------------------- parse_size

MB, MiB = 10**6, 2**20


@pytest.mark.parametrize("text, expected", [
    ("123", 123), ("1B", 1), ("95MB", 95 * MB), ("95 mb", 95 * MB), ("95Mb", 95 * MB),
    ("3.5GB", 3_500_000_000), ("1.5kb", 1500), ("1KiB", 1024), ("2 TiB", 2 * 2**40), ("1TB", 10**12),
    ("100.6MiB", 105_486_745),  # 100 * 1048576 + 0.6 * 1048576 = 104857600 + 629145.6, rounded down
    ("89.2MiB", 93_532_979),    # 89.2 * 1048576 = 93532979.2
    (" 7 GiB ", 7 * 2**30), (".5MB", 500_000), ("12.", 12),
])
def test_parse_size(text, expected):
    assert budget.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "abc", "-5MB", "0", "0MB", "0.0000001KB", "nan", "inf", "NaN MB",
                                  "5XB", "5 M", "5G", "1e9", "5MB5", "1,000", "+5MB"])
def test_parse_size_rejects(text):
    with pytest.raises(BudgetError) as e:
        budget.parse_size(text)
    assert "\n" not in str(e.value) and repr(text) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bpw_budget_bytes():
    assert budget.bpw_budget_bytes(4.5, 1000) == 562        # 4500 / 8 = 562.5
    assert budget.bpw_budget_bytes(8, 1_000_000) == 1_000_000
    assert budget.bpw_budget_bytes(0.1, 10) == 0            # 1 bit -> 0 whole bytes
    for bad in (0, -1.0, float("nan"), float("inf"), "4"):
        with pytest.raises(BudgetError):
            budget.bpw_budget_bytes(bad, 1000)


# ----------------------------------------------------------------------------- candidates and sizes


def test_candidate_types_and_exact_sizes():
    t576 = [gguf_types.atd_type_for(n, 576) for n in (1, 2, 3, 4)]
    t4096 = [gguf_types.atd_type_for(n, 4096) for n in (1, 2, 3, 4)]
    assert {t.block_size for t in t576} == {64} and {t.block_size for t in t4096} == {256}
    cands = budget.candidate_types("blk.0.attn_q.weight", (576, 576))
    assert [int(q) for q in cands] == [t.ggml_type for t in t576]
    assert [int(q) for q in budget.candidate_types("blk.3.ffn_up.weight", (14336, 4096))] == \
        [t.ggml_type for t in t4096]
    # rows that fit no ATD family keep the converter's fallback
    assert budget.candidate_types("blk.0.ffn_down.weight", (64, 96)) == (QT.Q8_0,)
    assert budget.candidate_types("blk.0.ffn_down.weight", (64, 100)) == (QT.F16,)
    assert budget.candidate_types("blk.0.attn_norm.weight", (576,)) == (QT.F32,)
    emb = budget.candidate_types("token_embd.weight", (49152, 576))
    assert QT.Q8_0 in emb and QT.F16 in emb and QT.BF16 in emb and QT.Q4_0 in emb
    assert [int(q) for q in emb if gguf_types.is_atd_type_id(q)] == [t.ggml_type for t in t576]
    # exact bytes: rows * (cols / block) * type_size from the type table
    for t in t576:
        expected = 1536 * (576 // t.block_size) * t.type_size
        assert budget.tensor_nbytes(gguf_types.gguf_qtype(t), (1536, 576)) == expected
    assert budget.tensor_nbytes(QT.Q8_0, (49152, 576)) == 49152 * 18 * 34
    assert budget.tensor_nbytes(QT.F32, (576,)) == 576 * 4
    with pytest.raises(ValueError):
        budget.tensor_nbytes(QT.Q8_0, (4, 100))


def test_sample_size():
    assert budget.sample_size(14336, 4096) == 2**18 // 4096       # 64 rows of 4096 = 2^18 weights
    assert budget.sample_size(4096, 14336) == 64                  # at least 64 rows
    assert budget.sample_size(49152, 576) == -(-2**18 // 576)     # 456 rows of 576 = 2^18 weights
    assert budget.sample_size(100, 576) == 100                    # never more than the rows


def test_output_matrix_never_q4_0():
    """ggml-cpu repacks a Q4_0 output matrix at load (a second copy in RAM); token_embd only feeds get_rows."""
    assert QT.Q4_0 not in budget.candidate_types("output.weight", (49152, 576))
    assert QT.Q4_0 in budget.candidate_types("token_embd.weight", (49152, 576))
    assert QT.Q8_0 in budget.candidate_types("output.weight", (49152, 576))


def test_sample_rows():
    idx = budget.sample_rows(14336, 4096)
    assert len(idx) == 64 and np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < 14336
    assert np.array_equal(idx, budget.sample_rows(14336, 4096))
    assert np.array_equal(budget.sample_rows(100, 576), np.arange(100))  # small: every row
    # stratum centres: 10 rows, 2 strata of 5 -> rows 2 and 7
    assert budget.sample_rows(10, 4, min_rows=2, sample_weights=8).tolist() == [2, 7]


# ----------------------------------------------------------------------------- the knapsack


def _brute(costs, errors, limit):
    best = None
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[i] for c, i in zip(costs, picks))
        if cost <= limit:
            err = sum(e[i] for e, i in zip(errors, picks))
            best = err if best is None else min(best, err)
    return best


def _instance(rng, n_tensors, n_opts):
    costs = [rng.integers(1, 50, rng.integers(1, n_opts + 1)).tolist() for _ in range(n_tensors)]
    errors = [rng.random(len(c)).tolist() for c in costs]
    return costs, errors


def _total(values, picks):
    return sum(v[i] for v, i in zip(values, picks))


def test_solve_equals_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(300):
        costs, errors = _instance(rng, int(rng.integers(1, 7)), 5)
        limit = int(rng.integers(0, sum(max(c) for c in costs) + 5))
        expected = _brute(costs, errors, limit)
        picks = budget.solve(costs, errors, limit)
        if expected is None:
            assert picks is None
            continue
        assert _total(costs, picks) <= limit
        assert _total(errors, picks) == pytest.approx(expected, abs=1e-12)


def test_greedy_fallback_is_feasible_and_near_optimal():
    # forced by max_front=0; its bound: error <= the exact optimum for (limit - the largest step)
    rng = np.random.default_rng(2)
    for _ in range(300):
        costs, errors = _instance(rng, int(rng.integers(1, 7)), 5)
        limit = int(rng.integers(sum(min(c) for c in costs), sum(max(c) for c in costs) + 5))
        picks, method = budget.solve_with_method(costs, errors, limit, max_front=0)
        assert method == "greedy" and _total(costs, picks) <= limit
        span = max(max(c) - min(c) for c in costs)
        lower = _brute(costs, errors, limit - span)
        if lower is not None:
            assert _total(errors, picks) <= lower + 1e-12
        assert _total(errors, picks) >= _brute(costs, errors, limit) - 1e-12


def test_larger_budget_never_increases_error():
    rng = np.random.default_rng(3)
    costs, errors = _instance(rng, 12, 6)
    previous = np.inf
    for limit in range(sum(min(c) for c in costs), sum(max(c) for c in costs) + 2):
        err = _total(errors, budget.solve(costs, errors, limit))
        assert err <= previous + 1e-12
        previous = err


def test_solver_rejects_bad_input():
    with pytest.raises(ValueError):
        budget.solve([[1, 2]], [[0.5, float("nan")]], 10)
    with pytest.raises(ValueError):
        budget.solve([[1, 2], [3]], [[0.5, 0.1]], 10)
    with pytest.raises(ValueError):
        budget.solve([[]], [[]], 10)


def test_solver_is_deterministic_with_ties():
    costs = [[10, 10, 20], [5, 5], [7, 9, 9]] * 4
    errors = [[1.0, 1.0, 0.5], [0.3, 0.3], [0.2, 0.1, 0.1]] * 4
    runs = {tuple(budget.solve(costs, errors, limit)) for limit in [150] * 3}
    assert len(runs) == 1


# ----------------------------------------------------------------------------- plans on synthetic models

ONE = lambda name: 1.0  # noqa: E731  (unweighted: the brute-force references use the raw errors)


def _fake_model(seed=0, n_layers=3):
    """TensorOptions of a small Llama-like model with made-up errors and exact type-table sizes."""
    rng = np.random.default_rng(seed)

    def options(name, shape):
        types = budget.candidate_types(name, shape)
        err = rng.random(len(types)) * rng.uniform(0.1, 2.0)
        return TensorOptions(name, shape, tuple(Option(q, budget.tensor_nbytes(q, shape), float(e))
                                                for q, e in zip(types, err)))

    tensors = [options("token_embd.weight", (200, 64))]
    for i in range(n_layers):
        tensors.append(budget.fixed_tensor(f"blk.{i}.attn_norm.weight", (64,)))
        for role, shape in (("attn_q", (64, 64)), ("attn_k", (32, 64)), ("ffn_up", (128, 64)),
                            ("ffn_down", (64, 128))):
            tensors.append(options(f"blk.{i}.{role}.weight", shape))
    return tensors


def _write_gguf(path, plan, kv: dict[str, str]):
    """The GGUF GGUFWriter writes for `plan` (random payloads of the planned sizes)."""
    writer = gguf.GGUFWriter(path=None, arch="llama")
    for k, v in kv.items():
        writer.add_string(k, v)
    for t in plan.tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    header = budget.gguf_header_nbytes(writer)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in plan.tensors:
        writer.write_tensor_data(np.full(t.nbytes, 7, dtype=np.uint8))
    writer.close()
    return header


def test_plan_file_size_is_exact_and_within_target(tmp_path):
    tensors = _fake_model()
    writer = gguf.GGUFWriter(path=None, arch="llama")
    for t in tensors:  # placeholder types: a tensor info's size does not depend on them
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), 0, raw_dtype=QT.F32)
    base = budget.gguf_header_nbytes(writer)
    key = "atd.plan"

    def overhead(plan):  # the header grows with the plan's own summary, stored as a KV string
        return base + budget.gguf_string_kv_nbytes(key, plan.summary_json())

    def floor_for(target):  # every tensor at its cheapest, padded; the summary names the target
        smallest = budget.smallest_plan(tensors, target=f"size {target}", budget_bytes=target)
        return -(-overhead(smallest) // 32) * 32 + sum(-(-min(o.nbytes for o in t.options) // 32) * 32
                                                       for t in tensors)

    floor = floor_for(floor_for(30_000))  # a fixed point once the digit count is right
    assert floor == floor_for(floor) == floor_for(floor - 1)
    largest = floor + sum(max(o.nbytes for o in t.options) for t in tensors)
    previous = np.inf
    for i, target in enumerate(range(floor, largest, (largest - floor) // 7)):
        plan = budget.plan_for_size(tensors, target, overhead=overhead, sensitivity_of=ONE)
        path = tmp_path / f"m{i}.gguf"
        header = _write_gguf(path, plan, {key: plan.summary_json()})
        assert header == overhead(plan)
        assert os.path.getsize(path) == plan.file_bytes <= target
        assert plan.error <= previous + 1e-12  # monotone in the target
        previous = plan.error
    with pytest.raises(BudgetError, match=f"{floor:,} bytes"):
        budget.plan_for_size(tensors, floor - 1, overhead=overhead, sensitivity_of=ONE)


def test_plan_for_size_equals_brute_force():
    tensors = _fake_model(seed=5, n_layers=1)  # 6 tensors: 11 x 4^4 plans
    pad = lambda n: -(-n // 32) * 32  # noqa: E731
    costs = [[pad(o.nbytes) for o in t.options] for t in tensors]
    errors = [[o.error for o in t.options] for t in tensors]
    for target in range(sum(min(c) for c in costs) + 1024, sum(max(c) for c in costs) + 1100, 997):
        plan = budget.plan_for_size(tensors, target, overhead=1000, sensitivity_of=ONE)
        assert plan.file_bytes <= target and plan.method == "exact"
        assert plan.error == pytest.approx(_brute(costs, errors, target - 1024), abs=1e-12)


def test_plan_for_bpw():
    tensors = _fake_model(seed=6, n_layers=1)
    n = sum(t.n_weights for t in tensors)
    costs = [[o.nbytes for o in t.options] for t in tensors]
    errors = [[o.error for o in t.options] for t in tensors]
    lowest = 8 * sum(min(c) for c in costs) / n  # bpw of the smallest plan, from the type table
    just_above, just_below = math.ceil(lowest * 1e6) / 1e6, math.floor(lowest * 1e6) / 1e6
    for bpw in (just_above, lowest + 0.3, lowest + 1.1, lowest + 2.7, lowest + 6.0, 40.0):
        plan = budget.plan_for_bpw(tensors, bpw, sensitivity_of=ONE)
        assert plan.bpw <= bpw and 8 * plan.tensor_bytes <= bpw * n
        assert plan.error == pytest.approx(_brute(costs, errors, int(bpw * n / 8)), abs=1e-12)
    with pytest.raises(BudgetError, match=f"smallest possible, {lowest:.4f} bpw"):
        budget.plan_for_bpw(tensors, just_below, sensitivity_of=ONE)


def test_default_sensitivity():
    names = ["token_embd.weight", "blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.2.ffn_down.weight",
             "blk.0.attn_q.weight", "blk.2.attn_q.weight", "blk.2.attn_norm.weight"]
    tied = budget.default_sensitivity(names)
    mid = budget.ROLE_SENSITIVITY["ffn_down"]
    assert tied("blk.1.ffn_down.weight") == mid
    assert tied("blk.0.ffn_down.weight") == mid * budget.FIRST_LAYER_MULTIPLIER["ffn_down"]
    assert tied("blk.2.ffn_down.weight") == mid * budget.LAST_LAYER_MULTIPLIER["ffn_down"]  # 3 layers
    assert tied("blk.0.attn_q.weight") == tied("blk.2.attn_q.weight") == budget.ROLE_SENSITIVITY["attn_q"]
    assert tied("token_embd.weight") == budget.TIED_EMBEDDING_SENSITIVITY
    untied = budget.default_sensitivity(names + ["output.weight"])
    assert untied("token_embd.weight") == budget.ROLE_SENSITIVITY["token_embd"]
    assert untied("output.weight") == budget.ROLE_SENSITIVITY["output"]
    # weigh() multiplies every option's error, sizes unchanged
    t = TensorOptions("blk.1.ffn_down.weight", (64, 64), (Option(QT.Q8_0, 10, 0.5), Option(QT.F16, 20, 0.25)))
    (w,) = budget.weigh([t], lambda n: 4.0)
    assert [(o.nbytes, o.error) for o in w.options] == [(10, 2.0), (20, 1.0)]


def test_plan_json_roundtrip_and_summary():
    tensors = _fake_model(seed=7)
    plan = budget.plan_for_size(tensors, 10**6, overhead=500, target="size 1MB")
    again = budget.Plan.from_json(plan.to_json())
    assert again.types == plan.types and again.file_bytes == plan.file_bytes and again.error == plan.error
    assert again.to_json() == plan.to_json()
    s = json.loads(plan.summary_json())
    assert s["file_bytes"] == plan.file_bytes and s["tensor_bytes"] == plan.tensor_bytes
    assert sum(v["tensors"] for v in s["types"].values()) == len(tensors)
    assert sum(v["bytes"] for v in s["types"].values()) == plan.tensor_bytes
    assert s["embeddings"] == {"token_embd.weight": plan.type_for("token_embd.weight").name}
    with pytest.raises(BudgetError, match="unreadable plan"):
        budget.Plan.from_json('{"tensors": [["x", [1], "NOPE", 1, 0.0]]}')


# ----------------------------------------------------------------------------- estimates on a real tensor


@pytest.fixture(scope="module")
def smollm2_ffn_up(smollm2_dir):
    from converter.checkpoint import Checkpoint
    from converter.llama import LlamaModel

    tensors = LlamaModel(Checkpoint(smollm2_dir)).tensors()
    source = next(t for t in tensors if t.name == "blk.12.ffn_up.weight")
    return source.name, source.load()


def test_estimates_on_smollm2_rank_planes_and_match_the_full_tensor(smollm2_ffn_up):
    name, w = smollm2_ffn_up  # 1536 x 576: 456 of 1536 rows sampled
    h = np.random.default_rng(0).gamma(0.5, 1.0, w.shape[1]).astype(np.float32)  # a skewed imatrix
    est = budget.estimate_tensor(name, w, importance=h)
    atd = [o for o in est.options if gguf_types.is_atd_type_id(o.qtype)]
    assert [gguf_types.atd_type(int(o.qtype)).planes for o in atd] == [1, 2, 3, 4]
    errs = [o.error for o in atd]
    assert errs[0] > errs[1] > errs[2] > errs[3] > 0
    assert est.sampled_rows == budget.sample_size(*w.shape) == 456 < w.shape[0]
    for o in atd:
        exact = _row_mean_ratio(w, o.qtype, h.astype(np.float64))
        # stated tolerance: within 5 % and within 4 of its own standard errors
        assert abs(o.error - exact) <= 0.05 * exact
        assert abs(o.error - exact) <= 4 * o.rel_stderr * exact
        assert 0 < o.rel_stderr < 0.05
    again = budget.estimate_tensor(name, w, importance=h)
    assert again == est  # deterministic


def _row_mean_ratio(w, qtype, h):
    """The error definition written out: mean over live rows of sum h (w - ŵ)^2 / sum h w^2."""
    w64 = w.astype(np.float64)
    noise = ((w64 - budget.default_roundtrip(qtype, w, h)) ** 2) @ h
    signal = (w64 ** 2) @ h
    return float(np.mean(noise[signal > 0] / signal[signal > 0]))


def test_estimate_from_rows_and_fixed_tensors(smollm2_ffn_up):
    name, w = smollm2_ffn_up
    types = budget.candidate_types(name, w.shape)[:2]
    idx = budget.sample_rows(*w.shape)
    full = budget.estimate_tensor(name, w, types=types)
    assert budget.estimate_from_rows(name, w.shape, w[idx], types=types) == full  # the sampled rows suffice
    for o, q in zip(full.options, types):
        assert o.nbytes == budget.tensor_nbytes(q, w.shape)
        assert o.error == pytest.approx(_row_mean_ratio(w[idx], q, np.ones(w.shape[1])), rel=1e-9)
    # every row sampled: exact, no sampling error; all-zero rows are left out of the mean
    w2 = w[:300].copy()
    w2[5] = 0
    every = budget.estimate_tensor(name, w2, types=types, min_rows=300)
    assert every.sampled_rows == 300 and all(o.rel_stderr == 0 for o in every.options)
    expected = _row_mean_ratio(w2, types[0], np.ones(w.shape[1]))
    assert every.options[0].error == pytest.approx(expected, rel=1e-9)
    norm = budget.estimate_tensor("blk.0.attn_norm.weight", np.ones(576, np.float32))
    assert norm.options == (Option(QT.F32, 576 * 4, 0.0),)
    with pytest.raises(ValueError, match="columns"):
        budget.estimate_tensor(name, w, types=types, importance=np.ones(5))


def test_estimate_edge_cases():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    q8 = (QT.Q8_0,)
    # all-zero importance: unweighted, as the fit does
    assert budget.estimate_tensor("blk.0.attn_q.weight", w, types=q8, importance=np.zeros(128)) == \
        budget.estimate_tensor("blk.0.attn_q.weight", w, types=q8)
    # beyond fp16: ATD cannot hold it (dropped; a linear weight falls back to Q8_0), F16 never chosen
    big = w * 1e6
    emb = budget.estimate_tensor("token_embd.weight", big)
    kinds = {o.qtype: o.error for o in emb.options}
    assert not any(gguf_types.is_atd_type_id(q) for q in kinds)
    assert kinds[QT.F16] == math.inf and math.isfinite(kinds[QT.Q8_0])
    lin = budget.estimate_tensor("blk.0.attn_q.weight", big)
    assert [o.qtype for o in lin.options] == [QT.Q8_0]
