"""``lightning-peft export``: a checkpoint's model as a transformers / timm folder (safetensors)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["export_main"]


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def export_main(args: Sequence[str] | None = None) -> None:
    """Parse ``lightning-peft export`` arguments and export (see :func:`lightning_peft.export.export_checkpoint`).

    Example::

        >>> export_main(["--ckpt_path", "last.ckpt", "--output", "my_model"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(
        prog="lightning-peft export",
        description="Write the model of a Lightning checkpoint in its ecosystem's format: a transformers folder"
        " (save_pretrained) or a timm folder (timm.create_model('local-dir:DIR', pretrained=True)), in safetensors,"
        " LoRA merged."
        " A model whose sizes the format cannot state (e.g. pruned heads of a BERT) is refused, naming the loader"
        " that works.",
    )
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint, e.g. .../checkpoints/last.ckpt")
    parser.add_argument("--output", required=True, help="the folder to create (must not exist or be empty)")
    parser.add_argument("--merge_lora", type=_boolean, default=True, help="merge LoRA into the weights (true)")
    parser.add_argument("--module_class", default=None, help="import path of the LightningModule (default: recorded)")
    parser.add_argument("--verify", type=_boolean, default=True, help="load the folder back and compare (true)")
    parsed = parser.parse_args(args)
    from lightning_peft.export import export_checkpoint

    try:
        folder = export_checkpoint(
            parsed.ckpt_path,
            parsed.output,
            merge_lora=parsed.merge_lora,
            module_class=parsed.module_class,
            verify=parsed.verify,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:  # ExportError is a ValueError
        raise SystemExit(f"lightning-peft export: error: {err}") from err
    print(f"Exported {parsed.ckpt_path} to {folder}", flush=True)
