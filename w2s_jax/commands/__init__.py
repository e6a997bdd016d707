"""One module per `w2s` subcommand: `add_arguments(parser)` and `run(args)`."""
