"""The atd-gguf command line: a thin layer over converter.* library calls."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from . import __version__
from .errors import AtdError


class _Group(click.Group):
    """Shows failures as one line (a traceback only with --verbose) and exits non-zero."""

    def invoke(self, ctx: click.Context):
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
            click.echo(f"error: {message.splitlines()[0] if message else type(e).__name__}", err=True)
            sys.exit(1)


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
              help="Stock type of the weight matrices (default f16; norms stay F32). Not with --planes.")
@click.option("--planes", type=int, default=None,
              help="Write attention/FFN weights as ATD with this many ternary planes (1..4).")
@click.option("--method", type=click.Choice(["grid", "greedy"]), default="grid", show_default=True,
              help="ATD fit: balanced-ternary grid start + alternating refit, or greedy residual planes.")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None,
              help="llama.cpp importance matrix (GGUF or legacy .dat) weighting the ATD scale fit.")
@click.option("--embed-type", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="q8_0",
              show_default=True, help="With --planes: type of token_embd and output.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def convert(model: str, output: Path, outtype: str | None, planes: int | None, method: str,
            imatrix: Path | None, embed_type: str, force: bool, no_progress: bool) -> None:
    """Convert MODEL (a checkpoint directory or a Hub repo id) to GGUF.

    \b
    Examples:
      atd-gguf convert ./Llama-3.2-1B-Instruct -o llama-f16.gguf --outtype f16
      atd-gguf convert ./Llama-3.2-1B-Instruct -o llama-atd3.gguf --planes 3
      atd-gguf convert meta-llama/Llama-3.2-1B-Instruct -o l.gguf --planes 2 --imatrix imatrix.gguf
    """
    from .convert import ConvertOptions
    from .convert import convert as run_convert

    if planes is None:
        if imatrix is not None:
            raise AtdError("--imatrix needs --planes (it weights the ATD fit)")
        options = ConvertOptions(outtype=outtype or "f16", force=force, progress=not no_progress)
    else:
        if outtype is not None:
            raise AtdError("--outtype and --planes exclude each other (use --embed-type for the embeddings)")
        from .atd_policy import AtdOptions

        options = AtdOptions(planes, method, embed_type, imatrix).convert_options(
            force=force, progress=not no_progress)
    start = time.perf_counter()
    result = run_convert(model, output, options)
    click.echo(f"wrote {result.path}: {result.n_tensors} tensors, {result.n_params:,} weights, "
               f"{result.n_bytes / 2**20:.1f} MiB of tensor data "
               f"({8 * result.n_bytes / result.n_params:.3f} bpw) in {time.perf_counter() - start:.1f} s")


@main.command()
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
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


if __name__ == "__main__":
    main()
