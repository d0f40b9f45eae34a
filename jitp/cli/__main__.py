"""``python -m jitp.cli``."""

from jitp.cli import main

raise SystemExit(main())
