"""The atd-gguf command line: a thin layer over converter.* library calls."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import click

from . import __version__
from .errors import AtdError


class _Group(click.Group):
    """Shows failures as one line (a traceback only with --verbose) and exits non-zero."""

    def invoke(self, ctx: click.Context):
        # SIGTERM, SIGHUP (a closed terminal), SIGQUIT and SIGUSR1 unwind like Ctrl-C, so temp
        # outputs are deleted (fsutil.atomic_output)
        handles_signals = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, _terminate) for sig in _TERMINATING_SIGNALS} if handles_signals else {}
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 - the CLI boundary
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            message = str(e) if isinstance(e, AtdError) else f"{type(e).__name__}: {e}"
            line = message.splitlines()[0] if message.strip() else type(e).__name__
            while line.lower().startswith("error:"):  # a library's own prefix would double ours
                line = line[len("error:"):].lstrip() or type(e).__name__
            from .inspect_gguf import printable  # paths and names may hold escape sequences

            click.echo(f"error: {printable(line)}", err=True)
            sys.exit(1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)


_TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1")
                             if hasattr(signal, name))


def _terminate(signum, frame) -> None:
    # later signals of the set must not interrupt the cleanup that this exception starts
    for sig in _TERMINATING_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    click.echo("error: terminated", err=True)
    raise SystemExit(128 + signum)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(__version__, prog_name="atd-gguf")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Convert Llama-family checkpoints to GGUF, with ternary-plane (ATD) tensor types.

    \b
    Example:
      atd-gguf convert ./SmolLM2-135M-Instruct -o smollm2-f16.gguf --outtype f16
      atd-gguf inspect smollm2-f16.gguf
    """
    ctx.ensure_object(dict)["verbose"] = verbose
    # gguf-py logs tokenizer quirks as warnings; they are noise unless debugging
    logging.getLogger("gguf").setLevel(logging.DEBUG if verbose else logging.ERROR)


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
              help="Stock type of the weight matrices (default f16; norms stay F32). Not with ATD options.")
@click.option("--planes", type=int, default=None,
              help="Write attention/FFN weights as ATD with this many ternary planes (1..4).")
@click.option("--target-size", "target_size", default=None, metavar="SIZE",
              help="ATD with planes chosen per tensor so the file is at most SIZE: bytes, or 95MB / 4GB "
                   "(powers of 10), 90MiB / 3.7GiB (powers of 2).")
@click.option("--bpw", type=float, default=None,
              help="ATD with planes chosen per tensor for at most this many bits per weight (all tensors).")
@click.option("--method", type=click.Choice(["grid", "greedy"]), default="grid", show_default=True,
              help="ATD fit: balanced-ternary grid start + alternating refit, or greedy residual planes.")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None,
              help="llama.cpp importance matrix (GGUF or legacy .dat) weighting the ATD fit and the size plan.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None, metavar="TEXT",
              help="Text file: fit the ATD planes with GPTQ error feedback on the model's activations "
                   "for this text (needs torch).")
@click.option("--calibration-chunks", type=int, default=32, show_default=True,
              help="With --calibration: chunks of --calibration-ctx tokens to use at most.")
@click.option("--calibration-ctx", type=int, default=512, show_default=True,
              help="With --calibration: tokens per chunk.")
@click.option("--sensitivity", type=click.Choice(["table", "fisher"]), default="table", show_default=True,
              help="Under a budget, how much each tensor's error costs: the built-in table, or measured "
                   "on the --calibration text (empirical Fisher; slower).")
