"""``lightning-peft estimate``: the memory estimate of a config, read as ``fit`` reads it.

The command takes everything ``fit`` takes (``--config`` files, ``--model.init_args.…`` overrides, ``--debug``)
plus its own options (``--memory``, ``--batch_size``, ``--device``, ``--methods``), and reports mistakes as ``fit``
does: one message with a ``HINT:``. The estimate itself is :func:`lightning_peft.estimate.estimate_memory`.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lightning_peft._compat import hf_auto_models_from_config
from lightning_peft.cli.errors import UserError
from lightning_peft.cli.main import PeftCLI
from lightning_peft.estimate import (
    VARIANTS,
    MemoryReport,
    estimate_memory,
    estimated_methods,
    format_bytes,
    parse_bytes,
    variant_parts,
    with_batch_size,
)
from lightning_peft.methods import Method, method_of, methods

__all__ = ["ESTIMATE_OPTIONS", "estimate_from_config", "estimate_main", "parse_memory"]

#: The options of ``estimate`` besides those of ``fit`` (for "did you mean" suggestions).
ESTIMATE_OPTIONS = ("memory", "batch_size", "device", "methods")

_UNITS_HINT = "units are B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of 1024)"


def parse_memory(text: str) -> int:
    """Bytes of a ``--memory`` budget: a number with a unit (``24GiB``, ``80GB``); a bare number is refused.

    Raises:
        UserError: For a bare number (it would be read as bytes) or anything that is not a size.

    Example::

        >>> parse_memory("24GiB")
        25769803776
        >>> parse_memory("24")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_peft.cli.errors.UserError: `--memory` needs a unit, got '24'...HINT: write --memory 24GiB...
    """
    if re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*", text):
        raise UserError(
            f"`--memory` needs a unit, got {text!r}: a bare number would be {text.strip()} bytes."
            f" HINT: write --memory {text.strip()}GiB (or GB); {_UNITS_HINT}."
        )
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise UserError(
            f"`--memory` must be a size such as '24GiB', '80GB' or '512MiB', got {text!r}. HINT: {_UNITS_HINT}."
        ) from err


class _ModelOnMetaCLI(PeftCLI):
    """Builds the model on the meta device (config only), the DataModule and Trainer as a run would."""

    extra_option_names = ESTIMATE_OPTIONS

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as ``fit`` does; the arguments come from ``estimate``'s command line, not a second one."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        from jsonargparse import ArgumentParser
        from lightning.pytorch import LightningDataModule

        data = self.config.get("data")
        self.config["data"] = None
        try:
            with torch.device("meta"), hf_auto_models_from_config():
                super().instantiate_classes()
        finally:
            self.config["data"] = data
        if data is not None:  # real: it reads files and may make tensors (means, label maps) in __init__
            parser = ArgumentParser(exit_on_error=False)
            parser.add_argument("--data", type=LightningDataModule)
            self.datamodule = parser.instantiate_classes(parser.parse_object({"data": data})).data


def _config_args(config: str | os.PathLike | Sequence[str]) -> list[str]:
    return ["--config", os.fspath(config)] if isinstance(config, (str, os.PathLike)) else list(config)


def estimate_from_config(
    config: str | os.PathLike | Sequence[str],
    batch_size: int | None = None,
    device: str = "cpu",
    methods: Iterable[str | Method] | None = None,
    *,
    variants: Iterable[str] | None = None,
) -> MemoryReport:
    """:func:`~lightning_peft.estimate.estimate_memory` for the model, data and trainer of a config.

    The model is built on the ``meta`` device (Hugging Face checkpoints: their config only), the DataModule
    gives one real batch for the shapes, and the config's callbacks set the methods' arguments: a callback of a
    registered method (``LISA``, ``HalfFineTuning``, a user's) configures that method's row with its own arguments
    (:meth:`Method.from_callback <lightning_peft.methods.Method.from_callback>`), ``ActivationQuantization`` the
    8-bit activations' ``group_size`` and ``min_numel``; bitsandbytes ``AdamW8bit`` as the config's optimizer makes
    every row use it, and so does ``OptimizerInBackward`` among the callbacks. The optimizer step in backward is
    offered only where :class:`~lightning_peft.callbacks.OptimizerInBackward` accepts the config's Trainer and module
    (its own ``setup`` check: one device, no clipping by norm, no gradient scaler, no ``EarlyPruning``, automatic
    optimization); otherwise a note says why. The Trainer's ``accumulate_grad_batches`` is passed on. A model that
    already freezes part of itself (e.g. ``peft:``) gets an ``As configured`` row.

    Args:
        config: path of the YAML file, or the arguments ``fit`` would take (``["--config", "a.yaml",
            "--model.init_args.lr", "1e-4"]``): several files and overrides merge as for ``fit``.
        batch_size: the batch size to report (default: the DataModule's).
        device: ``"cpu"`` or ``"cuda"``: what the fake tensors claim (autocast and attention kernels follow).
        methods: registered methods the estimator makes rows for (default: all,
            :func:`~lightning_peft.estimate.estimated_methods`), by name or as configured
            :class:`~lightning_peft.methods.Method` objects.
        variants: among :data:`~lightning_peft.estimate.VARIANTS` (default: every one the config can run, as above).

    Returns:
        The :class:`~lightning_peft.estimate.MemoryReport`.

    Raises:
        ValueError: If the config names no DataModule (there is no batch to size the activations).

    Example::

        >>> report = estimate_from_config("configs/llama_text_lisa.yaml")  # doctest: +SKIP
        >>> print(report.to_text(parse_memory("24GiB")))  # doctest: +SKIP
    """
    args = _config_args(config)
    cli = _ModelOnMetaCLI(args=args, run=False, save_config_callback=None)
    template = cli.model
    trainer, datamodule = cli.trainer, cli.datamodule
    configs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("--config", "-c")]
    configs += [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]
    named = ", ".join(configs) or "the command line"
    if datamodule is None:
        raise ValueError(
            f"the config ({named}) names no `data:` DataModule, so there is no batch to size the activations."
            " HINT: add a `data:` section, or call `estimate_memory` with an example batch."
        )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    kwargs: dict[str, Any] = {}
    configured_methods: dict[str, Method] = {}
    in_backward_configured = False
    for callback in trainer.callbacks:
        method = method_of(callback)
        if method is not None and method.estimate == "trainable":
            configured_methods[method.name] = method.from_callback(callback)
        elif method is not None and method.estimate == "activations":
            kwargs["activations"] = method.from_callback(callback)
        elif method is not None and method.estimate == "in_backward":
            in_backward_configured = True
    asked = estimated_methods() if methods is None else methods
    chosen = [m if isinstance(m, Method) else configured_methods.get(m, m) for m in asked]
    refusal = _in_backward_refusal(trainer, template)
    notes: list[str] = []
    if variants is None:
        candidates = list(VARIANTS)
        optimizer = getattr(template, "optimizer", None)
        if "8bit" in repr(optimizer).lower():
            candidates = [v for v in candidates if "adamw8bit" in variant_parts(v)]
        if in_backward_configured and refusal is None:
            candidates = [v for v in candidates if "in_backward" in variant_parts(v)]
        if refusal is not None:
            candidates = [v for v in candidates if "in_backward" not in variant_parts(v)]
            notes.append(f"optimizer step in backward not offered: {refusal}")
        if str(trainer.precision) == "16-mixed" and torch.device(device).type == "cuda":
            candidates = [v for v in candidates if "in_backward" not in variant_parts(v)]
        variants = candidates
    configured = any(not p.requires_grad for p in template.parameters())
    report = estimate_memory(
        lambda: copy.deepcopy(template),
        batch,
        precision=str(trainer.precision),
        methods=chosen,
        variants=variants,
        configured=configured,
        device=device,
        accumulate_grad_batches=int(trainer.accumulate_grad_batches),
        **kwargs,
    )
    report.notes += notes
    report.notes.append(f"config {named}: {type(datamodule).__name__} batch, precision {trainer.precision}")
    return report if batch_size is None else with_batch_size(report, batch_size)


def _in_backward_refusal(trainer: Any, module: Any) -> str | None:
    """Why the registry's optimizer step in backward cannot run with this Trainer and module (None: it can).

    The callback's own ``setup`` check answers (strategy, clipping, gradient scaler, ``EarlyPruning``, manual
    optimization), so the estimate offers exactly what ``fit`` would accept.
    """
    for method in methods():
        if method.estimate != "in_backward" or method.callback is None:
            continue
        try:
            method.build_callback().setup(trainer, module, "fit")
        except ValueError as error:
            return str(error).split(" HINT:")[0]
    return None


class _EstimateParser(argparse.ArgumentParser):
    """argparse for the estimate's own options; a mistake is one message with a hint, as for ``fit``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(
            f"lightning-peft estimate: {message}. HINT: `lightning-peft estimate --help` lists the options."
        )


