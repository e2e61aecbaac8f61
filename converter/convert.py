"""HF checkpoint -> GGUF, streaming into a temp file that is renamed at the end.

Tensors are read, encoded and written in row chunks of at most CHUNK_BYTES of float32, so peak
memory is about one chunk (plus whatever an encoder keeps), however large the embedding is.

Values a stock output type cannot hold (|w| beyond F16's range, or a Q8_0 block scale beyond it)
are refused with the tensor's name, never written as inf. An ATD tensor whose plane scales would
overflow fp16 is kept in a stock type instead (docs/atd-format.md §7).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

import gguf_types

from . import __version__
from .checkpoint import Checkpoint, resolve_model
from .errors import AtdError
from .fsutil import atomic_output, check_output_path, refuse_inputs_as_output
from .llama import ARCH, LlamaModel, SourceTensor
from .model_check import chat_template_problem
from .vocab import BpeVocab

STOCK_OUTTYPES: dict[str, tuple[QT, LlamaFileType]] = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# (gguf tensor name, shape) -> the type it is written in
TypeChoice = Callable[[str, tuple[int, ...]], QT]
# (type, float32 values of whole rows, gguf tensor name) -> the bytes/array written for those rows
Encoder = Callable[[QT, np.ndarray, str], np.ndarray]
# float32 bytes of one row chunk: the unit of reading, encoding and writing. The encoders' temporaries
# (Q8_0's are about 3x the chunk) come on top, so this stays well below a large tensor's size.
CHUNK_BYTES = 16 << 20
# largest magnitude an ATD tensor may hold without a trial fit after an overflow: plane 0's scale is
# about 0.44-0.7 amax (docs/atd-format.md §7), so it stays far from 65504; should one still
# overflow, the conversion fails naming the tensor
ATD_SAFE_AMAX = 65504.0 / 2
# what gguf_types raises for a plane scale beyond fp16
_ATD_OVERFLOW = re.compile(r"ATD plane scale .*overflows fp16")


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Norms, 1-D tensors and non-weights stay F32, as in llama.cpp's converter."""
    return len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")


def fits_blocks(qtype: QT, shape: tuple[int, ...]) -> bool:
    return shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def stock_type_choice(outtype: str) -> TypeChoice:
    qtype = STOCK_OUTTYPES[outtype][0]

    def choose(name: str, shape: tuple[int, ...]) -> QT:
        if keeps_f32(name, shape):
            return QT.F32
        # rows that do not fill Q8_0 blocks fall back to F16, as in the reference converter
        return qtype if fits_blocks(qtype, shape) else QT.F16

    return choose


def stock_encode(qtype: QT, data: np.ndarray, name: str) -> np.ndarray:
    del name
    return gguf.quants.quantize(data, qtype)


