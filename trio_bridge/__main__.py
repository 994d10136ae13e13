from trio_bridge._cli import main

raise SystemExit(main())
