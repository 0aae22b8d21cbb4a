"""Training: the loop, its data, its processes and its checkpoints."""
