"""Which tensors become ATD, and how: the ATD side of `atd-gguf convert`.

* `--planes N`: every attention/FFN weight matrix gets N planes; token_embd/output follow
  `--embed-type` (Q8_0 by default, as llama.cpp keeps them at higher precision); norms and
  rope_freqs stay F32.
* `--target-size S` / `--bpw X`: converter.budget picks each tensor's type (planes 1..4 for the
  matrices, a stock or ATD type for token_embd/output) for the least estimated loss within the
  budget; the plan goes into the metadata (`atd.plan`).
* `--calibration TEXT`: converter.calibration fits the ATD matrices with GPTQ error feedback on
  the checkpoint's own activations (layer by layer), instead of the per-block fit.

The importance that weighs the per-block fit and the plan's error estimates comes from `--imatrix`
(llama-imatrix output) or, with `--calibration`, from the calibration text's activations. Each
tensor's sensitivity (how much its error raises the loss) comes from converter.budget's table, or
with `--sensitivity fisher` is measured on the calibration text (converter.sensitivity: an
empirical-Fisher pass whose forward half also gives that importance). The table is the default:
on the continuous SmolLM2 fixture the measured values planned worse files at all three stock
rungs (docs/bench-quality.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

import gguf_types

from . import __version__
from .convert import STOCK_OUTTYPES, ConvertOptions, fits_blocks, header_writer, keeps_f32, stock_encode
from .errors import AtdError
from .imatrix import load_imatrix
from .llama import EMBEDDINGS, LINEAR_WEIGHT, LlamaModel, SourceTensor

EMBED_TYPES = tuple(STOCK_OUTTYPES)
SENSITIVITY_SOURCES = ("table", "fisher")  # converter.budget's table; converter.sensitivity's measurement
# general.file_type of an ATD file: 1000 + N - 1 when every ATD matrix has N planes, mirroring the
# type ids; ATD_FILE_TYPE_MIX when the plane count varies (docs/atd-format.md §1)
ATD_FILE_TYPE_BASE = gguf_types.ATD_TYPE_ID_BASE
ATD_FILE_TYPE_MIX = ATD_FILE_TYPE_BASE + 4


@dataclass
class AtdOptions:
    planes: int | None = None
    method: str = "grid"
    embed_type: str | None = None          # None: q8_0 with --planes, planned with a budget
    imatrix: Path | None = None
    target_size: int | None = None         # bytes of the whole file
    bpw: float | None = None               # bits per weight over every tensor
    calibration: Path | None = None        # text file: GPTQ fit (and importance, sensitivities)
    calibration_chunks: int = 32
    calibration_ctx: int = 512
    sensitivity: str = "table"             # the plan's per-tensor sensitivities: SENSITIVITY_SOURCES
    fisher_chunks: int = 8                 # of the calibration chunks, those the sensitivity pass backpropagates
    _importance: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _sensitivities: object = field(default=None, repr=False)  # converter.sensitivity.Sensitivities
    _plan: object = field(default=None, repr=False)       # converter.budget.Plan under a budget
    _calibrated: object = field(default=None, repr=False)  # converter.calibration.LayerwiseCalibration

    def __post_init__(self) -> None:
        targets = [x is not None for x in (self.planes, self.target_size, self.bpw)]
        if sum(targets) != 1:
            raise AtdError("give exactly one of --planes, --target-size and --bpw")
        if self.planes is not None and not 1 <= self.planes <= 4:
            raise AtdError(f"--planes must be 1..4, got {self.planes}")
        if self.method not in gguf_types.METHODS:
            raise AtdError(f"--method must be one of {', '.join(gguf_types.METHODS)}, got {self.method!r}")
        if self.embed_type is not None and self.embed_type not in EMBED_TYPES:
            raise AtdError(f"--embed-type must be one of {', '.join(EMBED_TYPES)}, got {self.embed_type!r}")
        if self.calibration is not None:
            if self.method != "grid":
                raise AtdError("--calibration fits with GPTQ on the grid fit's scales; it does not take --method greedy")
            if not Path(self.calibration).is_file():
                raise AtdError(f"{self.calibration}: no such calibration text file")
            if self.calibration_chunks < 1 or self.calibration_ctx < 16:
                raise AtdError("--calibration-chunks must be >= 1 and --calibration-ctx >= 16")
        if self.sensitivity not in SENSITIVITY_SOURCES:
            raise AtdError(f"--sensitivity must be one of {', '.join(SENSITIVITY_SOURCES)}, got {self.sensitivity!r}")
        if self.sensitivity == "fisher" and (self.calibration is None or not self.planned):
            raise AtdError("--sensitivity fisher needs --calibration and --target-size or --bpw")
        if self.imatrix is not None:
            self._importance = load_imatrix(self.imatrix)

    @property
    def planned(self) -> bool:
        return self.planes is None

    # -- type choice

    def choose(self, name: str, shape: tuple[int, ...]) -> QT:
        if self._plan is not None:
            return self._plan.type_for(name)
        if self.planned:  # before the plan exists (sizing the header): any candidate will do
            return self.candidates(name, shape)[0]
        if keeps_f32(name, shape):
            return QT.F32
        if LINEAR_WEIGHT.match(name):
            atype = gguf_types.atd_type_for(self.planes, shape[-1])
            if atype is not None:
                return gguf_types.gguf_qtype(atype)
            return QT.Q8_0 if fits_blocks(QT.Q8_0, shape) else QT.F16
        qtype = STOCK_OUTTYPES[self.embed_type or "q8_0"][0]
        return qtype if fits_blocks(qtype, shape) else QT.F16

    def candidates(self, name: str, shape: tuple[int, ...]) -> tuple[QT, ...]:
        """The budget's candidate types; --embed-type pins the embeddings."""
        from .budget import candidate_types

        if self.embed_type is not None and name in EMBEDDINGS:
            qtype = STOCK_OUTTYPES[self.embed_type][0]
            return (qtype if fits_blocks(qtype, shape) else QT.F16,)
        return candidate_types(name, shape)

    # -- importance

    def importance_for(self, name: str, cols: int) -> np.ndarray | None:
        values = self._importance.get(name)
        if values is None:
            return None
        if values.shape != (cols,):
            raise AtdError(f"{self.imatrix}: unusable imatrix ({name} has {values.size} values, "
                           f"the tensor has {cols} columns)")
        return values

    def check_coverage(self, names: list[str]) -> None:
        """An imatrix that matches none of the ATD tensors was made for another model."""
        if self.imatrix is not None and not any(n in self._importance for n in names):
            raise AtdError(f"{self.imatrix}: unusable imatrix (no entry matches this model's tensors)")

    # -- encoding

    def encode(self, qtype: QT, data: np.ndarray, name: str) -> np.ndarray:
        if not gguf_types.is_atd_type_id(qtype):
            return stock_encode(qtype, data, name)
        atype = gguf_types.atd_type(int(qtype))
        return gguf_types.quantize(data, atype, self.method, self.importance_for(name, data.shape[-1]))

    def encode_whole(self, source: SourceTensor, qtype: QT) -> np.ndarray | None:
        """The GPTQ-fitted bytes of a calibrated ATD matrix (None: the row-chunked encode)."""
        if self._calibrated is None or not gguf_types.is_atd_type_id(qtype) or not LINEAR_WEIGHT.match(source.name):
            return None
        return self._calibrated.encoded(source.name)

    # -- the first pass over the model

    def prepare(self, llama: LlamaModel, options: ConvertOptions) -> None:
        if self.calibration is not None:
            self._calibrate_statistics(llama)
        if self.planned:
            self._make_plan(llama, options)
        if self.calibration is not None:
            self._start_gptq(llama)
        options.file_type = self._file_type(llama)
        options.extra_kv = self.metadata()

    def _tokens(self, llama: LlamaModel) -> np.ndarray:
        from .calibration import tokenize_calibration

        text = Path(self.calibration).read_text(encoding="utf-8", errors="replace")
        return tokenize_calibration(text, llama.checkpoint.dir, n_ctx=self.calibration_ctx,
                                    max_chunks=self.calibration_chunks)

    def _calibrate_statistics(self, llama: LlamaModel) -> None:
        """Under a budget, without an imatrix file: the calibration text's mean x² per input column (an
        unquantized forward pass), for the plan's estimates and the per-block fit of what GPTQ does not
        fit. With --sensitivity fisher, the same pass also measures the plan's sensitivities."""
        if not self.planned:
            return
        if self.sensitivity == "fisher":
            from .sensitivity import measure_sensitivity

            self._sensitivities = measure_sensitivity(llama.checkpoint.dir, self._tokens(llama),
                                                      fisher_chunks=self.fisher_chunks)
            if self.imatrix is None:
                self._importance = self._sensitivities.importance
        elif self.imatrix is None:
            from .calibration import LayerwiseCalibration

            self._importance = LayerwiseCalibration(llama.checkpoint.dir, self._tokens(llama)).statistics()

    def _make_plan(self, llama: LlamaModel, options: ConvertOptions) -> None:
        from . import budget

        sources = list(llama.tensors())
        measured = self._sensitivities
        tensors = budget.estimate_sources(sources, types_for=self.candidates, importance_for=self.importance_for,
                                          progress=_progress(options.progress, "estimating"),
                                          row_weights_for=measured.row_weights if measured else None)
        sensitivity_of = measured.sensitivity if measured else None  # None: budget's table
        if self.bpw is not None:
            self._plan = budget.plan_for_bpw(tensors, self.bpw, sensitivity_of=sensitivity_of)
            return
        options.file_type = ATD_FILE_TYPE_MIX  # the header size does not depend on these values
        options.extra_kv = self.metadata()
        base = budget.gguf_header_nbytes(header_writer(llama, options)[0])
        self._plan = budget.plan_for_size(
            tensors, self.target_size, target=f"size <= {self.target_size:,} bytes",
            overhead=lambda plan: base + budget.gguf_string_kv_nbytes("atd.plan", plan.summary_json()),
            sensitivity_of=sensitivity_of)

    def _start_gptq(self, llama: LlamaModel) -> None:
        from .calibration import GptqQuantizer, LayerwiseCalibration

        def atype_for(name: str, shape: tuple[int, int]):
            qtype = self.choose(name, tuple(shape))
            return gguf_types.atd_type(int(qtype)) if gguf_types.is_atd_type_id(qtype) else None

        self._calibrated = LayerwiseCalibration(llama.checkpoint.dir, self._tokens(llama), GptqQuantizer(atype_for))

    def _file_type(self, llama: LlamaModel) -> int:
        planes = {gguf_types.atd_type(int(q)).planes for s in llama.tensors()
                  if gguf_types.is_atd_type_id(q := self.choose(s.name, s.shape)) and LINEAR_WEIGHT.match(s.name)}
        return ATD_FILE_TYPE_BASE + planes.pop() - 1 if len(planes) == 1 else ATD_FILE_TYPE_MIX

    def metadata(self) -> dict[str, object]:
        kv: dict[str, object] = {"atd.format_version": gguf_types.ATD_FORMAT_VERSION}
        if self.planes is not None:
            kv["atd.planes"] = self.planes
        kv["atd.method"] = "gptq" if self.calibration is not None else self.method
        kv["atd.embed_type"] = self.embed_type or ("q8_0" if not self.planned else "planned")
        kv["atd.tool"] = f"atd-gguf {__version__}"
        if self.imatrix is not None:
            kv["atd.imatrix"] = Path(self.imatrix).name
        if self.calibration is not None:
            kv["atd.calibration"] = Path(self.calibration).name
            kv["atd.calibration_tokens"] = self.calibration_chunks * self.calibration_ctx
        if self.planned:  # where the plan's per-tensor sensitivities came from
            kv["atd.sensitivity"] = self.sensitivity
        if self._plan is not None:
            kv["atd.plan"] = self._plan.summary_json()
        return kv

    def convert_options(self, *, force: bool = False, progress: bool = True) -> ConvertOptions:
        return ConvertOptions(
            choose_type=self.choose, encode=self.encode, encode_whole=self.encode_whole, prepare=self.prepare,
            file_type=ATD_FILE_TYPE_MIX if self.planned else ATD_FILE_TYPE_BASE + self.planes - 1,
            extra_kv=self.metadata(), force=force, progress=progress, check_plan=self._check_plan)

    def _check_plan(self, names_and_types: list[tuple[str, QT]]) -> None:
        self.check_coverage([n for n, t in names_and_types if LINEAR_WEIGHT.match(n)])


def _progress(enabled: bool, what: str):
    """A one-line status on stderr while a first pass runs (when stderr is a terminal)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    return lambda name: print(f"\r{what} {name:<40}", end="", file=sys.stderr, flush=True)
