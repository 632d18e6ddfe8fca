"""Stage 1, `python -m pirl_fast.shard`: images -> WebDataset shards, and the one reader of their format."""
