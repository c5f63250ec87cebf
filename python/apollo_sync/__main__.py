from apollo_sync.cli import main

raise SystemExit(main())
