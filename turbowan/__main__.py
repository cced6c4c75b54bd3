"""``python -m turbowan``: the same command line as the installed ``turbowan`` entry point."""

import sys

from .cli import main

sys.exit(main())
