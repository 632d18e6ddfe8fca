"""Stage 6, `python -m pirl_fast.report`: the runs' evaluation JSON -> one table and plots."""
