"""awqconv: quantize a Hugging Face causal LM with AWQ once, export verified 4-bit artifacts."""

__version__ = "0.1.0"

from .api import convert, evaluate, export, load, plan  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .errors import AwqconvError  # noqa: E402

__all__ = ["convert", "export", "load", "plan", "evaluate", "QuantConfig", "AwqconvError", "__version__"]
