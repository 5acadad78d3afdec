"""Command line: ``lightning-peft fit|validate|test|predict|estimate --config FILE`` and ``lightning-peft export``."""

from lightning_peft.cli.main import PeftCLI, RunConfigSaver, cli_main

__all__ = ["PeftCLI", "RunConfigSaver", "cli_main"]
