from trio_bridge.cli._cli import main

raise SystemExit(main())
