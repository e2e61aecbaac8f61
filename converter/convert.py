"""HF checkpoint -> GGUF, streaming one tensor at a time into a temp file that is renamed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from . import __version__
from .checkpoint import Checkpoint, resolve_model
from .errors import AtdError
from .fsutil import atomic_output, check_output_path
from .llama import ARCH, LlamaModel, SourceTensor
from .vocab import BpeVocab

STOCK_OUTTYPES: dict[str, tuple[QT, LlamaFileType]] = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}

# (gguf tensor name, shape) -> the type it is written in
TypeChoice = Callable[[str, tuple[int, ...]], QT]
# (type, float32 values, gguf tensor name) -> the bytes/array written for it
Encoder = Callable[[QT, np.ndarray, str], np.ndarray]


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
    block, size = gguf.GGML_QUANT_SIZES[qtype]
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
    force: bool = False
    progress: bool = True

    def type_choice(self) -> TypeChoice:
        return self.choose_type or stock_type_choice(self.outtype)

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


def convert(model: str | Path, output: str | Path, options: ConvertOptions | None = None) -> ConvertResult:
    """Convert a LlamaForCausalLM checkpoint (directory or Hub repo id) to a GGUF file."""
    options = options or ConvertOptions()
    output = check_output_path(Path(output), options.force)
    llama = LlamaModel(Checkpoint(resolve_model(str(model))))
    choose = options.type_choice()

    plan: list[tuple[SourceTensor, QT]] = []
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCH])
    for source in llama.tensors():
        qtype = choose(source.name, source.shape)
        plan.append((source, qtype))
        writer.add_tensor_info(source.name, source.shape, np.dtype(np.float32),
                               tensor_nbytes(qtype, source.shape), raw_dtype=qtype)
    if options.check_plan is not None:
        options.check_plan([(source.name, qtype) for source, qtype in plan])
    _add_metadata(writer, llama, options)

    n_params = n_bytes = 0
    with atomic_output(output, options.force) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            total = sum(int(np.prod(s.shape)) for s, _ in plan)
            from tqdm import tqdm

            # disable=None hides the bar when stderr is not a terminal
            with tqdm(total=total, unit="w", unit_scale=True, disable=None if options.progress else True,
                      desc="converting", leave=False) as bar:
                for source, qtype in plan:
                    bar.set_postfix_str(source.name, refresh=False)
                    data = source.load()
                    if not np.isfinite(data).all():
                        raise AtdError(f"tensor {source.name} contains NaN or Inf values")
                    encoded = np.ascontiguousarray(options.encode(qtype, data, source.name))
                    writer.write_tensor_data(encoded)
                    n_params += data.size
                    n_bytes += encoded.nbytes
                    bar.update(data.size)
                    del data, encoded
        finally:
            writer.close()
    return ConvertResult(output, len(plan), n_params, n_bytes)


__all__ = ["ConvertOptions", "ConvertResult", "STOCK_OUTTYPES", "convert", "keeps_f32", "fits_blocks",
           "stock_type_choice", "tensor_nbytes", "__version__"]
