from pirl_fast.shard.cli import main

raise SystemExit(main())
