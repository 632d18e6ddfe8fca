from pirl_fast.train.cli_errors import run_cli
from pirl_fast.train.loop import main

raise SystemExit(run_cli(main))
