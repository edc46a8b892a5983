from fflnode.cli import main

raise SystemExit(main())
