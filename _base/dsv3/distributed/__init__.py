"""Parallelism applied from outside the model (STYLE rule 3): the layout (mesh.py), expert
parallelism through the MoE dispatcher seam (expert_parallel.py), FSDP2 and the synchronised
training step (parallelize.py). Importing dsv3 does not import this package."""

from dsv3.distributed.expert_parallel import AllToAllDispatcher, global_expert_counts, shard_experts
from dsv3.distributed.mesh import DistEnv, ParallelConfig, ParallelConfigError, build_mesh, init_distributed
from dsv3.distributed.parallelize import (ParallelState, clip_grad_norm_, finish_grad_sync, make_optimizer,
                                          parallelize, train_step)

__all__ = ["AllToAllDispatcher", "DistEnv", "ParallelConfig", "ParallelConfigError", "ParallelState",
           "build_mesh", "clip_grad_norm_", "finish_grad_sync", "global_expert_counts", "init_distributed",
           "make_optimizer", "parallelize", "shard_experts", "train_step"]
