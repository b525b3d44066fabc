"""``python -m spleenkit`` runs the command line (torchrun uses this form)."""

import sys

from spleenkit.cli import main

sys.exit(main())
