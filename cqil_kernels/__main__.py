"""``python -m cqil_kernels COMMAND``: see ``cqil_kernels.cli``."""

import sys

from .cli import main

sys.exit(main())
