"""Training stack: state, optimizer, pure train/eval steps, checkpoints, the loop."""
