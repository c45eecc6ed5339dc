"""One module per `smollm2` subcommand: add_arguments(parser) and run(args) -> int."""
