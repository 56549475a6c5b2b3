"""The DeepSeek-V3 model: single-device math, no torch.distributed."""

from dsv3.model.moe import MoE, Router, max_violation, sequence_balance, update_expert_bias
from dsv3.model.transformer import Block, ModelOutput, MTPModule, Transformer, build_model

__all__ = ["Block", "MoE", "MTPModule", "ModelOutput", "Router", "Transformer", "build_model",
           "max_violation", "sequence_balance", "update_expert_bias"]
