"""`python -m rankest <command>`: see rankest/cli.py."""

from .cli import main

raise SystemExit(main())
