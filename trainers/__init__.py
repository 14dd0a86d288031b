"""Training entry points (pretrain, sft, reward, rlhf) over the one loop in trainers/loop.py."""
