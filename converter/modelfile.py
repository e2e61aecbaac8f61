"""Ollama Modelfile for a GGUF: FROM, a Go TEMPLATE derived from the GGUF's Jinja chat template,
PARAMETER lines (stops and options checked against Ollama's parameter table), SYSTEM and LICENSE.

The grammar written here is the one Ollama's parser (parser/parser.go) reads: commands are
case-insensitive words followed by a value; a value is bare (the rest of the line, trimmed),
"…" or \"\"\"…\"\"\" (both may span lines; the text between the quotes is taken verbatim, with no
escapes). See docs/ollama.md.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AtdError
from .fsutil import atomic_output

# --- chat templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatTemplate:
    """An Ollama Go template with its stop strings."""

    name: str
    template: str
    stops: tuple[str, ...]


#: Ollama's llama3-instruct template (template/llama3-instruct.gotmpl). A SYSTEM message reaches
#: it as the first entry of .Messages, which is how Ollama hands the system prompt to templates
#: that range over .Messages.
LLAMA3_INSTRUCT = ChatTemplate(
    "llama3-instruct",
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n"
    "\n"
    "{{ .Content }}<|eot_id|>\n"
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n"
    "\n",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)

#: ChatML as Ollama writes it (template/chatml.gotmpl, .Messages form): <|im_start|>role\ncontent<|im_end|>\n
CHATML = ChatTemplate(
    "chatml",
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n",
    ("<|im_start|>", "<|im_end|>"),
)

KNOWN_TEMPLATES = (LLAMA3_INSTRUCT, CHATML)

_LLAMA3_MARKERS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
# A literal default system prompt inside a ChatML Jinja string ('<|im_start|>system\nYou are …<|im_end|>'),
# i.e. text with no quote/brace/tag in it; '<|im_start|>system\n' + message['content'] does not match.
_CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<|]+?)<\|im_end\|>")


def detect_template(jinja: str | None) -> ChatTemplate | None:
    """The Ollama template for a Jinja chat template, recognized by its role markers; None if unknown.

    Llama-3 instruct: <|start_header_id|>, <|end_header_id|> and <|eot_id|> all present.
    ChatML: <|im_start|> and <|im_end|> present. Both must loop over `messages`.
    """
    if not jinja or "messages" not in jinja:
        return None
    if all(m in jinja for m in _LLAMA3_MARKERS):
        return LLAMA3_INSTRUCT
    if all(m in jinja for m in _CHATML_MARKERS):
        return CHATML
    return None


def default_system_prompt(jinja: str | None, template: ChatTemplate | None) -> str | None:
    """The system message a ChatML Jinja template inserts when the conversation has none (e.g. SmolLM2's
    "You are a helpful AI assistant named SmolLM, …"), so that Ollama renders the same prompt."""
    if not jinja or template is not CHATML:
        return None
    found = _CHATML_DEFAULT_SYSTEM.search(jinja)
    if found is None:
        return None
    text = found.group(1).replace("\\n", "\n").strip()
    return text or None


# --- parameters ----------------------------------------------------------------------------------

#: Ollama's PARAMETER names and value types (api.Options / api.Runner fields).
PARAMETER_TYPES: dict[str, str] = {
    **{name: "int" for name in ("num_ctx", "num_predict", "top_k", "seed", "repeat_last_n", "num_keep",
                                "num_batch", "num_gpu", "num_thread", "main_gpu", "draft_num_predict")},
    **{name: "float" for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                                  "presence_penalty", "frequency_penalty")},
    "stop": "string-list",
    "use_mmap": "bool",
}

_GO_BOOLS = {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
             "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False}
_INT = re.compile(r"[+-]?[0-9]+")


def check_parameter(name: str, value: str) -> str:
    """Validate one PARAMETER against Ollama's table; returns the value text to write. Raises AtdError."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise AtdError(f"unknown Ollama parameter {name!r} (known: {', '.join(sorted(PARAMETER_TYPES))})")
    if kind == "int":
        if not _INT.fullmatch(value.strip()):
            raise AtdError(f"parameter {name} takes an integer, got {value!r}")
        return str(int(value))
    if kind == "float":
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise AtdError(f"parameter {name} takes a number, got {value!r}")
        return value.strip()
    if kind == "bool":
        if value.strip() not in _GO_BOOLS:
            raise AtdError(f"parameter {name} takes true or false, got {value!r}")
        return "true" if _GO_BOOLS[value.strip()] else "false"
    if value == "":
        raise AtdError("parameter stop takes a non-empty string")
    return value


