from pydpm.cli import main

raise SystemExit(main())
