#!/usr/bin/env python3
"""Llama-3-8B end to end (issue 12): ATD conversion next to llama.cpp's convert + quantize, then the files
in the patched llama.cpp, in one run; writes docs/bench-8b.md.

    .venv/bin/python scripts/bench_8b.py                 # the 32-layer 8B shape (scripts/llama3_shape.py)
    .venv/bin/python scripts/bench_8b.py --layers 2      # a preview on 2 layers of the same shape
    .venv/bin/python scripts/bench_8b.py --model DIR     # any Llama-3-8B checkpoint directory instead
    .venv/bin/python scripts/bench_8b.py --small --layers 2 --quick --doc /tmp/b.md   # the CI path

Steps, each one subprocess, measured on its own (wall time; peak RSS = ru_maxrss from wait4, which
covers the process and the children it waited for):

1. the checkpoint: scripts/llama3_shape.py's seeded 8B shape in build/models (reused when there);
2. `atd-gguf convert --target-size T`, `--planes 2`, `--planes 3` (default embedding policy);
3. `atd-gguf convert --target-size T --calibration TEXT` with a few chunks (time per layer, peak RSS);
4. llama.cpp's pinned `convert_hf_to_gguf.py` to F16, then the patched `llama-quantize` to Q4_K_M and Q3_K_M;
5. `llama-bench -p 512 -n 128` over the --target-size file, Q4_K_M and Q3_K_M in one invocation;
6. `llama-cli -c 4096 -n 16 --no-warmup -ctk q8_0 -ctv q8_0 -fa on` on each of the three (peak RSS; does
   the ATD file generate text?). The KV cache is q8_0 (with flash attention, which a quantized V cache
   needs) because an F16 cache of 4096 tokens is 512 MiB: with a 4.0e9-byte file that alone passes the
   4.5 GB bound. --cli-args "" gives llama-cli's defaults.

T is 4GB for the 32-layer 8B shape and a real 8B (8.03 B weights); other shapes get the same bits per
weight (4 GB × weights / 8.03 B) unless --target-size is given. Then the issue's "done when" is checked
and printed. Before a step that needs more disk or memory than there is, one line says what is missing
and the step is skipped. Before each conversion step its input (the checkpoint, or the F16 GGUF for
llama-quantize) is read once, untimed, so that every step finds it in the page cache as far as memory
allows: the steps are compared on conversion work, not on what an earlier step left cached.
Intermediates are deleted when no later step needs them (the --planes and calibrated files after
measuring, the F16 GGUF after quantizing, a checkpoint this run generated after llama.cpp's converter
read it; everything at the end) unless --keep: a 32-layer run peaks at about
36 GB of disk (checkpoint 16 + F16 16 + the 4 GB file), 45 GB when the checkpoint was already there (a
checkpoint this run did not generate is never deleted: it then still holds 16 GB while Q4_K_M and Q3_K_M
are written).

Exit status: 0 all ran and every check passed (or could not apply), 1 bad input or a tool failed,
2 a "done when" check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT)]
import llama3_shape as shape_gen  # noqa: E402
from bench_convert import cpu_model  # noqa: E402

BIN = ROOT / "build" / "llama.cpp-patched" / "build" / "bin"
DEFAULT_WORK = ROOT / "build" / "bench-8b"
DEFAULT_DOC = ROOT / "docs" / "bench-8b.md"
GB = 10**9
MB = 10**6
HEADLINE_TARGET = 4 * GB  # the "8B-class model in 4 GB"
HEADLINE_PARAMS = sum(s.numel for s in shape_gen.tensor_specs(shape_gen.FULL))  # 8,030,261,248
CONVERT_RSS_HEADROOM = 1 * GB  # conversion peak RSS <= largest tensor (f32) + 1 GB
RUN_RSS_HEADROOM = GB // 2  # llama-cli with 4096 context <= 4.5 GB for the 4 GB file
CALIBRATION_RSS_BOUND = 24 * GB
THROUGHPUT_BAR = 1.5
DISK_MARGIN = 64 * MB  # GGUF headers (the vocabulary), logs, rounding
CLI_PROMPT = "The capital of France is"
CLI_CTX = 4096
CLI_ARGS = "-ctk q8_0 -ctv q8_0 -fa on"  # q8_0 KV cache: see the docstring, step 6
# upper bounds of the stock quantizations' bits per weight (output.weight is Q6_K in both)
STOCK_BPW = {"Q4_K_M": 5.0, "Q3_K_M": 4.0}
OUTPUT_BPW = 6.5625
STEPS = ("planes", "calibration", "llama.cpp", "bench", "cli")
QUICK_SKIPS = ("calibration", "llama.cpp", "bench")


class BenchError(Exception):
    """Bad input: one line for the user, exit 1."""


def log(msg: str) -> None:
    print(f"bench_8b: {msg}", flush=True)


def warn(msg: str) -> None:
    print(f"bench_8b: {msg}", file=sys.stderr, flush=True)


def gb(nbytes: float | None, digits: int = 2) -> str:
    return "–" if nbytes is None else f"{nbytes / GB:.{digits}f}"


# --------------------------------------------------------------------------- #
# Measuring one subprocess
# --------------------------------------------------------------------------- #


@dataclass
class Measured:
    rc: int
    seconds: float
    peak_rss: int  # bytes


def measure(cmd: list[str], log_path: Path, stdout_path: Path | None = None) -> Measured:
    """Run cmd (stdin closed, output to files), timing it; peak RSS from wait4's ru_maxrss."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:
        err = files.enter_context(open(log_path, "wb"))
        out = files.enter_context(open(stdout_path, "wb")) if stdout_path else err
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(proc.returncode, seconds, usage.ru_maxrss * 1024)


