"""The `lmforge` subcommands, one module per area; each registers itself with `lmforge.cli.command`."""
