"""Which tensors become ATD, and how: the ATD side of `atd-gguf convert --planes N`.

Linear weights of attention and FFN (attn_q/k/v/output, ffn_gate/up/down) become ATD with N
planes; token_embd and output follow the embedding policy (`embed_type`, Q8_0 by default, as
llama.cpp keeps them at higher precision); norms and rope_freqs stay F32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

import gguf_types

from . import __version__
from .convert import STOCK_OUTTYPES, ConvertOptions, fits_blocks, keeps_f32, stock_encode
from .errors import AtdError
from .imatrix import load_imatrix

LINEAR_WEIGHT = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
EMBEDDINGS = ("token_embd.weight", "output.weight")
EMBED_TYPES = tuple(STOCK_OUTTYPES)
# general.file_type of an ATD file: 1000 + N - 1, mirroring the type ids (docs/atd-format.md)
ATD_FILE_TYPE_BASE = gguf_types.ATD_TYPE_ID_BASE


@dataclass
class AtdOptions:
    planes: int
    method: str = "grid"
    embed_type: str = "q8_0"
    imatrix: Path | None = None
    _importance: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.planes <= 4:
            raise AtdError(f"--planes must be 1..4, got {self.planes}")
        if self.method not in gguf_types.METHODS:
            raise AtdError(f"--method must be one of {', '.join(gguf_types.METHODS)}, got {self.method!r}")
        if self.embed_type not in EMBED_TYPES:
            raise AtdError(f"--embed-type must be one of {', '.join(EMBED_TYPES)}, got {self.embed_type!r}")
        if self.imatrix is not None:
            self._importance = load_imatrix(self.imatrix)

    def choose(self, name: str, shape: tuple[int, ...]) -> QT:
        if keeps_f32(name, shape):
            return QT.F32
        if LINEAR_WEIGHT.match(name):
            atype = gguf_types.atd_type_for(self.planes, shape[-1])
            if atype is not None:
                return gguf_types.gguf_qtype(atype)
            return QT.Q8_0 if fits_blocks(QT.Q8_0, shape) else QT.F16
        qtype = STOCK_OUTTYPES[self.embed_type][0]
        return qtype if fits_blocks(qtype, shape) else QT.F16

    def importance_for(self, name: str, cols: int) -> np.ndarray | None:
        if self.imatrix is None:
            return None
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

    def encode(self, qtype: QT, data: np.ndarray, name: str) -> np.ndarray:
        if not gguf_types.is_atd_type_id(qtype):
            return stock_encode(qtype, data, name)
        atype = gguf_types.atd_type(int(qtype))
        return gguf_types.quantize(data, atype, self.method, self.importance_for(name, data.shape[-1]))

    def metadata(self) -> dict[str, object]:
        kv: dict[str, object] = {
            "atd.format_version": gguf_types.ATD_FORMAT_VERSION,
            "atd.planes": self.planes,
            "atd.method": self.method,
            "atd.embed_type": self.embed_type,
            "atd.tool": f"atd-gguf {__version__}",
        }
        if self.imatrix is not None:
            kv["atd.imatrix"] = Path(self.imatrix).name
        return kv

    def convert_options(self, *, force: bool = False, progress: bool = True) -> ConvertOptions:
        return ConvertOptions(
            choose_type=self.choose, encode=self.encode, file_type=ATD_FILE_TYPE_BASE + self.planes - 1,
            extra_kv=self.metadata(), force=force, progress=progress, check_plan=self._check_plan)

    def _check_plan(self, names_and_types: list[tuple[str, QT]]) -> None:
        self.check_coverage([n for n, t in names_and_types if LINEAR_WEIGHT.match(n)])
