"""`python -m esft ...`: the same command as `esft`, for launchers such as `torchrun -m esft train ...`."""

import sys

from .cli import main

sys.exit(main())
