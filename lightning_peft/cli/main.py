"""The LightningCLI of lightning-peft."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

# Importing the packages registers their classes as subclasses of Callback / LightningModule / LightningDataModule /
# Precision, so YAML files can name them by short class name (`class_path: LISA`).
import lightning_peft.callbacks
import lightning_peft.data
import lightning_peft.modules
import lightning_peft.plugins  # noqa: F401
from lightning_peft.cli.config_callbacks import combine_config_callbacks
from lightning_peft.cli.errors import (
    TRACEBACK_HINT,
    UserError,
    check_config_file,
    debug_requested,
    explain_parse_error,
    our_message,
    suggest,
)

__all__ = ["COMMANDS", "PeftCLI", "RunConfigSaver", "cli_main"]

# First line of every config file the CLI writes: a file without it was not written by us and is never replaced.
_WRITTEN_BY_US = "# lightning-peft: the resolved config of this run, written by the CLI (any later edit is replaced)"


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config of a run as ``config.yaml`` in the run's own folder, never over a user's file.

    The folder is the logger's directory (e.g. ``lightning_logs/quickstart/version_0``); without a logger it is the
    checkpoint folder (``<default_root_dir>/checkpoints``), and without checkpoints nothing is saved. The file
    starts with a marker line; a ``config.yaml`` there without it (one the user wrote) is never replaced: the run
    stops before training with a hint instead. A file that carries the marker is the resolved config of an earlier
    run in the same folder and is replaced.

    Example::

        >>> from lightning_peft.cli import PeftCLI
        >>> PeftCLI(args=["fit", "--config", "configs/quickstart.yaml"])  # doctest: +SKIP
    """

    def run_folder(self, trainer: pl.Trainer, stage: str) -> str | None:
        """The folder of this run's outputs: the logger's directory, else the checkpoint folder of a fit, else None."""
        if trainer.loggers:
            return trainer.log_dir
        if stage == "fit" and trainer.checkpoint_callbacks:
            return os.path.join(trainer.default_root_dir, "checkpoints")
        return None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = trainer.strategy.broadcast(self.run_folder(trainer, stage))
        if folder is None:
            rank_zero_info("No logger: the resolved config of this run is not saved.")
            self.already_saved = True
            return
        self._path = os.path.join(folder, self.config_filename)
        foreign = _written_by_someone_else(self._path) if trainer.is_global_zero else False
        if trainer.strategy.broadcast(foreign):
            raise RuntimeError(
                f"`{self._path}` exists and was not written by lightning-peft; the CLI does not replace it with the"
                " resolved config of this run. HINT: choose another run folder (`--trainer.logger.init_args.version`,"
                " `--trainer.default_root_dir`), or move the file."
            )
        if trainer.loggers:  # without a logger the folder is the checkpoints': written at train start (below), so
            self._write(trainer, pl_module, stage)  # that ModelCheckpoint does not find it "not empty" at set-up

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.already_saved:
            self._write(trainer, pl_module, "fit")

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            text = self.parser.dump(self.config, skip_none=False)
            with open(self._path, "w", encoding="utf-8") as file:
                file.write(f"{_WRITTEN_BY_US}\n{text}")
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


# Lines Lightning prints on every run that ask nothing of the user: an advertisement, and a deprecation inside
# Lightning itself (its own use of torch's `LeafSpec`).
_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
_LIGHTNING_INTERNAL_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _WithoutAdvertisement(logging.Filter):
    """Drop Lightning's cloud-logging tip from its rank-zero log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LITLOGGER_TIP)


def _quiet_first_screen() -> None:
    """Leave out of a CLI run's output the lines that are neither ours nor a normal Lightning notice (once)."""
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(existing, _WithoutAdvertisement) for existing in rank_zero_log.filters):
        rank_zero_log.addFilter(_WithoutAdvertisement())
    warnings.filterwarnings("ignore", message=_LIGHTNING_INTERNAL_DEPRECATION)


def _written_by_someone_else(path: str) -> bool:
    """Whether ``path`` exists and does not start with the marker line of the files the CLI writes."""
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.readline().rstrip("\n") != _WRITTEN_BY_US


