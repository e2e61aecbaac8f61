"""Tokenizer -> tokenizer.ggml.* keys, as llama.cpp's converter writes a GPT-2-style BPE vocab.

The token list comes from tokenizer.json through the `tokenizers` library (no transformers);
merges, special ids, add_bos/add_eos and the chat template come from gguf.SpecialVocab.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import gguf

from .errors import AtdError

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids its tokenizer gives for this
# text (convert_hf_to_gguf.py, get_vocab_base_pre); the same text and hash rule here.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated)"
    " ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～"
    " ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there,"
    " 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids)) -> llama.cpp pre-tokenizer name, for the Llama-family tokenizers we support.
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM/SmolLM2
}


class SpecialVocab(gguf.SpecialVocab):
    """gguf 0.19.0's SpecialVocab plus two rules of the pinned llama.cpp's newer gguf-py:
    a ByteLevel post-processor defaults add_bos/add_eos to false, and lowercase/strip-accents
    normalizers are recorded."""

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        loaded = super()._try_load_from_tokenizer_json(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            return loaded
        spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        post = spec.get("post_processor") or {}
        if any(p.get("type") == "ByteLevel" for p in post.get("processors", [post])):
            self.add_special_token.setdefault("bos", False)
            self.add_special_token.setdefault("eos", False)
        self.normalizer_flags = _normalizer_flags(spec.get("normalizer") or {})
        return loaded

    def add_to_gguf(self, gw: gguf.GGUFWriter, quiet: bool = False) -> None:
        super().add_to_gguf(gw, quiet=quiet)
        for key, value in getattr(self, "normalizer_flags", {}).items():
            gw.add_bool(key, value)


# keys of the pinned llama.cpp that gguf 0.19.0 lacks
NORMALIZER_LOWERCASE = "tokenizer.ggml.normalizer.lowercase"
NORMALIZER_STRIP_ACCENTS = "tokenizer.ggml.normalizer.strip_accents"


def _normalizer_flags(normalizer: dict) -> dict[str, bool]:
    kind = normalizer.get("type")
    if kind == "Lowercase":
        return {NORMALIZER_LOWERCASE: True}
    if kind == "StripAccents":
        return {NORMALIZER_STRIP_ACCENTS: True}
    if kind == "BertNormalizer":
        names = {"lowercase": NORMALIZER_LOWERCASE,
                 "strip_accents": NORMALIZER_STRIP_ACCENTS}
        return {key: bool(normalizer[k]) for k, key in names.items() if normalizer.get(k) is not None}
    if kind == "Sequence":
        flags: dict[str, bool] = {}
        for child in normalizer.get("normalizers", []):
            flags.update(_normalizer_flags(child))
        return flags
    return {}


def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


class BpeVocab:
    def __init__(self, directory: Path, n_vocab: int):
        path = directory / "tokenizer.json"
        if not path.is_file():
            if (directory / "tokenizer.model").is_file():
                raise AtdError(f"{directory}: SentencePiece tokenizers (tokenizer.model) are not supported yet")
            raise AtdError(f"{directory}: no tokenizer.json")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            model = spec["model"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise AtdError(f"{path}: unreadable tokenizer ({e})") from None
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise AtdError(f"{path}: only GPT-2-style byte-level BPE tokenizers are supported "
                           f"(got {model.get('type')}, byte_fallback={model.get('byte_fallback')})")
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.added = {t["id"]: t for t in spec.get("added_tokens", [])}
        self.n_vocab = n_vocab
        self.directory = directory

    def pre_tokenizer(self) -> str:
        ids = self.tokenizer.encode(CHECK_TEXT).ids
        digest = sha256(str(ids).encode()).hexdigest()
        if digest not in KNOWN_PRE_TOKENIZERS:
            raise AtdError(f"unrecognized BPE pre-tokenizer (hash {digest[:16]}…); "
                           f"known: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}")
        return KNOWN_PRE_TOKENIZERS[digest]

    def tokens(self) -> tuple[list[str], list[int]]:
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        if vocab and max(vocab.values()) >= self.n_vocab:
            raise AtdError(f"tokenizer has token id {max(vocab.values())} but config vocab_size is "
                           f"{self.n_vocab} (config and tokenizer disagree)")
        by_id = {i: t for t, i in vocab.items()}
        tokens: list[str] = []
        types: list[int] = []
        for i in range(self.n_vocab):
            token = by_id.get(i)
            if token is None:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            added = self.added.get(i)
            if added is None:
                types.append(gguf.TokenType.NORMAL)
            else:
                if not added.get("normalized", True):
                    ids = self.tokenizer.encode(token, add_special_tokens=False).ids
                    token = self.tokenizer.decode(ids, skip_special_tokens=False)
                if added.get("special") or _looks_special(token):
                    types.append(gguf.TokenType.CONTROL)
                else:
                    token = token.replace("\u2581", " ")
                    types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        return tokens, types

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        config = self.directory / "tokenizer_config.json"
        if config.is_file():
            prefix = json.loads(config.read_text(encoding="utf-8")).get("add_prefix_space")
            if prefix is not None:
                writer.add_add_space_prefix(prefix)
        tokens, types = self.tokens()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre_tokenizer())
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        SpecialVocab(self.directory, load_merges=True).add_to_gguf(writer, quiet=True)
