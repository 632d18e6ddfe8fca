"""Stage 2: shards -> augmented batches (the batch contract, the DALI / torch / synthetic loaders)."""
