"""Training: the loop, the DeepSpeed engine and its step patches, checkpoints, preemption, metrics, rank discovery."""