def parse_param_option(text: str) -> tuple[str, str]:
    """NAME=VALUE from --param, validated."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise AtdError(f"--param takes NAME=VALUE, got {text!r}")
    name = name.strip()
    return name, check_parameter(name, value)


# --- quoting --------------------------------------------------------------------------------------

_SAFE_BARE = re.compile(r"[^\s\"#][^\n\r\"]*")


def quote_value(value: str, *, force_quotes: bool = False) -> str:
    """Write a value so that Ollama's parser reads back exactly `value`.

    Bare when that is unambiguous (one line, no quotes, no surrounding whitespace), "…" for one line
    without a double quote, \"\"\"…\"\"\" otherwise. Ollama's parser drops non-printable characters other
    than tab/newline and has no escapes, so those and a literal \"\"\" cannot be written.
    """
    for ch in value:
        if ch not in "\t\n\r" and not ch.isprintable():
            raise AtdError(f"cannot write {value[:40]!r} in a Modelfile: it contains the control character {ch!r}")
    one_line = "\n" not in value and "\r" not in value
    if one_line and not force_quotes and value == value.strip() and _SAFE_BARE.fullmatch(value):
        return value
    if one_line and '"' not in value:
        return f'"{value}"'
    if '"""' in value:
        raise AtdError(f'cannot write {value[:40]!r} in a Modelfile: it contains """')
    return f'"""{value}"""'


# --- the Modelfile ---------------------------------------------------------------------------------


@dataclass
class ModelfileOptions:
    system: str | None = None                      # None: the template's default system prompt, if any
    params: list[tuple[str, str]] = field(default_factory=list)   # (name, value), already validated
    force: bool = False


@dataclass(frozen=True)
class ModelfileResult:
    path: Path
    text: str
    template: ChatTemplate | None
    system: str | None
    atd_types: dict[str, int]       # ATD type name -> number of tensors
    warnings: list[str]


# --- reading what the Modelfile needs from a GGUF -------------------------------------------------

