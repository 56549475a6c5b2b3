"""dsv3: a from-scratch implementation of the DeepSeek-V3 system in PyTorch.

Importing dsv3 has no side effects: no environment variables, no global flags.
"""

from dsv3.config import ConfigError, ModelConfig, preset
from dsv3.model import ModelOutput, Transformer, build_model

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "Transformer", "build_model", "preset",
           "load_pretrained", "save_pretrained", "__version__"]


def __getattr__(name):  # lazy: checkpoint I/O pulls in safetensors only when used
    if name in ("load_pretrained", "save_pretrained"):
        from dsv3 import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
