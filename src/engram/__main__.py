"""``python -m engram ...``: the same as the ``engram`` command (e.g. under ``torchrun -m engram``)."""

import sys

from engram.cli.main import main

sys.exit(main())
