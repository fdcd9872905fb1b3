"""The operator's commands behind ``worker`` subcommands (the CLI stays thin)."""