@dataclass(frozen=True)
class GgufHeader:
    strings: dict[str, str]          # scalar string metadata
    tensor_types: dict[str, int]     # tensor name -> ggml type id


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Scalar string metadata and tensor type ids of a GGUF (a bounded scan; arrays are not loaded)."""
    from .inspect_gguf import read_layout

    return header_of(read_layout(path))


def header_of(layout) -> GgufHeader:
    """The GgufHeader of an inspect_gguf.GgufLayout."""
    return GgufHeader({key: value for key, value in layout.metadata.items() if isinstance(value, str)},
                      {t.name: t.type_id for t in layout.tensors})


def atd_types_of(header: GgufHeader) -> dict[str, int]:
    """ATD type name -> tensor count (empty for a stock-typed file)."""
    import gguf_types

    by_id = {t.ggml_type: t.name for t in gguf_types.ATD_TYPES}
    counts: dict[str, int] = {}
    for type_id in header.tensor_types.values():
        if type_id in by_id:
            counts[by_id[type_id]] = counts.get(by_id[type_id], 0) + 1
    return dict(sorted(counts.items()))


def atd_tensor_types(gguf_path: str | Path) -> dict[str, int]:
    return atd_types_of(read_gguf_header(gguf_path))


@dataclass(frozen=True)
class OllamaConfig:
    """What Ollama needs besides the weights: the template, its stops, a default system prompt."""

    template: ChatTemplate | None
    system: str | None
    license: str | None
    chat_template: str | None
    atd_types: dict[str, int]


def ollama_config(gguf_path: str | Path, header: GgufHeader | None = None) -> OllamaConfig:
    """What Ollama needs from the GGUF (header: already read, to save a second read)."""
    header = header or read_gguf_header(gguf_path)
    jinja = header.strings.get("tokenizer.chat_template")
    template = detect_template(jinja)
    license = (header.strings.get("general.license") or "").strip() or None
    return OllamaConfig(template, default_system_prompt(jinja, template), license, jinja, atd_types_of(header))


def default_modelfile_path(gguf_path: Path) -> Path:
    """MODEL.gguf -> MODEL.Modelfile in the same directory."""
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def from_path(gguf_path: Path, modelfile_path: Path) -> str:
    """The GGUF's path relative to the Modelfile's directory, './name.gguf' style (Ollama resolves FROM there)."""
    # abspath, not resolve(): a symlinked GGUF stays referenced by its link, as the user named it
    rel = Path(os.path.relpath(os.path.abspath(gguf_path), os.path.abspath(modelfile_path.parent))).as_posix()
    return rel if rel.startswith("../") else f"./{rel}"


ATD_WARNING = (
    "{name} has ATD tensor types ({types}). Stock Ollama cannot load ATD tensors: 'ollama create' will "
    "fail on this file. Use 'atd-gguf export --stock' to write a stock-typed GGUF for Ollama, or see "
    "docs/ollama.md for what an Ollama build with native ATD support needs."
)


def build_modelfile(gguf_path: str | Path, output: str | Path | None = None,
                    options: ModelfileOptions | None = None) -> ModelfileResult:
    """The Modelfile text for a GGUF (nothing is written). Raises AtdError on bad input."""
    from .inspect_gguf import printable

    options = options or ModelfileOptions()
    gguf_path = Path(gguf_path)
    output = Path(output) if output is not None else default_modelfile_path(gguf_path)
    config = ollama_config(gguf_path)
    atd = config.atd_types
    warnings: list[str] = []
    # file names go into comment lines and messages escaped: a line break in one would start a command
    name = printable(gguf_path.name)

    lines = [f"# Ollama Modelfile for {name}, written by atd-gguf",
             f"# ollama create NAME -f {printable(output.name)}"]
    lines.append(f"FROM {quote_value(from_path(gguf_path, output))}")

    template = config.template
    if template is not None:
        lines.append(f"TEMPLATE {quote_value(template.template)}")
    elif config.chat_template:
        warnings.append(f"{name}: unrecognized chat template (neither Llama-3 instruct nor ChatML); "
                        "the Modelfile has no TEMPLATE, so Ollama uses the GGUF's own template")
    else:
        warnings.append(f"{name}: no tokenizer.chat_template in the GGUF; the Modelfile has no "
                        "TEMPLATE, so Ollama falls back to its default prompt format")

    stops = list(template.stops) if template else []
    seen: set[str] = set()
    others: list[tuple[str, str]] = []
    for name, value in options.params:
        value = check_parameter(name, value)
        if name == "stop":
            stops.append(value)
        elif name in seen:
            raise AtdError(f"parameter {name} given more than once")
        else:
            seen.add(name)
            others.append((name, value))
    for stop in dict.fromkeys(stops):
        lines.append(f"PARAMETER stop {quote_value(stop, force_quotes=True)}")
    for name, value in others:
        lines.append(f"PARAMETER {name} {quote_value(value)}")

    system = options.system if options.system is not None else config.system
    if system:
        lines.append(f"SYSTEM {quote_value(system)}")
    if config.license:
        lines.append(f"LICENSE {quote_value(config.license)}")

    if atd:
        types = ", ".join(f"{name}: {n} tensors" for name, n in atd.items())
        warnings.append(ATD_WARNING.format(name=name, types=types))
    return ModelfileResult(output, "\n".join(lines) + "\n", template, system or None, atd, warnings)


def write_modelfile(gguf_path: str | Path, output: str | Path | None = None,
                    options: ModelfileOptions | None = None) -> ModelfileResult:
    """Build the Modelfile for a GGUF and write it (default: MODEL.Modelfile next to MODEL.gguf)."""
    options = options or ModelfileOptions()
    result = build_modelfile(gguf_path, output, options)
    with atomic_output(result.path, options.force) as tmp:
        tmp.write_text(result.text, encoding="utf-8", newline="\n")
    return result
