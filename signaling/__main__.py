"""`python -m signaling` is the `rallypoint` command."""

from signaling.cli import main

raise SystemExit(main())
