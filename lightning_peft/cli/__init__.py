"""Command line: ``lightning-peft fit|validate|test|predict --config FILE``."""

from lightning_peft.cli.main import PeftCLI, cli_main

__all__ = ["PeftCLI", "cli_main"]
