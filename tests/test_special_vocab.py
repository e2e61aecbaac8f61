"""converter.vocab.SpecialVocab reads tokenizer files as the pinned llama.cpp's gguf-py does (run from
its own source tree as the reference), including the rules that PyPI gguf 0.19.0 lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from converter.vocab import SpecialVocab

ADDED = ["<s>", "</s>", "<unk>", "<cls>", "<sep>", "<|begin|>", "<|x|>"]


def _special(token: str, type_id: int = 0) -> dict:
    return {"SpecialToken": {"id": token, "type_id": type_id}}


def _seq(name: str, type_id: int = 0) -> dict:
    return {"Sequence": {"id": name, "type_id": type_id}}


def _template(single: list, pair: list) -> dict:
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": {}}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}

# name -> (post_processor, normalizer, tokenizer_config or None)
CASES = {
    "transformers5_single_A": (_template([_seq("A")], [_seq("A"), _seq("B", 1)]), None,
                               {"bos_token": "<s>", "eos_token": "</s>"}),
    "byte_level_beats_config_add_bos": (BYTE_LEVEL, None,
                                        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}),
    "template_beats_config_add_bos": (
        {"type": "Sequence", "processors": [BYTE_LEVEL, _template([_special("<s>"), _seq("A")],
                                                                  [_special("<s>"), _seq("A"), _seq("B", 1)])]},
        None, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}),
    "unknown_leading_token_becomes_cls": (_template([_special("<|x|>"), _seq("A")], []), None,
                                          {"bos_token": "<s>", "eos_token": "</s>"}),
    "leading_token_becomes_bos": (_template([_special("<|begin|>"), _seq("A")], []), None, {"eos_token": "</s>"}),
    "roberta_beats_config_add_eos": ({"type": "RobertaProcessing", "sep": ["<sep>", 4], "cls": ["<cls>", 3]}, None,
                                     {"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": False}),
    "sep_pair_beats_config_add_sep": (
        _template([_special("<cls>"), _seq("A")], [_special("<cls>"), _seq("A"), _special("<sep>"), _seq("B", 1)]),
        None, {"cls_token": "<cls>", "sep_token": "<sep>", "add_sep_token": False}),
    "no_tokenizer_config_byte_level": (BYTE_LEVEL, None, None),
    "normalizers": (None, {"type": "Sequence", "normalizers": [
        {"type": "BertNormalizer", "lowercase": False, "strip_accents": True}, {"type": "Lowercase"}]},
        {"bos_token": "<s>"}),
}


def _write_case(directory: Path, post, normalizer, config) -> None:
    directory.mkdir()
    added = [{"id": i, "content": t, "special": True} for i, t in enumerate(ADDED)]
    tokenizer = {"added_tokens": added, "normalizer": normalizer, "post_processor": post,
                 "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(ADDED)}, "merges": []}}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))


def _summary(vocab) -> dict:
    normalizer = getattr(vocab, "normalizer_flags", None)
    if normalizer is None:  # the reference keeps them as attributes
        normalizer = {key: value for key, value in (
            ("tokenizer.ggml.normalizer.lowercase", getattr(vocab, "normalizer_lowercase", None)),
            ("tokenizer.ggml.normalizer.strip_accents", getattr(vocab, "normalizer_strip_accents", None)))
            if value is not None}
    return {"add": vocab.add_special_token, "ids": vocab.special_token_ids, "normalizer": normalizer}


REFERENCE_SCRIPT = """
import json, sys
import gguf
assert "gguf-py" in gguf.__file__, gguf.__file__
out = {}
for path in sys.argv[1:]:
    v = gguf.SpecialVocab(path, n_vocab=%d)
    norm = {k: val for k, val in (("tokenizer.ggml.normalizer.lowercase", v.normalizer_lowercase),
                                  ("tokenizer.ggml.normalizer.strip_accents", v.normalizer_strip_accents))
            if val is not None}
    out[path] = {"add": v.add_special_token, "ids": v.special_token_ids, "normalizer": norm}
print(json.dumps(out))
""" % len(ADDED)


@pytest.fixture(scope="module")
def reference(llama_cpp_src, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("special-vocab")
    dirs = {}
    for name, (post, normalizer, config) in CASES.items():
        _write_case(root / name, post, normalizer, config)
        dirs[name] = root / name
    proc = subprocess.run([sys.executable, "-c", REFERENCE_SCRIPT, *map(str, dirs.values())], check=True,
                          capture_output=True, text=True,
                          env={"PYTHONPATH": str(llama_cpp_src / "gguf-py"), "PATH": "/usr/bin:/bin"})
    found = json.loads(proc.stdout)
    return {name: (path, found[str(path)]) for name, path in dirs.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_special_vocab_matches_pinned_gguf_py(case, reference):
    path, expected = reference[case]
    assert json.loads(json.dumps(_summary(SpecialVocab(path, n_vocab=len(ADDED))))) == expected


def test_cases_exercise_rules_gguf_0_19_lacks(reference):
    """Most cases differ between PyPI gguf and the pinned gguf-py, so the comparison above tests our rules."""
    differing = [name for name, (path, expected) in reference.items()
                 if json.loads(json.dumps(_summary(gguf.SpecialVocab(path, n_vocab=len(ADDED))))) != expected]
    assert len(differing) >= 6, differing
