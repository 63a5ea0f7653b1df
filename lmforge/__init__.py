"""lmforge: the modern decoder-only LLM stack (Llama 3, Qwen 2.5, GLM-4) in readable, exact PyTorch."""

from lmforge.checkpoint import load_pretrained, save_pretrained
from lmforge.config import ModelConfig, RopeScaling, list_presets
from lmforge.errors import LmforgeError
from lmforge.generate.api import generate, generate_stream
from lmforge.model import Transformer
from lmforge.quant.quantize import quantize
from lmforge.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "LmforgeError",
    "ModelConfig",
    "RopeScaling",
    "Tokenizer",
    "Transformer",
    "generate",
    "generate_stream",
    "list_presets",
    "quantize",
    "load_pretrained",
    "save_pretrained",
]