def _parser() -> argparse.ArgumentParser:
    parser = _EstimateParser(
        prog="lightning-peft estimate",
        allow_abbrev=False,  # `--model.init_args.config` and `--mem` are `fit`'s business, not abbreviations
        description="Estimate training memory per method (full FT, LoRA, LISA, Half FT; with 8-bit activations,"
        " AdamW8bit, checkpointing) from a config, without loading weights or running a step.",
        epilog="Every option of `lightning-peft fit` is accepted as well and read the same way: one or more"
        " `--config FILE`, overrides such as `--model.init_args.optimizer.init_args.lr 1e-4` or"
        " `--data.init_args.batch_size 8`, `--debug` (see `lightning-peft fit --help`).",
    )
    parser.add_argument("--memory", default=None, help="budget with a unit, e.g. 24GiB or 80GB: which rows fit")
    parser.add_argument(
        "--batch_size", "--batch-size", type=int, default=None, help="batch size to report (default: the config's)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device the estimate is for")
    names = list(estimated_methods())  # read live: methods registered after the import too
    parser.add_argument("--methods", nargs="+", choices=names, default=names, help="rows to estimate")
    return parser


def estimate_main(args: Sequence[str] | None = None) -> None:
    """``lightning-peft estimate --config FILE [fit's overrides] [--memory 24GiB] [--batch_size N] [--device cuda]``.

    Raises:
        UserError: For a mistake in the estimate's own options (``--memory 24``: a size needs a unit).

    Example::

        >>> estimate_main(["--config", "configs/quickstart.yaml", "--memory", "24GiB"])  # doctest: +SKIP
    """
    argv = list(args or [])
    parser = _parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        return
    options, rest = parser.parse_known_args(argv)
    budget = parse_memory(options.memory) if options.memory is not None else None
    started = time.perf_counter()
    report = estimate_from_config(rest, options.batch_size, options.device, options.methods)
    print(report.to_text(budget))
    if budget is not None:
        fitting = [row.label for row in report.rows if row.total <= budget]
        print(f"\nFits in {format_bytes(budget)}: {', '.join(fitting) if fitting else 'none of the rows'}.")
    print(f"(estimated in {time.perf_counter() - started:.1f} s)")
