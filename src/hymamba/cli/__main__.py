"""``python -m hymamba.cli`` (e.g. under ``torchrun -m hymamba.cli train ...``)."""
import sys

from hymamba.cli.main import main

sys.exit(main())
