"""Training, evaluation and search loops; checkpoints; TensorBoard logging."""