class PeftCLI(LightningCLI):
    """LightningCLI that knows this package's classes by short name and reports the final metrics of a run.

    After ``fit`` it prints the last validation metrics (``val/acc``, ``val/loss``, ...) so a run ends with its
    result on screen. The resolved config is saved by :class:`RunConfigSaver`: into the run's own folder only,
    never over a file the user wrote.

    Before parsing it checks every ``--config`` file (a YAML syntax error names the file, line and column; a bare
    ``no`` among names is explained), and a failed parse is reported as one message with a suggestion for a
    misspelled class, option or argument instead of jsonargparse's union report (see
    :mod:`lightning_peft.cli.errors`). The ``trainer.callbacks`` of several ``--config`` files are added to each
    other, never merged by position (:mod:`lightning_peft.cli.config_callbacks`); a ``--ckpt_path`` whose model
    arguments differ from the config's is refused, naming them. Lightning's cloud-logging tip is left out.

    Example::

        >>> from lightning_peft.cli import cli_main
        >>> cli_main(["fit", "--help"])  # doctest: +SKIP
    """

    #: Options of a command built on this CLI that its parser does not know (for "did you mean" suggestions).
    extra_option_names: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", RunConfigSaver)
        _quiet_first_screen()
        super().__init__(*args, **kwargs)

    @override
    def _add_subcommands(self, parser: Any, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `export` and `estimate` run before this parser is built (see `cli_main`); listed here for `--help`.
        from jsonargparse import ArgumentParser

        action = getattr(parser, "_subcommands_action", None)
        if action is None:
            return
        for name in ("export", "estimate"):
            if name not in action.choices:
                action.add_subcommand(name, ArgumentParser(description=COMMANDS[name]), help=COMMANDS[name])

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse as LightningCLI does, after checking the YAML files, and explain a failed parse in one message.

        Raises:
            UserError: If a config file has a YAML syntax error (naming file and line) or a bare boolean among names,
                or ``--ckpt_path`` was written with other model arguments (:meth:`check_checkpoint_matches_config`).
        """
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        for index, arg in enumerate(argv):
            if arg in ("--config", "-c") and index + 1 < len(argv):
                check_config_file(argv[index + 1])
            elif arg.startswith("--config="):
                check_config_file(arg.split("=", 1)[1])
        combined, notices = combine_config_callbacks(argv)
        for notice in notices:
            rank_zero_info(notice)
        from_command_line = args is None
        if combined != argv:
            args = combined
        report = io.StringIO()
        try:
            with contextlib.redirect_stderr(report), warnings.catch_warnings():
                if from_command_line:  # the command line's own arguments, with the configs' callbacks combined
                    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                super().parse_arguments(parser, args)
        except SystemExit as exit_:
            text = report.getvalue()
            names = [*_option_names(parser), *self.extra_option_names]
            explained = explain_parse_error(text, names) if exit_.code else None
            sys.stderr.write(f"error: {explained}\n" if explained else text)
            raise
        sys.stderr.write(report.getvalue())
        self.check_checkpoint_matches_config()

    def check_checkpoint_matches_config(self) -> None:
        """Refuse a ``--ckpt_path`` whose model arguments differ from the config's, naming them.

        LightningCLI replaces the config's model arguments by the checkpoint's hyper-parameters without a word, and
        the run then fails on missing keys or on a method's hint; this check runs first (after parsing).

        Raises:
            UserError: If the checkpoint's hyper-parameters differ from the config's model arguments.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        differences = _model_differences(ckpt_path, self.config[subcommand].get("model"))
        if differences:
            raise UserError(
                f"`--ckpt_path` {ckpt_path} was written with other model arguments than the config's:"
                f" {'; '.join(differences)}. Resuming would replace the config's values by the checkpoint's"
                " (and the weights may not fit the model the config describes). HINT: resume with the config of"
                " the run that wrote the checkpoint (its `config.yaml` is in that run's log folder, or next to"
                " its checkpoints without a logger), or leave out `--ckpt_path` to start a new run with this"
                " config."
            )

    def after_fit(self) -> None:
        """Print the final validation metrics of the run."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val")}
        if metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            if self.trainer.is_global_zero:
                print(f"Final validation metrics after {self.trainer.global_step} steps: {shown}", flush=True)


#: The commands of ``lightning-peft``: LightningCLI's four and this package's two, with their one-line help.
COMMANDS: dict[str, str] = {
    "fit": "Train (and validate) the model of a config.",
    "validate": "One evaluation epoch over the validation set.",
    "test": "One evaluation epoch over the test set.",
    "predict": "Run inference on the data.",
    "export": "Write a checkpoint's model as a transformers / timm folder (see `lightning-peft export --help`).",
    "estimate": "Training memory per method of a config, without weights or a step (`lightning-peft estimate --help`).",
}


def cli_main(args: ArgsType = None) -> None:
    """Run the command line (``lightning-peft``); ``args`` replaces ``sys.argv[1:]`` when given.

    ``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's (:class:`PeftCLI`); ``export`` writes a
    checkpoint's model as a transformers / timm folder (:func:`lightning_peft.cli.export.export_main`);
    ``estimate`` prints the memory estimate of a config, read as ``fit`` reads it
    (:func:`lightning_peft.cli.estimate.estimate_main`). A misspelled command gets a suggestion.
    Returns nothing, so the console script exits with status 0 (use :class:`PeftCLI` to keep the objects). Errors
    of the user's making (our messages with a ``HINT:``, YAML syntax errors, unknown names) are printed as one
    message and exit with status 1 or 2; ``--debug`` or ``LIGHTNING_PEFT_DEBUG=1`` shows the full traceback.

    Example::

        >>> cli_main(["fit", "--config", "configs/quickstart.yaml"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if args is None else args)
    command = argv[0] if argv else None
    if command is not None and not command.startswith("-") and command not in COMMANDS:
        suggestion = suggest(command, COMMANDS)
        sys.stderr.write(
            f"error: Unknown command `{command}`{'; ' + suggestion if suggestion else '.'} HINT: the commands are"
            f" {', '.join(COMMANDS)}; `lightning-peft --help` describes them.\n"
        )
        sys.exit(2)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    if command == "export":
        from lightning_peft.cli.export import export_main

        export_main(argv[1:])
        return
    if command == "estimate":  # memory estimate from a config: no Trainer run
        from lightning_peft.cli.estimate import estimate_main

        _run_reporting_errors(lambda: estimate_main(argv[1:]), debug)
        return
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both): only `--debug` is dropped
        sys.argv[1:] = argv
    _run_reporting_errors(lambda: PeftCLI(args=None if args is None else argv), debug)


def _run_reporting_errors(run: Callable[[], object], debug: bool) -> None:
    """Run a command; a mistake of the user's is printed as one message (exit 2 or 1), unless ``debug``."""
    if debug:
        run()
        return
    try:
        run()
    except UserError as err:
        sys.stderr.write(f"error: {err}\n")
        sys.exit(2)
    except Exception as err:  # only our own messages (with a HINT) are shortened; anything else re-raises
        message = our_message(err)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n{TRACEBACK_HINT}\n")
        sys.exit(1)


def _plain(value: Any) -> Any:
    """A config value as plain data (jsonargparse Namespaces as dicts, tuples as lists), for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _model_differences(ckpt_path: str, model: Any) -> list[str]:
    """``"name (checkpoint: A; config: B)"`` for each model argument in which the checkpoint and config differ."""
    import torch

    try:
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)  # tensors not read
    except RuntimeError:  # not torch.save's zip format: read whole
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    configured = _plain(model) if model is not None else None
    if not hparams or not isinstance(configured, dict):
        return []
    differences = []
    if class_path and configured.get("class_path") and class_path != configured["class_path"]:
        differences.append(f"the class (checkpoint: {class_path}; config: {configured['class_path']})")
    arguments = configured.get("init_args") or {}
    for name, value in hparams.items():
        if name in arguments and _plain(value) != arguments[name]:
            differences.append(f"`{name}` (checkpoint: {_plain(value)!r}; config: {arguments[name]!r})")
    return differences


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
