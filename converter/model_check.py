"""Checks on a GGUF before it is handed to llama.cpp (`run`, `serve`, the Python API), and the
explanation when llama.cpp refuses it.

Up front, check_runnable: the file and its magic, the header through inspect_gguf.read_layout (a
bounded scan, under a second for a Llama-3 vocabulary) and the defects on which llama.cpp aborts
with a signal instead of refusing the file. After llama.cpp failed, explain_load_failure (a full
read: truncated file, ATD format 1, ...) and llama_log_cause (the line of llama.cpp's log that
names the cause) say why in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import AtdError

GGUF_MAGIC = b"GGUF"


def check_gguf(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise AtdError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise AtdError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC.decode()})")
    return path


def explain_load_failure(path: Path, runtime: str, detail: str) -> AtdError:
    """The file's own defect if it has one, else what the runtime said."""
    from .inspect_gguf import read_gguf

    try:
        read_gguf(path)
    except AtdError as e:
        return e
    return AtdError(f"{runtime} failed on {path}: {detail}")


# ---- before llama.cpp runs a file: what the pinned llama.cpp aborts on (a signal, not an error line) ----

# ggml's CPU buffers assert that every tensor's data pointer is a multiple of this (TENSOR_ALIGNMENT)
GGML_TENSOR_ALIGNMENT = 32
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"


def check_runnable(path: str | Path):
    """check_gguf, then the whole header (inspect_gguf.read_layout), then the defects on which llama.cpp
    aborts instead of refusing the file. Returns the GgufLayout. Reads no tensor data: invalid ATD
    data is left to llama.cpp's --check-tensors (see converter/run.py)."""
    from .inspect_gguf import printable, read_layout

    path = check_gguf(path)
    layout = read_layout(path)
    for check in (_alignment_problem, _head_count_problem, _chat_template_problem, _tensor_type_problem):
        problem = check(layout)
        if problem is not None:
            raise AtdError(f"{printable(path)}: {printable(problem)}: llama.cpp would abort on it")
    return layout


def _alignment_problem(layout) -> str | None:
    for t in layout.tensors:
        if t.offset % GGML_TENSOR_ALIGNMENT:
            alignment = layout.metadata.get("general.alignment", "not set")
            return (f"tensor {t.name!r} starts at byte {t.offset:,}, not a multiple of {GGML_TENSOR_ALIGNMENT} "
                    f"(general.alignment is {alignment})")
    return None


def _head_count_problem(layout) -> str | None:
    arch = layout.metadata.get("general.architecture")
    n_head = layout.metadata.get(f"{arch}.attention.head_count")
    n_head_kv = layout.metadata.get(f"{arch}.attention.head_count_kv", n_head)
    if type(n_head) is not int or type(n_head_kv) is not int or n_head <= 0:
        return None  # per-layer arrays, or an architecture without attention: llama.cpp's own checks
    if n_head_kv <= 0 or n_head % n_head_kv:
        return (f"{arch}.attention.head_count {n_head} is not a multiple of "
                f"{arch}.attention.head_count_kv {n_head_kv}")
    return None