def failure_line(log_path: Path, rc: int) -> str:
    """The last error-looking line of a tool's log (else its last line), for a one-line report."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    hits = [ln for ln in lines if re.search(r"error|failed|exception|killed", ln, re.I)]
    detail = (hits or lines or ["no output"])[-1][:300]
    return f"exit {rc}: {detail}"


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #


@dataclass
class ModelInfo:
    path: Path
    n_params: int
    n_layers: int
    n_embd: int
    n_ff: int
    kv_dim: int  # n_head_kv * head_dim
    largest_name: str
    largest_f32: int  # bytes of the largest tensor as float32
    checkpoint_bytes: int
    tensors: list[tuple[str, tuple[int, ...]]]  # GGUF names and shapes, as atd-gguf writes them

    @property
    def is_8b(self) -> bool:
        return self.n_params == HEADLINE_PARAMS

    def kv_bytes(self, n_ctx: int) -> int:
        """llama.cpp's F16 K and V caches for n_ctx tokens."""
        return 2 * 2 * self.n_layers * n_ctx * self.kv_dim


def model_info(path: Path) -> ModelInfo:
    from converter.checkpoint import Checkpoint
    from converter.errors import AtdError
    from converter.llama import LlamaModel

    try:
        llama = LlamaModel(Checkpoint(path))
    except AtdError as e:
        raise BenchError(f"--model {path}: {e}") from None
    refs = llama.checkpoint.tensors.values()
    largest = max(refs, key=lambda r: math.prod(r.shape))
    p = llama.params
    return ModelInfo(
        path=path, n_params=sum(math.prod(r.shape) for r in refs), n_layers=p.n_layer, n_embd=p.n_embd,
        n_ff=p.n_ff, kv_dim=p.n_head_kv * (p.n_embd // p.n_head), largest_name=largest.name,
        largest_f32=4 * math.prod(largest.shape), checkpoint_bytes=sum(r.local.data_range.size for r in refs),
        tensors=[(s.name, tuple(s.shape)) for s in llama.tensors()])


def atd_planes_bytes(info: ModelInfo, planes: int) -> int:
    """Tensor bytes of `atd-gguf convert --planes N` (its own type choice and sizes)."""
    from converter.atd_policy import AtdOptions
    from converter.convert import tensor_nbytes

    choose = AtdOptions(planes=planes).choose
    return sum(tensor_nbytes(choose(name, shape), shape) for name, shape in info.tensors)


def stock_bytes(info: ModelInfo, ftype: str) -> int:
    """An upper bound of a llama-quantize output's size (for the disk check)."""
    bits = 0.0
    for name, shape in info.tensors:
        n = math.prod(shape)
        bits += n * (32 if len(shape) < 2 else OUTPUT_BPW if name == "output.weight" else STOCK_BPW[ftype])
    return int(bits / 8)


def calibration_memory(info: ModelInfo, tokens: int) -> int:
    """What converter.calibration holds at once: a layer's float32 weights, the widest input's float64
    Hessian and its factorization, the hidden states and a layer's activations, plus 1 GB of runtime."""
    layer_params = (info.n_params - 2 * info.largest_f32 // 4) // max(info.n_layers, 1)
    widest = max(info.n_embd, info.n_ff)
    activations = tokens * (4 * info.n_embd + 3 * info.n_ff) * 4
    return 4 * layer_params + 3 * 8 * widest**2 + activations + GB


# --------------------------------------------------------------------------- #
# One step's record
# --------------------------------------------------------------------------- #


@dataclass
class Step:
    key: str
    label: str
    cmd: list[str] = field(default_factory=list)
    output: Path | None = None
    status: str = "pending"  # ok | skipped | failed
    reason: str = ""
    seconds: float | None = None
    peak_rss: int | None = None
    size: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------- #
# The benchmark
# --------------------------------------------------------------------------- #


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work: Path = args.work.resolve()
        self.logs = self.work / "logs"
        self.steps: dict[str, Step] = {}
        self.skips = set(args.skip) | (set(QUICK_SKIPS) if args.quick else set())
        self.generated_model: Path | None = None  # a checkpoint this run generated (deleted after use)
        self.commands: list[str] = []
        self.bench_rows: dict[str, dict[str, tuple[float, float]]] = {}
        self.started = datetime.now(timezone.utc)
        self.load_start = os.getloadavg()[0]
        self.info: ModelInfo | None = None
        self.target = 0

    # -- resources

    def free_disk(self, where: Path) -> int:
        if self.args.assume_free_disk is not None:
            return self.args.assume_free_disk
        return shutil.disk_usage(where).free

    def free_memory(self) -> int:
        if self.args.assume_free_memory is not None:
            return self.args.assume_free_memory
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def missing(self, disk: int = 0, memory: int = 0, where: Path | None = None) -> str | None:
        """What the machine lacks for a step (one phrase), or None."""
        where = where or self.work
        if disk:
            free = self.free_disk(where)
            if free < disk + DISK_MARGIN:
                return f"needs {gb(disk + DISK_MARGIN, 1)} GB of free disk in {where}, {gb(free, 1)} GB free"
        if memory:
            avail = self.free_memory()
            if avail < memory:
                return f"needs about {gb(memory, 1)} GB of available memory, {gb(avail, 1)} GB available"
        return None

    def skip(self, step: Step, reason: str, asked: bool = False) -> Step:
        """Record a step that does not run; one line (on stderr unless the user asked for the skip)."""
        step.status, step.reason = "skipped", reason
        (log if asked else warn)(f"skip {step.label}: {reason}")
        self.steps[step.key] = step
        return step

    # -- running one measured step

    def run_step(self, step: Step, disk: int = 0, memory: int = 0, stdout: Path | None = None,
                 reads: Path | None = None) -> Step:
        reason = self.missing(disk, memory)
        if reason:
            return self.skip(step, reason)
        if reads is not None:
            warm_page_cache(reads)
        self.commands.append(show(step.cmd))
        log(f"{step.label}: {show(step.cmd)}")
        m = measure(step.cmd, self.logs / f"{step.key}.log", stdout)
        step.seconds, step.peak_rss = m.seconds, m.peak_rss
        self.steps[step.key] = step
        if m.rc != 0:
            step.status, step.reason = "failed", failure_line(self.logs / f"{step.key}.log", m.rc)
            warn(f"{step.label} failed ({step.reason}); log: {self.logs / f'{step.key}.log'}")
            return step
        step.status = "ok"
        if step.output is not None and step.output.is_file():
            step.size = step.output.stat().st_size
        log(f"  {m.seconds:.1f} s, peak RSS {gb(m.peak_rss)} GB" + (f", {gb(step.size, 3)} GB" if step.size else ""))
        return step

    def discard(self, *paths: Path | None) -> None:
        if self.args.keep:
            return
        for path in paths:
            if path is not None:
                path.unlink(missing_ok=True)

    # -- 1. the model

    def prepare_model(self) -> Path | None:
        if self.args.model is not None:
            if not self.args.model.is_dir():
                raise BenchError(f"--model {self.args.model}: no such directory")
            return self.args.model.resolve()
        shape = shape_gen.shape_from_args(self.args)
        try:
            shape.validate()
        except shape_gen.ShapeError as e:
            raise BenchError(str(e)) from None
        final = self.args.models.resolve() / shape.dir_name(self.args.seed)
        existed = (final / shape_gen.MARKER).is_file()
        if not existed:
            need = sum(s.nbytes for s in shape_gen.tensor_specs(shape)) + shape_gen.DISK_MARGIN
            self.args.models.mkdir(parents=True, exist_ok=True)
            reason = self.missing(disk=need, where=self.args.models.resolve())
            if reason:
                warn(f"skip everything: the checkpoint {final.name} {reason}")
                return None
        log(f"checkpoint: {final.name}" + ("" if existed else " (generating)"))
        try:
            with contextlib.redirect_stderr(sys.stdout):  # its progress is ours; stderr keeps the refusals
                path = shape_gen.ensure_checkpoint(shape, self.args.seed, self.args.models)
        except (shape_gen.ShapeError, shape_gen.mf.FixtureError, OSError) as e:
            raise BenchError(f"cannot generate the checkpoint: {e}".splitlines()[0]) from None
        if not existed:
            self.generated_model = path
        return path

    def release_model(self) -> None:
        """Delete a checkpoint this run generated, once nothing reads it any more (not with --keep)."""
        if self.generated_model is not None and not self.args.keep:
            shutil.rmtree(self.generated_model, ignore_errors=True)
            log(f"deleted the generated checkpoint {self.generated_model.name} (--keep keeps it)")
            self.generated_model = None

    # -- 2, 3. atd-gguf

    def atd_cmd(self, out: Path, *options: str) -> list[str]:
        exe = Path(sys.executable).parent / "atd-gguf"
        base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "converter.cli"]
        return [*base, "convert", str(self.info.path), "-o", str(out), *options, "--force", "--no-progress"]

    def atd_target(self) -> Step:
        out = self.work / f"{self.info.path.name}-ATD-{size_arg(self.target)}.gguf"
        step = Step("atd_target", f"atd-gguf --target-size {size_arg(self.target)}",
                    self.atd_cmd(out, "--target-size", size_arg(self.target)), out)
        return self.run_step(step, disk=self.target, memory=self.info.largest_f32 + CONVERT_RSS_HEADROOM,
                             reads=self.info.path)

    def atd_planes(self, planes: int) -> Step:
        out = self.work / f"{self.info.path.name}-ATD{planes}.gguf"
        step = Step(f"atd_planes{planes}", f"atd-gguf --planes {planes}",
                    self.atd_cmd(out, "--planes", str(planes)), out)
        if "planes" in self.skips:
            return self.skip(step, "not asked for (--skip planes)", asked=True)
        self.run_step(step, disk=atd_planes_bytes(self.info, planes),
                      memory=self.info.largest_f32 + CONVERT_RSS_HEADROOM, reads=self.info.path)
        self.discard(out)
        return step

    def atd_calibrated(self) -> Step:
        out = self.work / f"{self.info.path.name}-ATD-{size_arg(self.target)}-calibrated.gguf"
        chunks, ctx = self.args.calibration_chunks, self.args.calibration_ctx
        label = f"atd-gguf --target-size {size_arg(self.target)} --calibration ({chunks}×{ctx} tokens)"
        step = Step("atd_calibration", label, output=out)
        if "calibration" in self.skips:
            return self.skip(step, "not asked for (--skip calibration / --quick)", asked=True)
        text = calibration_text(self.work)
        step.cmd = self.atd_cmd(out, "--target-size", size_arg(self.target), "--calibration", str(text),
                                "--calibration-chunks", str(chunks), "--calibration-ctx", str(ctx))
        self.run_step(step, disk=self.target, memory=calibration_memory(self.info, chunks * ctx), reads=self.info.path)
        if step.ok:
            step.extra["seconds_per_layer"] = step.seconds / max(self.info.n_layers, 1)
        self.discard(out)
        return step

    # -- 4. llama.cpp

    def llama_convert(self) -> Step:
        out = self.work / f"{self.info.path.name}-F16.gguf"
        step = Step("f16", "llama.cpp convert_hf_to_gguf.py → F16", output=out)
        if "llama.cpp" in self.skips:
            return self.skip(step, "not asked for (--skip llama.cpp / --quick)", asked=True)
        source = llama_cpp_source()
        if source is None:
            return self.skip(step, "the pinned llama.cpp source (build/llama.cpp-src) is missing and cannot be fetched")
        step.cmd = [sys.executable, str(source / "convert_hf_to_gguf.py"), str(self.info.path),
                    "--outfile", str(out), "--outtype", "f16"]
        f16_bytes = 2 * self.info.n_params
        return self.run_step(step, disk=f16_bytes, memory=2 * self.info.largest_f32 + GB, reads=self.info.path)

    def quantize(self, ftype: str) -> Step:
        f16 = self.steps.get("f16")
        out = self.work / f"{self.info.path.name}-{ftype}.gguf"
        step = Step(ftype.lower(), f"llama-quantize {ftype}", output=out)
        if f16 is None or not f16.ok:
            return self.skip(step, "no F16 GGUF to quantize (its step did not run)", asked="llama.cpp" in self.skips)
        tool = BIN / "llama-quantize"
        if not tool.is_file():
            return self.skip(step, f"{show_path(tool)} is missing (run `make llama`)")
        step.cmd = [str(tool), str(f16.output), str(out), ftype, str(self.args.threads)]
        return self.run_step(step, disk=stock_bytes(self.info, ftype), memory=2 * self.info.largest_f32 + GB // 2,
                             reads=f16.output)

    # -- 5, 6. the patched llama.cpp

    def run_files(self) -> dict[str, tuple[str, Step]]:
        """The files to run: step key -> (name, the step that made it)."""
        names = {"atd_target": "ATD " + size_arg(self.target), "q4_k_m": "Q4_K_M", "q3_k_m": "Q3_K_M"}
        return {k: (name, self.steps[k]) for k, name in names.items() if k in self.steps and self.steps[k].ok}

    def llama_bench(self, files: dict[str, Path]) -> Step:
        step = Step("bench", "llama-bench pp512/tg128")
        if "bench" in self.skips:
            return self.skip(step, "not asked for (--skip bench / --quick)", asked=True)
        tool = BIN / "llama-bench"
        if not tool.is_file():
            return self.skip(step, f"{show_path(tool)} is missing (run `make llama`)")
        if not files:
            return self.skip(step, "no GGUF to run (their steps did not run)")
        step.cmd = [str(tool), "-m", ",".join(str(p) for p in files.values()), "-p", "512", "-n", "128",
                    "-t", str(self.args.threads), "-r", str(self.args.repetitions), "-o", "json"]
        largest = max(p.stat().st_size for p in files.values())
        json_path = self.logs / "llama-bench.json"
        self.run_step(step, memory=largest + GB, stdout=json_path)
        if step.ok:
            self.bench_rows = parse_llama_bench(json_path.read_text(), files)
        return step

    def llama_cli(self, of: str, name: str, path: Path) -> Step:
        key = f"cli_{of}"
        step = Step(key, f"llama-cli -c {CLI_CTX} ({name})")
        tool = BIN / "llama-cli"
        if "cli" in self.skips:
            return self.skip(step, "not asked for (--skip cli)", asked=True)
        if not tool.is_file():
            return self.skip(step, f"{show_path(tool)} is missing (run `make llama`)")
        step.cmd = [str(tool), "-m", str(path), "-p", CLI_PROMPT, "-n", "16", "-c", str(CLI_CTX),
                    "-t", str(self.args.threads), "--no-warmup", "--temp", "0", "-st", "--simple-io", "-lv", "4",
                    *shlex.split(self.args.cli_args)]
        out = self.logs / f"{key}.out"
        self.run_step(step, memory=path.stat().st_size + self.info.kv_bytes(CLI_CTX) + GB, stdout=out)
        if step.status != "skipped":
            step.extra["text"] = cli_generated_text(out.read_text(errors="replace"), CLI_PROMPT)
            step.extra["buffers_mib"] = cli_buffers(self.logs / f"{key}.log")
        return step

    # -- the whole run

    def run(self) -> int:
        model = self.prepare_model()
        if model is None:
            return 1
        self.work.mkdir(parents=True, exist_ok=True)
        self.info = model_info(model)
        self.target = self.args.target_size or default_target(self.info.n_params)
        log(f"{self.info.n_params / 1e9:.3f} B weights, {self.info.n_layers} layers, largest tensor "
            f"{self.info.largest_name} ({gb(self.info.largest_f32)} GB as f32); --target-size {size_arg(self.target)}")
        try:
            self.conversions()
            self.runs()
        finally:
            self.release_model()
            self.discard(*(step.output for step in self.steps.values()))
        if all(s.status == "skipped" for s in self.steps.values()):
            warn(f"nothing was measured; {show_path(self.args.doc)} left as it was")
            return 1
        checks = self.checks()
        self.write(checks)
        return exit_status(self.steps, checks)

    def conversions(self) -> None:
        self.atd_target()
        for planes in (2, 3):
            self.atd_planes(planes)
        self.atd_calibrated()
        f16 = self.llama_convert()
        if f16.status != "skipped":
            self.release_model()  # llama.cpp's converter was the checkpoint's last reader
        for ftype in ("Q4_K_M", "Q3_K_M"):
            self.quantize(ftype)
        self.discard(f16.output)

    def runs(self) -> None:
        files = self.run_files()
        self.llama_bench({name: step.output for name, step in files.values()})
        for key, (name, step) in files.items():
            self.llama_cli(key, name, step.output)

    # -- checks and the report

    def checks(self) -> list[tuple[str, str, str]]:
        return Checks(self).all()

    def write(self, checks: list[tuple[str, str, str]]) -> None:
        doc = Report(self, checks).markdown()
        self.args.doc.parent.mkdir(parents=True, exist_ok=True)
        self.args.doc.write_text(doc)
        if self.args.json is not None:
            self.args.json.write_text(json.dumps(self.results(checks), indent=2, default=str) + "\n")
        for status, what, detail in checks:
            log(f"[{status}] {what}: {detail}")
        log(f"wrote {self.args.doc}")

    def results(self, checks: list[tuple[str, str, str]]) -> dict:
        info = {k: v for k, v in asdict(self.info).items() if k != "tensors"}
        return {"model": info, "target_size": self.target, "steps": {k: asdict(s) for k, s in self.steps.items()},
                "llama_bench": self.bench_rows, "checks": [list(c) for c in checks],
                "rss_bound": self.info.largest_f32 + CONVERT_RSS_HEADROOM}


# --------------------------------------------------------------------------- #
# Checks: the "done when"
# --------------------------------------------------------------------------- #


class Checks:
    PLAIN = ("atd_target", "atd_planes2", "atd_planes3")

    def __init__(self, bench: Bench):
        self.b = bench
        self.s = bench.steps
        self.scaled = "" if bench.info.is_8b and bench.target == HEADLINE_TARGET else " (scaled)"

    def all(self) -> list[tuple[str, str, str]]:
        return [self.size(), self.generates(), self.run_rss(), *self.throughput(), *self.convert_rss(),
                self.calibration_rss()]

    def _done(self, key: str) -> Step | None:
        step = self.s.get(key)
        return step if step is not None and step.ok else None

    def size(self):
        step = self._done("atd_target")
        what = f"--target-size file ≤ {self.b.target:,} bytes{self.scaled}"
        if step is None:
            return ("n/a", what, "not converted")
        return (verdict(step.size <= self.b.target), what, f"{step.size:,} bytes")

    def generates(self):
        step = self.s.get("cli_atd_target")
        what = "the --target-size file loads and generates in the patched llama-cli"
        if step is None or step.status == "skipped":
            return ("n/a", what, "not run")
        text = step.extra.get("text", "")
        return (verdict(step.ok and bool(text)), what, f"exit {'0' if step.ok else step.reason}, text {text[:60]!r}")

    def run_rss(self):
        bound = self.b.target + RUN_RSS_HEADROOM
        step = self.s.get("cli_atd_target")
        what = f"llama-cli -c {CLI_CTX} peak RSS ≤ {gb(bound)} GB{self.scaled}"
        if step is None or step.peak_rss is None:
            return ("n/a", what, "not run")
        return (verdict(step.ok and step.peak_rss <= bound), what, f"{gb(step.peak_rss, 3)} GB")

    def throughput(self):
        f16, q4 = self._done("f16"), self._done("q4_k_m")
        out = []
        for key in self.PLAIN:
            step = self._done(key)
            what = f"{self.s[key].label if key in self.s else key} throughput ≥ {THROUGHPUT_BAR}× convert + Q4_K_M"
            if step is None or f16 is None or q4 is None:
                out.append(("n/a", what, "a step did not run"))
                continue
            ratio = (f16.seconds + q4.seconds) / step.seconds
            out.append((verdict(ratio >= THROUGHPUT_BAR), what, f"{ratio:.2f}×"))
        return out

    def convert_rss(self):
        bound = self.b.info.largest_f32 + CONVERT_RSS_HEADROOM
        out = []
        for key in self.PLAIN:
            step = self._done(key)
            label = self.s[key].label if key in self.s else key
            what = f"{label} peak RSS ≤ largest tensor f32 + 1 GB = {gb(bound)} GB"
            if step is None:
                out.append(("n/a", what, "not run"))
                continue
            out.append((verdict(step.peak_rss <= bound), what, f"{gb(step.peak_rss, 3)} GB"))
        return out

    def calibration_rss(self):
        step = self._done("atd_calibration")
        what = f"--calibration peak RSS ≤ {gb(CALIBRATION_RSS_BOUND, 0)} GB"
        if step is None:
            return ("n/a", what, "not run")
        return (verdict(step.peak_rss <= CALIBRATION_RSS_BOUND), what, f"{gb(step.peak_rss, 3)} GB")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def exit_status(steps: dict[str, Step], checks: list[tuple[str, str, str]]) -> int:
    if any(s.status == "failed" for s in steps.values()):
        return 1
    return 2 if any(c[0] == "FAIL" for c in checks) else 0


# --------------------------------------------------------------------------- #
# The markdown report
# --------------------------------------------------------------------------- #


class Report:
    def __init__(self, bench: Bench, checks: list[tuple[str, str, str]]):
        self.b = bench
        self.info = bench.info
        self.checks = checks

    def markdown(self) -> str:
        parts = [self.head(), self.conversion_table(), self.ratios(), self.run_table(), self.check_list(),
                 self.skipped(), self.command_list()]
        return "\n\n".join(p for p in parts if p) + "\n"

    def head(self) -> str:
        i = self.info
        model = (f"`{show_path(i.path)}`" if self.b.args.model else
                 f"`scripts/llama3_shape.py` {i.path.name} (seeded random weights, bf16, the real Llama-3 "
                 "tokenizer)")
        return "\n".join([
            "# Llama-3-8B shape end to end: ATD vs llama.cpp's convert + quantize",
            "",
            f"Model: {model}: {i.n_params:,} weights, {i.n_layers} layers, hidden {i.n_embd}, FFN {i.n_ff}; "
            f"largest tensor {i.largest_name} = {gb(i.largest_f32)} GB as float32. "
            f"`--target-size {size_arg(self.b.target)}`"
            + ("" if self.b.args.target_size or i.is_8b else " (4 GB × weights / 8.03 B: the 8B's bits per weight)")
            + ".",
            "",
            f"Machine: {machine_line(self.b)}.",
            "",
            "Generated by `" + " ".join(["scripts/bench_8b.py", *map(shlex.quote, self.b.args.argv)]) + "` in one run: "
            "every step is its own subprocess, timed wall-clock, its input read once beforehand (untimed) so "
            "that it starts from the page cache; peak RSS is its `ru_maxrss` from wait4 "
            "(the process and the children it waited for; memory-mapped file pages count once touched, "
            "as llama.cpp's tools map their input). GB = 10⁹ bytes. Throughput is all checkpoint "
            "weights / wall time. Random weights: sizes, times and memory are those of a real 8B; text "
            "quality is not measured here.",
            *self.preview_note(),
        ])

    def preview_note(self) -> list[str]:
        if self.info.is_8b:
            return []
        return ["", f"**A preview on {self.info.n_layers} layers**, not the issue's figures: those come from the "
                "32-layer run (`.venv/bin/python scripts/bench_8b.py`, about 36 GB of disk and hours with "
                "--calibration). Bounds marked (scaled) keep the 8B's bits per weight and the 0.5 GB of "
                "llama-cli headroom over the file."]

    def conversion_table(self) -> str:
        rows = ["## Conversion", "",
                "| step | wall s | M params/s | peak RSS GB | RSS − largest f32 GB | output GB | bpw |",
                "|---|---|---|---|---|---|---|"]
        for key in ("atd_target", "atd_planes2", "atd_planes3", "f16", "q4_k_m", "q3_k_m"):
            if key in self.b.steps:
                rows.append(self.row(self.b.steps[key]))
        for ftype in ("q4_k_m", "q3_k_m"):
            combined = self.combined(ftype)
            if combined:
                rows.append(combined)
        cal = self.b.steps.get("atd_calibration")
        if cal is not None:
            rows.append(self.row(cal))
        note = self.calibration_note()
        return "\n".join(rows + (["", note] if note else []))

    def row(self, s: Step) -> str:
        if not s.ok:  # the reasons of skipped steps are listed below the tables
            return f"| {s.label} | {s.status if s.status == 'skipped' else f'{s.status} ({s.reason})'} | | | | | |"
        mps = self.info.n_params / s.seconds / 1e6
        bpw = f"{8 * s.size / self.info.n_params:.3f}" if s.size else "–"
        return (f"| {s.label} | {s.seconds:.1f} | {mps:.2f} | {gb(s.peak_rss)} | "
                f"{(s.peak_rss - self.info.largest_f32) / GB:+.2f} | {gb(s.size, 3)} | {bpw} |")

    def combined(self, key: str) -> str | None:
        f16, q = self.b.steps.get("f16"), self.b.steps.get(key)
        if not (f16 and q and f16.ok and q.ok):
            return None
        seconds, rss = f16.seconds + q.seconds, max(f16.peak_rss, q.peak_rss)
        return (f"| llama.cpp convert + {q.label.split()[-1]} | {seconds:.1f} | "
                f"{self.info.n_params / seconds / 1e6:.2f} | {gb(rss)} | {(rss - self.info.largest_f32) / GB:+.2f} | "
                f"{gb(q.size, 3)} | {8 * q.size / self.info.n_params:.3f} |")

    def calibration_note(self) -> str | None:
        cal = self.b.steps.get("atd_calibration")
        if cal is None or not cal.ok:
            return None
        return (f"Calibration: {cal.extra['seconds_per_layer']:.1f} s per layer (wall time / {self.info.n_layers} "
                f"layers, including the statistics pass, the size plan and the embeddings), peak RSS "
                f"{gb(cal.peak_rss)} GB (bound {gb(CALIBRATION_RSS_BOUND, 0)} GB).")

    def ratios(self) -> str | None:
        lines = [f"- {what.split(' throughput')[0]}: {detail}" for status, what, detail in self.checks
                 if "throughput" in what and status != "n/a"]
        if not lines:
            return None
        return "\n".join(["Throughput ATD / (llama.cpp convert + Q4_K_M quantize), same run "
                          f"(bar: {THROUGHPUT_BAR}×):", "", *lines])

    def run_table(self) -> str | None:
        cli = [s for s in self.b.steps.values() if s.key.startswith("cli_")]
        bench = self.b.steps.get("bench")
        if not cli and bench is None:
            return None
        rows = ["## Running (patched llama.cpp)", "",
                f"`llama-bench -p 512 -n 128 -t {self.b.args.threads} -r {self.b.args.repetitions}` (tokens/s ± "
                f"stddev, one invocation) and `{' '.join(['llama-cli -c', str(CLI_CTX), '-n 16 --no-warmup', *shlex.split(self.b.args.cli_args)])}` (peak "
                "RSS; the model is memory-mapped with MAP_POPULATE, so every page of the file counts; buffers: "
                "what llama.cpp reports: the mapped weights, weights repacked into a copy (`repack`, e.g. "
                "Q4_0/Q4_K/Q8_0 for the AVX kernels: counted twice until the mapping's pages are dropped), the "
                "KV cache and the compute buffer).", "",
                "| file | GB | pp512 t/s | tg128 t/s | llama-cli peak RSS GB | buffers MiB | exit | text |",
                "|---|---|---|---|---|---|---|---|"]
        for key, (name, step) in self.b.run_files().items():
            rows.append(self.run_row(key, name, step))
        if bench is not None and not bench.ok:
            rows += ["", f"llama-bench {bench.status}: {bench.reason}"]
        return "\n".join(rows)

    def run_row(self, key: str, name: str, made: Step) -> str:
        size = made.size
        speed = self.b.bench_rows.get(name, {})
        pp, tg = (fmt_speed(speed.get(t)) for t in ("pp512", "tg128"))
        cli = self.b.steps.get(f"cli_{key}")
        if cli is None or cli.status == "skipped":
            return f"| {name} | {gb(size, 3)} | {pp} | {tg} | – | – | – | – |"
        rc = "0" if cli.ok else cli.reason.split(":")[0]
        text = " ".join(cli.extra.get("text", "").split())[:40].replace("|", "/").replace("`", "'")
        buffers = buffers_cell(cli.extra.get("buffers_mib", {}))
        return f"| {name} | {gb(size, 3)} | {pp} | {tg} | {gb(cli.peak_rss, 3)} | {buffers} | {rc} | `{text}` |"

    def check_list(self) -> str:
        lines = ["## Done when (issue 12)", ""]
        lines += [f"- **{status}** {what}: {detail}" for status, what, detail in self.checks]
        return "\n".join(lines)

    def skipped(self) -> str | None:
        lines = [f"- {s.label}: {s.reason}" for s in self.b.steps.values() if s.status == "skipped"]
        return "\n".join(["Skipped steps:", "", *lines]) if lines else None

    def command_list(self) -> str:
        return "\n".join(["## Commands", "", "```sh", *self.b.commands, "```"])


def fmt_speed(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def default_target(n_params: int) -> int:
    """4 GB for 8.03 B weights; the same bits per weight for other shapes."""
    return HEADLINE_TARGET if n_params == HEADLINE_PARAMS else HEADLINE_TARGET * n_params // HEADLINE_PARAMS


def size_arg(nbytes: int) -> str:
    """--target-size's argument: "4GB" for whole GB, else the byte count."""
    return f"{nbytes // GB}GB" if nbytes % GB == 0 else str(nbytes)


def show_path(path: Path | str) -> str:
    text = str(path)
    return text[len(str(ROOT)) + 1:] if text.startswith(str(ROOT) + os.sep) else text


def show(cmd: list[str]) -> str:
    """A command as one shell line, with paths inside the repository relative to it."""
    shown = [a.replace(str(ROOT) + os.sep, "") for a in cmd]
    if cmd and cmd[0] == sys.executable:
        shown[0] = ".venv/bin/python" if sys.executable.startswith(str(ROOT)) else "python"
    return shlex.join(shown)


def llama_cpp_source() -> Path | None:
    try:
        from llama_cpp_source import ensure_source

        return ensure_source()
    except (SystemExit, OSError, subprocess.CalledProcessError):
        return None


def calibration_text(work: Path) -> Path:
    """English text that is not bench_quality's evaluation text: its calibration fortunes, else the docs."""
    try:
        import bench_quality

        return bench_quality.calibration_text(work)
    except (SystemExit, OSError, subprocess.CalledProcessError):
        path = work / "calibration-docs.txt"
        path.write_text("\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]))
        return path


def parse_llama_bench(text: str, files: dict[str, Path]) -> dict[str, dict[str, tuple[float, float]]]:
    by_path = {str(p): name for name, p in files.items()}
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for r in json.loads(text):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        name = by_path.get(r["model_filename"], Path(r["model_filename"]).name)
        rows.setdefault(name, {})[test] = (r["avg_ts"], r["stddev_ts"])
    return rows


def warm_page_cache(path: Path) -> None:
    """Read a checkpoint directory's weights (or one file) once, untimed, so that every conversion step
    starts with its input in the page cache (as far as memory allows) and measures conversion, not the disk."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    buf = bytearray(16 << 20)
    start, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    log(f"  (page cache: read {gb(total)} GB of {path.name} in {time.perf_counter() - start:.1f} s, untimed)")


def cli_generated_text(out: str, prompt: str) -> str:
    """The answer in llama-cli's single-turn transcript: after the "> prompt" line, before "[ Prompt: …]"."""
    start = out.rfind(f"> {prompt}")
    if start < 0:
        return ""
    body = out[start + len(prompt) + 2:]
    end = body.find("[ Prompt:")
    return (body if end < 0 else body[:end]).strip()


def cli_buffers(log_path: Path) -> dict[str, float]:
    """MiB per buffer from llama.cpp's log: "CPU KV buffer size = 512.00 MiB" -> KV, "CPU_REPACK model
    buffer size = ..." -> CPU_REPACK (weights copied out of the mapping into a repacked layout)."""
    sizes: dict[str, float] = {}
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    for m in re.finditer(r"(\w+)\s+(model|output|KV|compute) buffer size =\s+([\d.]+) MiB", text):
        key = m.group(1) if m.group(2) == "model" else m.group(2)
        sizes[key] = sizes.get(key, 0.0) + float(m.group(3))
    return sizes


def buffers_cell(sizes: dict[str, float]) -> str:
    if not sizes:
        return "–"
    model = " + ".join(f"{v:.0f} {k.removeprefix('CPU_').lower()}" for k, v in sizes.items()
                       if k not in ("output", "KV", "compute"))
    return f"{model}; KV {sizes.get('KV', 0):.0f}; compute {sizes.get('compute', 0):.0f}"


def meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def git_version() -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def machine_line(b: Bench) -> str:
    return (f"{cpu_model()}, {os.cpu_count()} cores, {meminfo_total() / 2**30:.1f} GiB RAM, Python "
            f"{platform.python_version()}; load average {b.load_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (the machine may have been shared: compare rows of this run, "
            f"not across runs); {b.started:%Y-%m-%d %H:%M} UTC; commit {git_version()}")


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def parse_size_arg(text: str) -> int:
    from converter.budget import BudgetError, parse_size

    try:
        return parse_size(text)
    except BudgetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage + error
        self.exit(2, f"bench_8b: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="a Llama-3-8B checkpoint directory instead of the generated shape")
    p.add_argument("--layers", type=int, default=shape_gen.FULL.layers,
                   help="layers of the generated shape (default 32)")
    p.add_argument("--seed", type=int, default=0, help="weight seed of the generated shape (default 0)")
    p.add_argument("--small", action="store_true", help="llama3_shape.py's scaled-down shape (for tests)")
    for flag in ("hidden", "intermediate", "heads", "kv-heads", "head-dim"):
        p.add_argument(f"--{flag}", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--models", type=Path, default=shape_gen.DEFAULT_OUT, help="checkpoint cache (default build/models)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="GGUFs and logs (default build/bench-8b)")
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the markdown report (default docs/bench-8b.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    p.add_argument("--target-size", type=parse_size_arg, default=None, metavar="SIZE",
                   help="ATD --target-size (default 4GB for 8.03 B weights, the same bpw for other shapes)")
    p.add_argument("--calibration-chunks", type=int, default=4, help="chunks for the --calibration step (default 4)")
    p.add_argument("--calibration-ctx", type=int, default=512, help="tokens per calibration chunk (default 512)")
    p.add_argument("-t", "--threads", type=int, default=2, help="llama.cpp threads (default 2, as the issue)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="llama-bench repetitions (default 3)")
    p.add_argument("--cli-args", default=CLI_ARGS, metavar="ARGS",
                   help=f'llama-cli options after the common ones (default "{CLI_ARGS}"; "" for llama-cli\'s own)')
    p.add_argument("--skip", action="append", default=[], choices=STEPS, help="leave out a step (repeatable)")
    p.add_argument("--quick", action="store_true", help="only the atd-gguf conversions and llama-cli (for CI): "
                   "skips calibration, llama.cpp's convert + quantize and llama-bench")
    p.add_argument("--keep", action="store_true", help="keep every GGUF and a generated checkpoint")
    p.add_argument("--assume-free-disk", type=parse_size_arg, default=None, metavar="SIZE",
                   help="pretend this much free disk (to test the refusals)")
    p.add_argument("--assume-free-memory", type=parse_size_arg, default=None, metavar="SIZE",
                   help="pretend this much available memory (to test the refusals)")
    args = p.parse_args(argv)
    for name in ("calibration_chunks", "calibration_ctx", "threads", "repetitions"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return Bench(args).run()
    except BenchError as e:
        warn(f"error: {e}".splitlines()[0])
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
