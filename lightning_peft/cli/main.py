"""The LightningCLI of lightning-peft."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI

# Importing the packages registers their classes as subclasses of Callback / LightningModule / LightningDataModule /
# Precision, so YAML files can name them by short class name (`class_path: LISA`).
import lightning_peft.callbacks
import lightning_peft.data
import lightning_peft.modules
import lightning_peft.plugins  # noqa: F401
from lightning_peft.cli.errors import (
    TRACEBACK_HINT,
    UserError,
    check_config_file,
    debug_requested,
    explain_parse_error,
    our_message,
)

__all__ = ["PeftCLI", "cli_main"]


class PeftCLI(LightningCLI):
    """LightningCLI that knows this package's classes by short name and reports the final metrics of a run.

    After ``fit`` it prints the last validation metrics (``val/acc``, ``val/loss``, ...) so a run ends with its
    result on screen.

    Before parsing it checks every ``--config`` file (a YAML syntax error names the file, line and column; a bare
    ``no`` among names is explained), and a failed parse is reported as one message with a suggestion for a
    misspelled class, option or argument instead of jsonargparse's union report (see
    :mod:`lightning_peft.cli.errors`).

    Example::

        >>> from lightning_peft.cli import cli_main
        >>> cli_main(["fit", "--help"])  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse as LightningCLI does, after checking the YAML files, and explain a failed parse in one message.

        Raises:
            UserError: If a config file has a YAML syntax error (naming file and line) or a bare boolean among names.
        """
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        for index, arg in enumerate(argv):
            if arg in ("--config", "-c") and index + 1 < len(argv):
                check_config_file(argv[index + 1])
            elif arg.startswith("--config="):
                check_config_file(arg.split("=", 1)[1])
        report = io.StringIO()
        try:
            with contextlib.redirect_stderr(report):
                super().parse_arguments(parser, args)
        except SystemExit as exit_:
            text = report.getvalue()
            explained = explain_parse_error(text, _option_names(parser)) if exit_.code else None
            sys.stderr.write(f"error: {explained}\n" if explained else text)
            raise
        sys.stderr.write(report.getvalue())

    def after_fit(self) -> None:
        """Print the final validation metrics of the run."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val")}
        if metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            if self.trainer.is_global_zero:
                print(f"Final validation metrics after {self.trainer.global_step} steps: {shown}", flush=True)


def cli_main(args: ArgsType = None) -> None:
    """Run the command line (``lightning-peft``); ``args`` replaces ``sys.argv[1:]`` when given.

    Returns nothing, so the console script exits with status 0 (use :class:`PeftCLI` to keep the objects). Errors
    of the user's making (our messages with a ``HINT:``, YAML syntax errors, unknown names) are printed as one
    message and exit with status 1 or 2; ``--debug`` or ``LIGHTNING_PEFT_DEBUG=1`` shows the full traceback.

    Example::

        >>> cli_main(["fit", "--config", "configs/quickstart.yaml"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if args is None else args)
    if debug_requested(argv):
        PeftCLI(args=[arg for arg in argv if arg != "--debug"])
        return
    try:
        PeftCLI(args=None if args is None else argv)
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except Exception as err:  # only our own messages (with a HINT) are shortened; anything else re-raises
        message = our_message(err)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n{TRACEBACK_HINT}\n")
        sys.exit(1)


def _option_names(parser: Any) -> list[str]:
    """The dotted option names of every subcommand (``trainer.max_steps``, ...), for "did you mean" suggestions."""
    # argparse / jsonargparse internals, read defensively: without them there is just no suggestion.
    names: set[str] = set()
    action = getattr(parser, "_subcommands_action", None)
    parsers = list(getattr(action, "_name_parser_map", {}).values()) if action is not None else []
    for sub in [parser, *parsers]:
        for option in getattr(sub, "_option_string_actions", {}):
            if option.startswith("--"):
                names.add(option[2:])
    return sorted(names)
