"""dsv3: a from-scratch implementation of the DeepSeek-V3 system in PyTorch.

Importing dsv3 has no side effects: no environment variables, no global flags.
"""

from dsv3.config import ConfigError, ModelConfig, preset

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "ModelOutput", "Transformer", "build_model", "preset",
           "load_pretrained", "save_pretrained", "__version__"]


def __getattr__(name):
    # lazy: the model pulls in torch, checkpoint I/O safetensors, only when used (the server's
    # request-preparation processes import dsv3.tokenizer and dsv3.inference.protocol, not torch)
    if name in ("ModelOutput", "Transformer", "build_model"):
        import dsv3.model

        return getattr(dsv3.model, name)
    if name in ("load_pretrained", "save_pretrained"):
        from dsv3.checkpoints import hf as checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
