"""The ``hymamba`` command: ``main(argv)`` and the error policy (:mod:`hymamba.cli.main`), one module
per subcommand (:mod:`hymamba.cli.commands`). Importing this package loads no torch."""
from hymamba.cli.main import main

__all__ = ["main"]
