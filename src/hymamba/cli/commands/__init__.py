"""One module per ``hymamba`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args) -> int``.
Module level imports nothing heavy; each ``run`` parses, calls one library function and prints."""
