"""The LightningCLI of lightning-peft."""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningCLI

# Importing the packages registers their classes as subclasses of Callback / LightningModule / LightningDataModule /
# Precision, so YAML files can name them by short class name (`class_path: LISA`).
import lightning_peft.callbacks
import lightning_peft.data
import lightning_peft.modules
import lightning_peft.plugins  # noqa: F401

__all__ = ["PeftCLI", "cli_main"]


class PeftCLI(LightningCLI):
    """LightningCLI that knows this package's classes by short name and reports the final metrics of a run.

    After ``fit`` it prints the last validation metrics (``val/acc``, ``val/loss``, ...) so a run ends with its
    result on screen.

    Example::

        >>> from lightning_peft.cli import cli_main
        >>> cli_main(["fit", "--help"])  # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def after_fit(self) -> None:
        """Print the final validation metrics of the run."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val")}
        if metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            if self.trainer.is_global_zero:
                print(f"Final validation metrics after {self.trainer.global_step} steps: {shown}", flush=True)


def cli_main(args: ArgsType = None) -> None:
    """Run the command line (``lightning-peft``); ``args`` replaces ``sys.argv[1:]`` when given.

    Returns nothing, so the console script exits with status 0 (use :class:`PeftCLI` to keep the objects).
    ``estimate --config FILE [--memory 24GiB]`` prints the memory estimate of :mod:`lightning_peft.estimate`.

    Example::

        >>> cli_main(["fit", "--config", "configs/quickstart.yaml"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] == "estimate":  # memory estimate from a config: no Trainer run
        from lightning_peft.estimate import main as estimate_main

        estimate_main(argv[1:])
        return
    PeftCLI(args=args)
