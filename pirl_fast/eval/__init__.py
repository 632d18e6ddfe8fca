"""Stage 5, `python -m pirl_fast.eval`: features of a trained trunk, kNN, linear probes, SVMs, fine-tuning."""