def chat_template_problem(template: str) -> str | None:
    """Why a chat template does not parse (jinja2's parser standing in for llama.cpp's), or None."""
    import jinja2
    import jinja2.ext

    class GenerationTag(jinja2.ext.Extension):
        """transformers' {% generation %}…{% endgeneration %} marker: its body renders as is."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols", GenerationTag]).parse(template)
    except jinja2.TemplateSyntaxError as e:
        return f"{e.message} (line {e.lineno})"
    return None


def _chat_template_problem(layout) -> str | None:
    # llama-completion parses the template at start-up even without --chat
    for key, value in layout.metadata.items():
        if (key == CHAT_TEMPLATE_KEY or key.startswith(CHAT_TEMPLATE_KEY + ".")) and isinstance(value, str):
            problem = chat_template_problem(value)
            if problem is not None:
                return f"the chat template {key} does not parse: {problem}"
    return None


def _tensor_type_problem(layout) -> str | None:
    import gguf

    # 1-D tensors (norms, biases, rope factors) meet F32 activations in add/mul, which take only F32
    # there; ATD and the other block types are for the 2-D matrices of mul_mat and get_rows
    for t in layout.tensors:
        if len(t.shape) <= 1 and t.type_id != gguf.GGMLQuantizationType.F32:
            return (f"tensor {t.name!r} is 1-D but stored as {_type_name(t.type_id)}: llama.cpp adds and multiplies "
                    "1-D tensors (norms, biases) only in F32")
    return None


def _type_name(type_id: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


# ---- after llama.cpp failed: the line of its log that names the cause ----

# common/log.cpp's prefix with timestamps: "0.01.357.271 E "
_LOG_LEVEL_PREFIX = re.compile(r"^\s*\d+\.\d+\.\d+\.\d+\s+([DIWE])\s+")
# GGML_ABORT / GGML_ASSERT print "path/file.cpp:135: message" before raising SIGABRT
_ABORT_LINE = re.compile(r"^\S+\.(?:c|cc|cpp|h|hpp):\d+: (.+)$")
# gdb's backtrace when ggml aborts (GGML_NO_BACKTRACE unset): source lines, frames, thread notes
_DEBUGGER_NOISE = re.compile(r"^(\d+\t|#\d+\s|\[New |\[Thread |\[Inferior |ptrace: |No stack\.|The program is not "
                             r"being run\.|Using host libthread_db|warning: )")
# the wrappers llama.cpp logs after the real error: never the cause
_FALLOUT = ("failed to load model", "unable to create context", "unable to load model",
            "encountered an error while trying to fit params", "failed to initialize chat template",
            "please consider disabling jinja", "found tensors with invalid data", "error: failed to load",
            "exiting due to model loading error")
_MODEL_LOAD_ERROR = "error loading model: "


def _log_entries(log: str) -> list[tuple[str, str]]:
    """(level, message) per log line; level is "" for lines printed without llama.cpp's prefix."""
    entries = []
    for raw in log.splitlines():
        if not raw.strip() or _DEBUGGER_NOISE.match(raw):
            continue
        match = _LOG_LEVEL_PREFIX.match(raw)
        if match:
            message = raw[match.end():].strip()
            if message:
                entries.append((match.group(1), message))
        else:
            entries.append(("", raw.strip()))
    return entries


def llama_log_cause(log: str) -> str | None:
    """The line of a llama.cpp log (stderr) that says why it failed: the abort message of GGML_ABORT /
    GGML_ASSERT, else the first error-level line that is not fallout of an earlier one, else an
    uncaught exception's what(), else the last error-looking line. None for an empty log."""
    entries = _log_entries(log)
    for _, message in entries:
        abort = _ABORT_LINE.match(message)
        if abort:
            return abort.group(1).strip()
    errors = [message for level, message in entries if level == "E"]
    for message in errors:
        if not any(fallout in message.lower() for fallout in _FALLOUT):
            return _with_validation_detail(message.split(_MODEL_LOAD_ERROR, 1)[-1], entries)
    for _, message in entries:
        if message.startswith("what():") and message != "what():  std::exception":
            return message
    if errors:
        return errors[0].split(_MODEL_LOAD_ERROR, 1)[-1]
    for _, message in reversed(entries):
        low = message.lower()
        if "error" in low or "failed" in low or "invalid" in low:
            return message
    return f"its last log line: {entries[-1][1]}" if entries else None


def _with_validation_detail(message: str, entries: list[tuple[str, str]]) -> str:
    """--check-tensors logs "tensor 'x' has invalid data"; ggml_validate_row_data printed why just before."""
    if "has invalid data" in message:
        for _, line in entries:
            if line.startswith("ggml_validate_row_data: "):
                return f"{message} ({line[len('ggml_validate_row_data: '):]})"
    return message
