"""An ATD3 SmolLM2 GGUF shared by test_python_api.py and test_serve.py (converted once per session)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from converter.cli import main


def shared_smollm2_atd3(tmp_path_factory, smollm2_dir: Path) -> Path:
    out = tmp_path_factory.getbasetemp() / "shared-models" / "smollm2-atd3.gguf"
    if not out.is_file():
        out.parent.mkdir(exist_ok=True)
        result = CliRunner().invoke(main, ["convert", str(smollm2_dir), "-o", str(out), "--planes", "3",
                                           "--no-progress"])
        assert result.exit_code == 0, result.output
    return out
