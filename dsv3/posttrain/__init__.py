"""Post-training: supervised fine-tuning on chats (sft.py) and GRPO (grpo.py) with pluggable reward
functions (rewards.py) and offline seeded tasks (tasks.py), both tasks of the one training loop
(dsv3/training/loop.py; start.py: the starting checkpoint and the run directory). Entry points:
`train_sft(checkpoint_dir, data_path, out_dir, SFTConfig(...), pcfg=None)` and
`train_grpo(checkpoint_dir, task, out_dir, GRPOConfig(...), pcfg=None)`: one process, or every rank of a
torchrun world with layout `pcfg` (dsv3.distributed.ParallelConfig).
Nothing is imported here eagerly, so `import dsv3.posttrain.rewards` stays light."""
