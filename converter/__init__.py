"""atd-gguf: convert Llama-family checkpoints to GGUF, with ternary-plane (ATD) tensor types."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("atd-gguf")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

from .errors import AtdError

__all__ = ["AtdError", "__version__"]
