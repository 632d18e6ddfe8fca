"""Stage 4, `python -m pirl_fast.train`: config, the loop, checkpoints, schedule, metrics."""
