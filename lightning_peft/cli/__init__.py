"""Command line: ``lightning-peft fit|validate|test|predict --config FILE``."""

from lightning_peft.cli.main import PeftCLI, RunConfigSaver, cli_main

__all__ = ["PeftCLI", "RunConfigSaver", "cli_main"]
