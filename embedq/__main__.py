from embedq.cli import main

raise SystemExit(main())
