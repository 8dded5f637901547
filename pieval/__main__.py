from pieval.cli import main

raise SystemExit(main())
