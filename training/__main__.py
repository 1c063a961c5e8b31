"""``python -m training CONFIG`` (train), ``python -m training evaluate MODEL DATA ...``."""

import sys

from training.cli import main

sys.exit(main())
