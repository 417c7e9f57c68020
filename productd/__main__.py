"""`python -m productd` is the `productd` command."""

from productd.cli import main

raise SystemExit(main())
