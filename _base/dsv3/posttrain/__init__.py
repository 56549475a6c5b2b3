"""Post-training: supervised fine-tuning on chats (sft.py) and GRPO (grpo.py) with pluggable reward
functions (rewards.py) and offline seeded tasks (tasks.py). Entry points: `train_sft(checkpoint_dir,
data_path, out_dir, SFTConfig(...))` and `train_grpo(checkpoint_dir, task, out_dir, GRPOConfig(...))`.
Nothing is imported here eagerly, so `import dsv3.posttrain.rewards` stays light."""
