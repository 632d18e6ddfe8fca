from pirl_fast.eval.cli import main

raise SystemExit(main())
