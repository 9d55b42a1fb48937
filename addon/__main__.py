from addon.tools.cli import main

raise SystemExit(main())
