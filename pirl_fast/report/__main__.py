from pirl_fast.report.cli import main

raise SystemExit(main())
