from offline.cli import main

raise SystemExit(main())
