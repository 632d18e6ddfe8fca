"""pirl_fast: throughput-first PIRL pre-training.

Entry points (each has --help):
    python -m pirl_fast.sample_data DIR      # a small labelled ImageFolder, made on the fly
    python -m pirl_fast.shard SRC DST        # ImageFolder -> WebDataset shards (+ DALI index files)
    torchrun -m pirl_fast.train ...          # PIRL pre-training (Hydra config)
    python -m pirl_fast.bench all            # throughput, side by side with baselines
    python -m pirl_fast.eval knn RUN --val-shards VAL   # export | knn | linear | invariance
    python -m pirl_fast.report RUN_DIRS...   # sweep results -> markdown table + plot
"""

__version__ = "0.1.0"
