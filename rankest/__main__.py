"""`python -m rankest <command>`: see rankest/cli.py."""

from rankest.cli import main

raise SystemExit(main())
