"""`python -m pirl_fast.sample_data`: the command; the code is pirl_fast/shard/sample_data.py."""

from pirl_fast.shard.sample_data import main

if __name__ == "__main__":
    raise SystemExit(main())
