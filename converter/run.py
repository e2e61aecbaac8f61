"""`atd-gguf run`: generate text from a GGUF (ATD or stock types) with the patched llama.cpp.

The model runs in the patched `llama-completion` binary (built by `make llama`, see
docs/llama-plugin.md) as a subprocess: single-shot generation, greedy by default, with the
GGUF's own chat template (Jinja) in --chat mode. Its log goes to a pipe and is shown only
when it fails, as the one line that names the cause (model_check.llama_log_cause).

Before it runs, model_check.check_runnable refuses what llama.cpp would abort on. Invalid tensor
data (ATD bytes the encoder never writes, non-finite scales, NaN weights) is left to llama.cpp's
--check-tensors: ggml_validate_row_data checks ATD rows through the patch, one thread per tensor,
while the model is mapped anyway; a second pass in Python would read the whole file once more.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .errors import AtdError
from .inspect_gguf import printable
from .model_check import check_runnable, llama_log_cause

ROOT = Path(__file__).resolve().parent.parent
# ATD_LLAMA_BIN_DIR overrides where the patched binaries are (default: this checkout's build)
DEFAULT_BIN_DIR = ROOT / "build" / "llama.cpp-patched" / "build" / "bin"


def bin_dir() -> Path:
    return Path(os.environ.get("ATD_LLAMA_BIN_DIR") or DEFAULT_BIN_DIR)


def completion_binary() -> Path:
    path = bin_dir() / "llama-completion"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise AtdError(f"the patched llama.cpp is not built ({path} missing): run `make llama` first")
    return path


def build_command(model: Path, prompt: str, n_predict: int, chat: bool, *, temp: float = 0.0,
                  seed: int = 42, threads: int | None = None, ctx_size: int = 2048,
                  system: str | None = None) -> list[str]:
    cmd = [str(completion_binary()), "-m", str(model), "-p", prompt, "-n", str(n_predict),
           "--temp", str(temp), "--seed", str(seed), "-c", str(ctx_size),
           "--no-display-prompt", "--no-warmup", "--no-perf", "--simple-io", "--check-tensors"]
    if threads:
        cmd += ["-t", str(threads)]
    if chat:
        # one user turn through the model's chat template, then exit
        cmd += ["--jinja", "-cnv", "--single-turn"]
        if system:
            cmd += ["-sys", system]
    else:
        cmd += ["-no-cnv"]
    return cmd


def _failure_line(log: str) -> str:
    """The line of llama.cpp's log that names why it failed (model_check.llama_log_cause)."""
    return llama_log_cause(log) or "no output"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run(model: Path, prompt: str, n_predict: int = 128, chat: bool = False, **options) -> str:
    """Generate; returns the generated text (without the prompt)."""
    model = Path(model)
    check_runnable(model)
    cmd = build_command(model, prompt, n_predict, chat, **options)
    # no gdb backtrace on an abort: it takes seconds and buries the abort message
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env)
    out = proc.stdout.decode("utf-8", errors="replace")
    if proc.returncode != 0:
        log = proc.stderr.decode("utf-8", errors="replace")
        detail = printable(llama_log_cause(log) or llama_log_cause(out) or "it printed nothing")
        if proc.returncode < 0:
            raise AtdError(f"llama-completion was killed by {_signal_name(-proc.returncode)} on {printable(model)}: "
                           f"{detail}")
        raise AtdError(f"llama-completion failed on {printable(model)} (exit {proc.returncode}): {detail}")
    return clean_output(out)


def clean_output(out: str) -> str:
    """llama-completion's stdout minus its "[end of text]" marker (printed when the model stops)."""
    text = out.rstrip()
    if text.endswith("[end of text]"):
        text = text[: -len("[end of text]")].rstrip()
    return text.lstrip("\n")
