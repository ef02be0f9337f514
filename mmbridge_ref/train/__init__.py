"""The training engine: typed configs, the loop, checkpoints, the task registry."""