@click.option("--embed-type", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
              help="With ATD: type of token_embd and output (default q8_0 with --planes; chosen by the "
                   "size plan with --target-size/--bpw).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def convert(model: str, output: Path, outtype: str | None, planes: int | None, target_size: str | None,
            bpw: float | None, method: str, imatrix: Path | None, calibration: Path | None, calibration_chunks: int,
            calibration_ctx: int, sensitivity: str, embed_type: str | None, force: bool,
            no_progress: bool) -> None:
    """Convert MODEL (a checkpoint directory or a Hub repo id) to GGUF.

    \b
    Examples:
      atd-gguf convert ./Llama-3.2-1B-Instruct -o llama-f16.gguf --outtype f16
      atd-gguf convert ./Llama-3.2-1B-Instruct -o llama-atd3.gguf --planes 3
      atd-gguf convert ./Llama-3.2-1B-Instruct -o l.gguf --target-size 900MB --calibration calib.txt
      atd-gguf convert meta-llama/Llama-3.2-1B-Instruct -o l.gguf --planes 2 --imatrix imatrix.gguf
    """
    from .convert import ConvertOptions
    from .convert import convert as run_convert

    atd = planes is not None or target_size is not None or bpw is not None
    if not atd:
        for flag, value in (("--imatrix", imatrix), ("--calibration", calibration), ("--embed-type", embed_type)):
            if value is not None:
                raise AtdError(f"{flag} needs --planes, --target-size or --bpw (it applies to the ATD fit)")
        options = ConvertOptions(outtype=outtype or "f16", force=force, progress=not no_progress)
    else:
        if outtype is not None:
            raise AtdError("--outtype and the ATD options exclude each other (use --embed-type for the embeddings)")
        from .atd_policy import AtdOptions
        from .budget import parse_size

        options = AtdOptions(planes, method, embed_type, imatrix,
                             target_size=parse_size(target_size) if target_size is not None else None,
                             bpw=bpw, calibration=calibration, calibration_chunks=calibration_chunks,
                             calibration_ctx=calibration_ctx,
                             sensitivity=sensitivity).convert_options(force=force, progress=not no_progress)
        options.input_files = tuple(p for p in (imatrix, calibration) if p is not None)
    start = time.perf_counter()
    result = run_convert(model, output, options)
    click.echo(f"wrote {result.path}: {result.n_tensors} tensors, {result.n_params:,} weights, "
               f"{result.n_bytes / 2**20:.1f} MiB of tensor data "
               f"({8 * result.n_bytes / result.n_params:.3f} bpw) in {time.perf_counter() - start:.1f} s")


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON instead of a table (non-finite numbers, NaN and ±Infinity, as null).")
@click.option("--summary", is_flag=True, help="Only the per-type totals.")
def inspect(gguf_file: Path, as_json: bool, summary: bool) -> None:
    """Show each tensor's type, shape, bytes and bits per weight, plus totals.

    \b
    Example:
      atd-gguf inspect model-atd3.gguf --summary
    """
    from .inspect_gguf import format_summary, inspect_file

    info = inspect_file(gguf_file)
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2, default=str))
    else:
        click.echo(format_summary(info, per_tensor=not summary))


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Modelfile to write (default: MODEL.Modelfile next to MODEL.gguf).")
@click.option("--system", default=None,
              help="SYSTEM message. Default: the chat template's built-in system prompt, if it has one; "
                   "pass --system '' for none.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Extra PARAMETER (repeatable), checked against Ollama's table, e.g. top_p=0.9 or stop=END.")
