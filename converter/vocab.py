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
    """gguf 0.19.0's SpecialVocab plus the rules of the pinned llama.cpp's newer gguf-py:
    - a ByteLevel post-processor defaults add_bos/add_eos to false;
    - what the post-processor decides about add_bos/add_eos/add_sep wins over tokenizer_config.json's
      add_*_token (0.19.0 lets the config win);
    - a TemplateProcessing whose single sequence starts with a special token that is neither
      bos_token nor cls_token makes that token the bos (and cls) token where the config names none;
    - lowercase/strip-accents normalizers are recorded."""

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        loaded = super()._try_load_from_tokenizer_json(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            return loaded
        spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
        decided, adopted = _post_processor_decisions(spec.get("post_processor") or {}, config or {})
        if config:  # without a tokenizer_config.json both versions keep the post-processor's flags as set
            self.add_special_token = decided | {k: v for k, v in self.add_special_token.items() if k not in decided}
            ids = {t.get("content"): t.get("id") for t in spec.get("added_tokens", [])}
            for typ, token in adopted.items():
                self._set_special_token(typ, ids.get(token))
            # ids set from tokenizer_config.json come in special_token_types order, adopted ones included
            order = {typ: i for i, typ in enumerate(self.special_token_types)}
            self.special_token_ids = dict(sorted(self.special_token_ids.items(),
                                                 key=lambda kv: order.get(kv[0], len(order))))
        else:
            for typ, flag in decided.items():
                self.add_special_token.setdefault(typ, flag)
        self.normalizer_flags = _normalizer_flags(spec.get("normalizer") or {})
        return loaded

    def add_to_gguf(self, gw: gguf.GGUFWriter, quiet: bool = False) -> None:
        super().add_to_gguf(gw, quiet=quiet)
        for key, value in getattr(self, "normalizer_flags", {}).items():
            gw.add_bool(key, value)


def _special_id(item: dict) -> str | None:
    special = item.get("SpecialToken") if isinstance(item, dict) else None
    return special.get("id") if isinstance(special, dict) else None


def _post_processor_decisions(post: dict, config: dict) -> tuple[dict[str, bool], dict[str, str]]:
    """(add_* flags the post-processor decides, special tokens it names that the config lacks) under the
    pinned gguf-py's reading of tokenizer.json's post_processor with a tokenizer_config.json present."""
    bos, cls, eos, sep = (config.get(f"{t}_token") for t in ("bos", "cls", "eos", "sep"))
    bos = bos or cls
    eos = eos or sep
    decided: dict[str, bool] = {}
    adopted: dict[str, str] = {}
    processors = post.get("processors", [post]) if isinstance(post, dict) else []
    for processor in processors:
        kind = processor.get("type") if isinstance(processor, dict) else None
        if kind == "ByteLevel":
            decided.setdefault("bos", False)
            decided.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            decided.update(bos=True, eos=True, sep=True)
            cls = cls or (processor.get("cls") or [bos])[0]
            sep = sep or (processor.get("sep") or [eos])[0]
        elif kind == "TemplateProcessing":
            single, pair = processor.get("single") or [], processor.get("pair") or []
            first = last = None
            if len(single) > 1:
                if first := _special_id(single[0]):
                    if first not in (bos, cls):
                        if not bos:
                            bos = adopted["bos"] = first
                        if not cls:
                            cls = adopted["cls"] = first
                    decided["bos"] = first in (bos, cls)
                if last := _special_id(single[-1]):
                    eos = last  # a different trailing token replaces eos_token (the old one becomes eot)
                    decided["eos"] = True
            start = 1 if first and pair and _special_id(pair[0]) == first else 0
            stop = -1 if last and pair and _special_id(pair[-1]) == last else None
            middle = pair[start:stop]
            if (middle and isinstance(middle[0], dict) and isinstance(middle[-1], dict)
                    and (middle[0].get("Sequence") or {}).get("id") == "A"
                    and (middle[-1].get("Sequence") or {}).get("id") == "B" and middle[1:-1]):
                between = [_special_id(item) for item in middle[1:-1]]
                add_sep = bool(between[0] in (sep, eos) and between[0] and not last)
                if len(between) == 2 and between[1] and between[1] in (sep, eos):
                    add_sep = True
                decided["sep"] = add_sep
    return decided, adopted


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


GRANITE_SMALL_VOCAB_SIZE = 49152


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
        special = SpecialVocab(self.directory, load_merges=True)
        # llama.cpp's Llama converter (conversion/llama.py, "granite small models") turns add_bos off for
        # every 49152-token vocab, SmolLM's included, whatever the tokenizer files say
        if self.n_vocab == GRANITE_SMALL_VOCAB_SIZE and "bos" in special.add_special_token:
            special.add_special_token["bos"] = False
        special.add_to_gguf(writer, quiet=True)
        if self.n_vocab == GRANITE_SMALL_VOCAB_SIZE and "bos" not in special.add_special_token:
            writer.add_add_bos_token(False)
