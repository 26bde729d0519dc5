"""``python -m memsvc`` runs the command line."""

import sys

from memsvc.cli import main

sys.exit(main())
