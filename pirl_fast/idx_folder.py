"""`python -m pirl_fast.idx_folder`: the command; the code is pirl_fast/shard/idx_folder.py."""

from pirl_fast.shard.idx_folder import main

if __name__ == "__main__":
    raise SystemExit(main())
