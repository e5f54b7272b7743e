"""``python -m cnnkit`` (and ``torchrun -m cnnkit``) runs the command-line tool."""

from cnnkit.cli import main

raise SystemExit(main())