@click.option("--num-ctx", type=click.IntRange(min=1), default=None, help="PARAMETER num_ctx (context length).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=None, help="PARAMETER temperature.")
@click.option("--force", is_flag=True, help="Overwrite an existing Modelfile.")
def modelfile(gguf_file: Path, output: Path | None, system: str | None, params: tuple[str, ...],
              num_ctx: int | None, temperature: float | None, force: bool) -> None:
    """Write an Ollama Modelfile for GGUF_FILE (FROM, TEMPLATE, stops, PARAMETERs, SYSTEM, LICENSE).

    The TEMPLATE is Ollama's Go template for the GGUF's chat template (Llama-3 instruct or ChatML);
    an unrecognized template is left out, so Ollama uses the GGUF's own. See docs/ollama.md.

    \b
    Example:
      atd-gguf modelfile smollm2-q8_0.gguf --num-ctx 4096 --temperature 0.7
      ollama create smollm2 -f smollm2-q8_0.Modelfile
    """
    from .modelfile import ModelfileOptions, parse_param_option, write_modelfile

    pairs = [parse_param_option(p) for p in params]
    if num_ctx is not None:
        pairs.append(("num_ctx", str(num_ctx)))
    if temperature is not None:
        pairs.append(("temperature", repr(temperature)))
    result = write_modelfile(gguf_file, output, ModelfileOptions(system=system, params=pairs, force=force))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    template = result.template.name if result.template else "none (the GGUF's own)"
    from .inspect_gguf import printable

    click.echo(f"wrote {printable(result.path)} (template: {template}); create the model with: "
               f"ollama create NAME -f {printable(result.path)}")


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--stock", is_flag=True, help="Rewrite the ATD tensors as a stock ggml type (the only export).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output .gguf file.")
@click.option("--type", "export_type", type=click.Choice(["q8_0", "f16"]), default="q8_0", show_default=True,
              help="Stock type of the rewritten tensors (f16 keeps the ATD values to fp16 precision).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def export(gguf_file: Path, stock: bool, output: Path, export_type: str, force: bool, no_progress: bool) -> None:
    """Write a copy of GGUF_FILE that stock llama.cpp and Ollama load: every ATD tensor is
    reconstructed (sum of its scaled ternary planes) and re-encoded as Q8_0 or F16; the other
    tensors and the metadata are copied. The file grows to the stock type's size.

    \b
    Examples:
      atd-gguf export --stock smollm2-atd3.gguf -o smollm2-atd3-q8_0.gguf
      atd-gguf export --stock llama-atd2.gguf -o llama-atd2-f16.gguf --type f16
      atd-gguf modelfile smollm2-atd3-q8_0.gguf && ollama create smollm2-atd3 -f smollm2-atd3-q8_0.Modelfile
    """
    from .export import export_stock

    if not stock:
        raise click.UsageError("export needs --stock (a stock-typed copy is the only export)")
    start = time.perf_counter()
    result = export_stock(gguf_file, output, export_type, force=force, progress=not no_progress)
    for key in result.dropped_keys:
        click.echo(f"warning: left out the empty metadata array {key} (gguf-py cannot write empty arrays)", err=True)
    click.echo(f"wrote {result.path}: {result.n_rewritten} of {result.n_tensors} tensors rewritten as "
               f"{export_type.upper()}, {result.n_bytes / 2**20:.1f} MiB of tensor data "
               f"({8 * result.n_bytes / result.n_params:.3f} bpw) in {time.perf_counter() - start:.1f} s")


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--repo", required=True, metavar="NAMESPACE/NAME", help="Hub model repo to create or update.")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--dry-run", is_flag=True, help="Show the files and the model card; contact nobody.")
@click.option("--endpoint", default=None, metavar="URL",
              help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co).")
@click.option("--license", "license_", default=None, metavar="ID",
              help="License id for the card (default: general.license from the GGUF), e.g. apache-2.0.")
@click.option("--base-model", default=None, metavar="NAMESPACE/NAME",
              help="Base model repo for the card (default: general.base_model.0 from the GGUF, if any).")
@click.option("--quality", type=click.Path(path_type=Path), default=None, metavar="FILE.md",
              help="Markdown with quality measurements (e.g. a perplexity table) to put in the card.")
def publish(gguf_file: Path, repo: str, private: bool, dry_run: bool, endpoint: str | None,
            license_: str | None, base_model: str | None, quality: Path | None) -> None:
    """Upload GGUF_FILE to the Hugging Face Hub with a model card and Ollama template/params files.

    One commit adds the GGUF, README.md and, for a recognized chat template, Ollama's `template`
    and `params` files. The token comes from HF_TOKEN or `hf auth login` and is never printed.

    \b
    Examples:
      atd-gguf publish llama-atd3.gguf --repo me/Llama-3.2-1B-ATD3-GGUF --dry-run
      atd-gguf publish llama-atd3.gguf --repo me/Llama-3.2-1B-ATD3-GGUF --license llama3.2
      atd-gguf publish l.gguf --repo me/l-gguf --base-model meta-llama/Llama-3.2-1B-Instruct --private
    """
    from .publish import describe_plan, plan_publish
    from .publish import publish as run_publish

    plan = plan_publish(gguf_file, repo, private=private, license=license_, base_model=base_model, quality=quality)
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        click.echo(describe_plan(plan))
        return
    result = run_publish(plan, endpoint=endpoint)
    click.echo(f"uploaded {', '.join(result.uploaded)} ({plan.total_bytes:,} bytes) to {result.repo_url} "
               f"in commit {result.commit_oid[:12]}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The prompt (with --chat: the user message).")
@click.option("-n", "--n-predict", type=int, default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--chat", is_flag=True, help="Apply the model's chat template (one user turn) and answer it.")
@click.option("--system", default=None, help="With --chat: a system prompt.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--seed", type=int, default=42, show_default=True, help="Sampling seed.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice).")
@click.option("-c", "--ctx-size", type=int, default=2048, show_default=True, help="Context length.")
def run(model: Path, prompt: str, n_predict: int, chat: bool, system: str | None, temp: float, seed: int,
        threads: int | None, ctx_size: int) -> None:
    """Generate text with MODEL (an ATD or stock GGUF) on the patched llama.cpp (`make llama`).

    \b
    Examples:
      atd-gguf run smollm2-atd3.gguf -p "What is the capital of France?" --chat
      atd-gguf run llama-atd3.gguf -p "Once upon a time" -n 64
    """
    from .run import run as run_model

    if system is not None and not chat:
        raise AtdError("--system needs --chat")
    click.echo(run_model(model, prompt, n_predict, chat, temp=temp, seed=seed, threads=threads,
                         ctx_size=ctx_size, system=system))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--parallel", type=click.IntRange(min=1), default=2, show_default=True,
              help="Requests served at the same time.")
@click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Context length of each request.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice).")
@click.option("--log", "echo_log", is_flag=True, help="Show llama-server's log on stderr.")
def serve(model: Path, host: str, port: int, parallel: int, ctx_size: int, threads: int | None,
          echo_log: bool) -> None:
    """Serve MODEL (an ATD or stock GGUF) over an OpenAI-compatible HTTP API with the patched
    llama-server (`make llama`), using the chat template stored in the file. Ctrl-C or SIGTERM stops it.

    \b
    Examples:
      atd-gguf serve smollm2-atd3.gguf --port 8080
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}]}'
    """
    from .serve import ServeOptions, serve_until_stopped

    def announce(server) -> None:
        click.echo(f"serving {model} at {server.url} (OpenAI API: {server.api_url}); Ctrl-C stops")

    serve_until_stopped(model, ServeOptions(host=host, port=port, parallel=parallel, ctx_size=ctx_size,
                                            threads=threads, echo_log=echo_log), on_ready=announce)
    click.echo("stopped", err=True)


if __name__ == "__main__":
    main()
