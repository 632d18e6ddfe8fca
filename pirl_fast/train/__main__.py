from pirl_fast.train.loop import main

raise SystemExit(main())
