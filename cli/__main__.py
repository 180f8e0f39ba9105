"""`python -m cli`: the `taskcast` command."""

from cli.main import main

raise SystemExit(main())