def tensor_nbytes(qtype: QT, shape: tuple[int, ...]) -> int:
    """Exact data bytes of a (…, cols) tensor in `qtype`, from gguf.GGML_QUANT_SIZES."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        raise ValueError(f"{qtype.name}: row length {shape[-1]} is not a multiple of its block size {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


@dataclass
class ConvertOptions:
    outtype: str = "f16"
    choose_type: TypeChoice | None = None
    encode: Encoder = stock_encode
    file_type: int | None = None
    extra_kv: dict[str, object] = field(default_factory=dict)
    # called with [(name, type)] before anything is written; raises AtdError to refuse
    check_plan: Callable[[list[tuple[str, QT]]], None] | None = None
    # (source tensor, type) -> the whole tensor's bytes from an encoder that needs all of it at
    # once (the calibrated fit), or None for the row-chunked encode
    encode_whole: Callable[["SourceTensor", QT], np.ndarray | None] | None = None
    # called with the model before the header is built: a first pass over the checkpoint (a size
    # plan, calibration statistics) that may set choose_type, file_type and extra_kv
    prepare: Callable[[LlamaModel, "ConvertOptions"], None] | None = None
    force: bool = False
    progress: bool = True
    # files besides the checkpoint that the conversion reads (imatrix, calibration text): never the output
    input_files: tuple[Path, ...] = ()
    # gguf tensor name -> stock type, for ATD tensors too large for fp16 plane scales (filled by convert())
    type_overrides: dict[str, QT] = field(default_factory=dict)

    def type_choice(self) -> TypeChoice:
        choose = self.choose_type or stock_type_choice(self.outtype)
        if not self.type_overrides:
            return choose
        overrides = self.type_overrides
        return lambda name, shape: overrides[name] if name in overrides else choose(name, shape)

    def gguf_file_type(self) -> int:
        return int(self.file_type if self.file_type is not None else STOCK_OUTTYPES[self.outtype][1])


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    n_tensors: int
    n_params: int
    n_bytes: int


def _add_metadata(writer: gguf.GGUFWriter, model: LlamaModel, options: ConvertOptions) -> None:
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    directory = model.checkpoint.dir
    metadata = gguf.Metadata.load(None, directory, None, total)
    if metadata.name is None:
        metadata.name = directory.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)
    model.add_hparams(writer, options.gguf_file_type())
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    BpeVocab(directory, model.params.n_vocab).add_to_gguf(writer)
    for key, value in options.extra_kv.items():
        _add_kv(writer, key, value)


def _add_kv(writer: gguf.GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def _chunk_rows(source: SourceTensor, row_bytes_out: int, alignment: int) -> int:
    """Rows per chunk: whole rope heads, at most CHUNK_BYTES of float32, and (all but the last chunk)
    a multiple of the data alignment in output bytes, so chunks concatenate into the tensor's data."""
    rows = source.shape[0]
    row_f32 = 4 * int(np.prod(source.shape[1:], dtype=np.int64))
    unit = math.lcm(source.row_group, alignment // math.gcd(row_bytes_out, alignment))
    return min(rows, max(unit, CHUNK_BYTES // max(row_f32, 1) // unit * unit))


def _checked(data: np.ndarray, name: str) -> np.ndarray:
    # min and max propagate NaN and show ±inf, without isfinite's chunk-sized temporary
    if data.size and not (math.isfinite(data.min()) and math.isfinite(data.max())):
        raise AtdError(f"tensor {name} contains NaN or Inf values")
    return data


def _abs_max(data: np.ndarray) -> float:
    return max(-float(data.min()), float(data.max())) if data.size else 0.0


# largest |w| each stock type stores without an inf: F16 rounds below 65520 to 65504; Q8_0 stores
# amax/127 as its fp16 block scale
_STOCK_LIMITS = {QT.F16: (65504.0, "F16"), QT.Q8_0: (65504.0 * 127, "Q8_0"), QT.BF16: (3.3895313892515355e38, "BF16")}


def _check_stock_range(qtype: QT, data: np.ndarray, name: str) -> None:
    limit = _STOCK_LIMITS.get(qtype)
    if limit is not None and _abs_max(data) > limit[0]:
        raise AtdError(f"tensor {name} has values beyond the {limit[1]} range (|w| > {limit[0]:.6g}); "
                       "use --outtype f32 or bf16")


class _AtdScaleOverflow(Exception):
    """An ATD fit's plane scale overflowed fp16: convert() picks stock types for such tensors and redoes the file."""


class _TensorData:
    """The data section of a GGUF whose header GGUFWriter wrote: each tensor at the next multiple
    of the alignment (GGUFWriter's own layout), written in chunks."""

    def __init__(self, path: Path, alignment: int):
        self.f = open(path, "ab")
        self.alignment = alignment

    def write(self, chunks, nbytes: int, name: str) -> None:
        self.f.write(bytes(-self.f.tell() % self.alignment))
        written = 0
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk)
            self.f.write(memoryview(chunk).cast("B"))
            written += chunk.nbytes
        if written != nbytes:  # the header promised nbytes: a mismatch would corrupt every later offset
            raise AtdError(f"internal error: tensor {name} encoded to {written} bytes, expected {nbytes}")

    def close(self) -> None:
        self.f.write(bytes(-self.f.tell() % self.alignment))
        self.f.close()


def header_writer(llama: LlamaModel, options: ConvertOptions) -> tuple[gguf.GGUFWriter, list[tuple[SourceTensor, QT, int]]]:
    """The GGUFWriter (no file yet) with every tensor info and the metadata, and the write plan
    [(source, type, bytes)]: what convert() writes before the tensor data."""
    choose = options.type_choice()
    plan: list[tuple[SourceTensor, QT, int]] = []
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCH])
    for source in llama.tensors():
        qtype = choose(source.name, source.shape)
        if keeps_f32(source.name, source.shape) and qtype != QT.F32:
            # norms and 1-D tensors feed element-wise ops, which llama.cpp cannot run on block types
            raise AtdError(f"internal error: tensor {source.name} must stay F32, the type policy chose {qtype.name}")
        nbytes = tensor_nbytes(qtype, source.shape)
        plan.append((source, qtype, nbytes))
        writer.add_tensor_info(source.name, source.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    _add_metadata(writer, llama, options)
    return writer, plan


def convert(model: str | Path, output: str | Path, options: ConvertOptions | None = None) -> ConvertResult:
    """Convert a LlamaForCausalLM checkpoint (directory or Hub repo id) to a GGUF file."""
    options = options or ConvertOptions()
    output = check_output_path(Path(output), options.force)
    refuse_inputs_as_output(output, options.input_files)
    checkpoint = Checkpoint(resolve_model(str(model)))
    inputs = [*checkpoint.input_files(), *options.input_files]
    refuse_inputs_as_output(output, inputs)
    llama = LlamaModel(checkpoint)
    if options.prepare is not None:
        options.prepare(llama, options)
    try:
        return _write(llama, output, options, inputs)
    except _AtdScaleOverflow as overflow:
        options.type_overrides.update(_atd_overflow_fallbacks(llama, options, overflow.args[0]))
    try:
        return _write(llama, output, options, inputs)
    except _AtdScaleOverflow as overflow:  # a tensor the magnitude bound deemed safe
        raise AtdError(f"tensor {overflow.args[0]}: an ATD plane scale overflows fp16 (docs/atd-format.md §7)") from None


def check_chat_template(writer: gguf.GGUFWriter) -> None:
    """llama.cpp parses the chat template when it loads the model and aborts on a syntax error, so a
    template that does not parse is refused here (jinja2's parser stands in for llama.cpp's)."""
    value = writer.kv_data[0].get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    templates = [value.value] if value is not None and isinstance(value.value, str) else []
    for key, entry in writer.kv_data[0].items():  # named templates: tokenizer.chat_template.NAME
        if key.startswith(gguf.Keys.Tokenizer.CHAT_TEMPLATE + ".") and isinstance(entry.value, str):
            templates.append(entry.value)
    for template in templates:
        problem = chat_template_problem(template)
        if problem is not None:
            raise AtdError(f"the chat template (tokenizer_config.json) does not parse: {problem}; "
                           "llama.cpp would refuse the file")


def _write(llama: LlamaModel, output: Path, options: ConvertOptions, inputs: list[Path]) -> ConvertResult:
    writer, plan = header_writer(llama, options)
    check_chat_template(writer)
    if options.check_plan is not None:
        options.check_plan([(source.name, qtype) for source, qtype, _ in plan])

    n_params = n_bytes = 0
    with atomic_output(output, options.force, inputs) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.close()
        data = _TensorData(tmp, writer.data_alignment)
        try:
            total = sum(math.prod(s.shape) for s, _, _ in plan)
            from tqdm import tqdm

            # disable=None hides the bar when stderr is not a terminal
            with tqdm(total=total, unit="w", unit_scale=True, disable=None if options.progress else True,
                      desc="converting", leave=False) as bar:
                for source, qtype, nbytes in plan:
                    bar.set_postfix_str(source.name, refresh=False)
                    chunks = _encoded_chunks(source, qtype, nbytes, data.alignment, options, bar)
                    data.write(chunks, nbytes, source.name)
                    n_params += math.prod(source.shape)
                    n_bytes += nbytes
        finally:
            data.close()
    return ConvertResult(output, len(plan), n_params, n_bytes)


def _encoded_chunks(source: SourceTensor, qtype: QT, nbytes: int, alignment: int, options: ConvertOptions, bar):
    """The encoded bytes of one tensor, in row chunks (or whole, from options.encode_whole)."""
    if options.encode_whole is not None:
        whole = options.encode_whole(source, qtype)
        if whole is not None:
            bar.update(int(np.prod(source.shape)))
            yield whole
            return
    if len(source.shape) < 2:
        yield _encode_chunk(qtype, _checked(source.load(), source.name), source.name, options)
        bar.update(int(np.prod(source.shape)))
        return
    rows = source.shape[0]
    step = _chunk_rows(source, nbytes // rows, alignment)
    for start in range(0, rows, step):
        chunk = _checked(source.load_rows(start, min(rows, start + step)), source.name)
        yield _encode_chunk(qtype, chunk, source.name, options)
        bar.update(chunk.size)
        del chunk


def _encode_chunk(qtype: QT, data: np.ndarray, name: str, options: ConvertOptions) -> np.ndarray:
    _check_stock_range(qtype, data, name)
    try:
        return options.encode(qtype, data, name)
    except ValueError as e:
        if gguf_types.is_atd_type_id(qtype) and _ATD_OVERFLOW.search(str(e)):
            raise _AtdScaleOverflow(name) from None
        raise


def _atd_overflow_fallbacks(llama: LlamaModel, options: ConvertOptions, failed: str) -> dict[str, QT]:
    """The stock type for each ATD tensor whose fit overflows fp16 (docs/atd-format.md §7): Q8_0 when its
    rows fill Q8_0 blocks and its values fit Q8_0's scales, else F32. Tensors with |w| <= ATD_SAFE_AMAX
    cannot overflow; the others get a trial fit."""
    choose = options.type_choice()
    fallbacks: dict[str, QT] = {}
    for source in llama.tensors():
        qtype = choose(source.name, source.shape)
        if not gguf_types.is_atd_type_id(qtype) or len(source.shape) < 2:
            continue
        rows = source.shape[0]
        step = _chunk_rows(source, 1, 1)
        amax = max(_abs_max(source.load_rows(start, min(rows, start + step))) for start in range(0, rows, step))
        if amax <= ATD_SAFE_AMAX and source.name != failed:
            continue
        try:
            for start in range(0, rows, step):
                _encode_chunk(qtype, source.load_rows(start, min(rows, start + step)), source.name, options)
        except _AtdScaleOverflow:
            fits_q8 = fits_blocks(QT.Q8_0, source.shape) and amax <= _STOCK_LIMITS[QT.Q8_0][0]
            fallbacks[source.name] = QT.Q8_0 if fits_q8 else QT.F32
    return fallbacks


__all__ = ["ConvertOptions", "ConvertResult", "STOCK_OUTTYPES", "convert", "header_writer", "keeps_f32",
           "fits_blocks", "stock_type_choice", "tensor_nbytes", "__version__"]
