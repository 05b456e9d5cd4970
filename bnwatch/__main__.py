"""``python -m bnwatch`` runs the command line."""

from bnwatch.cli import main

raise SystemExit(main())
