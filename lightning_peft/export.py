"""Export a fine-tuned model in its own ecosystem's format: a transformers folder or a timm folder, in safetensors.

:func:`export_model` takes a LightningModule (or the network itself), :func:`export_checkpoint` a Lightning checkpoint
(the command ``lightning-peft export --ckpt_path ... --output DIR``). LoRA is merged into the weights by default, so
the folder loads with plain ``transformers`` (``AutoModel...from_pretrained``) or ``timm``
(``timm.create_model("local-dir:DIR", pretrained=True)``), without peft or this package. Before anything is written the
exporter checks that the format's config can state every size of the model (after pruning, heads and MLP widths may
differ from the original config); after writing, it loads the folder back the plain way and compares every tensor. A
model the format cannot describe is refused with the reason and the loader that does work
(``<Module>.load_from_checkpoint``), and nothing is left behind: never a folder whose config silently disagrees with
its weights.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["ExportError", "export_checkpoint", "export_model"]


class ExportError(ValueError):
    """The model cannot be written in its ecosystem's format without misdescribing it (the message says why).

    Example::

        >>> try:
        ...     export_model(pruned_bert_module, "out")  # doctest: +SKIP
        ... except ExportError as err:
        ...     print(err)  # names the sizes the config cannot state and the loader that works
    """


def export_model(
    source: nn.Module,
    output: str | os.PathLike,
    merge_lora: bool = True,
    model_args: Mapping[str, Any] | None = None,
    verify: bool = True,
    loader_hint: str | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """Write ``source``'s network to the new folder ``output`` as transformers or timm would save it (safetensors).

    Args:
        source: a LightningModule holding its network as ``.model`` (the ready modules do), or the network: a
            transformers ``PreTrainedModel``, a timm model, or an HF peft model of either.
        output: the folder to create; it must not exist yet or be empty.
        merge_lora: merge LoRA into the base weights (the folder then needs neither peft nor this package). False
            writes peft's adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) for the unchanged
            base model instead; refused for a pruned model, whose adapter no longer fits the base.
        model_args: timm only: the ``timm.create_model`` keyword arguments the network was built with (default: the
            module's ``model_kwargs`` hyper-parameter, as :class:`~lightning_peft.modules.ImageClassifier` keeps).
        verify: load the written folder back the plain way and compare every tensor (doubles peak memory briefly).
        loader_hint: how to load the model instead when it is refused (default: ``<Module>.load_from_checkpoint``).
        label_names: the name of each class, in output order (a labelled DataModule's ``label_names``): the
            transformers config's ``id2label`` / ``label2id``, the timm config's ``label_names``. None keeps the
            format's default (``LABEL_0``, ...).

    Returns:
        The output folder.

    Raises:
        ExportError: if the format cannot state the model's sizes (e.g. per-layer pruned heads or MLP widths), the
            network holds parts that transformers / timm do not know (this package's bottleneck adapters, the timm
            AST recipe), or the written folder does not load back to the same tensors.
        FileExistsError: if ``output`` exists and is not empty.

    Example::

        >>> from lightning_peft.modules import ImageClassifier
        >>> module = ImageClassifier("vit_tiny_patch16_224", num_classes=3,
        ...                          model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2})
        >>> export_model(module, "my_vit")  # doctest: +SKIP
        >>> timm.create_model("local-dir:my_vit", pretrained=True)  # doctest: +SKIP
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(
            f"`output` must be a new or empty folder, got {str(output)!r}, which holds files. HINT: choose another"
            " folder; the exporter never writes over existing files."
        )
    hparams = dict(getattr(source, "hparams", {}) or {})
    network = source.model if isinstance(source, pl.LightningModule) and hasattr(source, "model") else source
    hint = loader_hint or (
        f"load it with `{type(source).__name__}.load_from_checkpoint(path)` (lightning_peft), which rebuilds it"
        if isinstance(source, pl.LightningModule)
        else "keep it as a Lightning checkpoint and load it with `<YourModule>.load_from_checkpoint(path)`"
    )
    if hparams.get("builder") == "timm" and type(source).__name__ == "AudioClassifier":
        raise ExportError(
            "The AST recipe on a timm ViT (overlapping patches, averaged class tokens) is not a model timm builds by"
            f" name, so no timm folder can describe it. HINT: {hint}; or train with `builder: hf`"
            " (ASTForAudioClassification), which exports to transformers."
        )
    _refuse_package_adapters(network, hint)
    network = copy.deepcopy(network).cpu().eval()
    names = _checked_label_names(label_names, network)
    if _is_peft(network):
        if not merge_lora:
            return _export_peft_adapter(network, output, hint, verify)
        network = network.merge_and_unload()
    if _is_transformers(network):
        _make_config_true(network)
        if names is not None:
            network.config.id2label = dict(enumerate(names))
            network.config.label2id = {name: index for index, name in enumerate(names)}
        _check_shapes(network, _empty_like_config(network), "config.json", hint)

        def save() -> None:
            network.save_pretrained(output)

        def load() -> nn.Module:
            return type(network).from_pretrained(output)

        return _write(output, save, load, network, verify, hint)
    if hasattr(network, "pretrained_cfg"):
        args = dict(model_args if model_args is not None else hparams.get("model_kwargs") or {})
        return _export_timm(network, output, args, verify, hint, names)
    raise ExportError(
        f"{type(network).__name__} is neither a transformers nor a timm model, so there is no ecosystem format to"
        f" write. HINT: {hint}; or save `state_dict()` with `safetensors.torch.save_file`."
    )


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    output: str | os.PathLike,
    merge_lora: bool = True,
    module_class: type[pl.LightningModule] | str | None = None,
    verify: bool = True,
) -> Path:
    """Export the model of a Lightning checkpoint (pruned ones included) with :func:`export_model`.

    The checkpoint is read as plain data (``weights_only=True``). Its module is rebuilt by the class's
    ``load_from_checkpoint`` (the ready modules reach a pruned architecture from the checkpoint's plan there).

    Args:
        ckpt_path: a ``.ckpt`` file written by Lightning (e.g. ``last.ckpt`` of a ``lightning-peft fit`` run).
        output: the new folder to write.
        merge_lora: see :func:`export_model`.
        module_class: the LightningModule class (or its import path); default: the one recorded in the checkpoint
            by the ready modules or by LightningCLI.
        verify: see :func:`export_model`.

    Returns:
        The output folder.

    Raises:
        ValueError: if the checkpoint names no module class and none is given, or the class is not a LightningModule.
        ExportError, FileExistsError: see :func:`export_model`.

    Example::

        >>> export_checkpoint("lightning_logs/quickstart/version_0/checkpoints/last.ckpt", "minilm_tweets")
        ... # doctest: +SKIP
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if module_class is None:
        module_class = checkpoint.get("module_class") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    if module_class is None:
        raise ValueError(
            f"`module_class` is needed: the checkpoint {str(ckpt_path)!r} does not record its LightningModule class."
            " HINT: pass `module_class=MyModule` (Python) or `--module_class my_package.MyModule` (CLI)."
        )
    if isinstance(module_class, str):
        module_name, _, class_name = module_class.rpartition(".")
        module_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(module_class, type) and issubclass(module_class, pl.LightningModule)):
        raise ValueError(
            f"`module_class` must be a LightningModule class, got {module_class!r}."
            " HINT: name the class your checkpoint was trained with."
        )
    module = module_class.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    hint = f"load it with `{module_class.__name__}.load_from_checkpoint({str(ckpt_path)!r})` (lightning_peft)"
    return export_model(
        module, output, merge_lora=merge_lora, verify=verify, loader_hint=hint, label_names=_label_names(checkpoint)
    )


def _label_names(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """The class names a labelled DataModule stored in the checkpoint (``checkpoint[<DataModule>]["label_names"]``)."""
    for value in checkpoint.values():
        if isinstance(value, Mapping) and isinstance(value.get("label_names"), (list, tuple)) and value["label_names"]:
            return [str(name) for name in value["label_names"]]
    return None


def _checked_label_names(label_names: Sequence[str] | None, network: nn.Module) -> list[str] | None:
    """``label_names`` as strings, when they are as many as the model's outputs; None when not given."""
    if label_names is None:
        return None
    names = [str(name) for name in label_names]
    config = getattr(network, "config", None)
    if _is_peft(network):
        config = getattr(network.get_base_model(), "config", None)
    outputs = getattr(config, "num_labels", None) if config is not None else getattr(network, "num_classes", None)
    if isinstance(outputs, int) and outputs != len(names):
        raise ValueError(
            f"`label_names` must name each of the model's {outputs} outputs, got {len(names)}: {names}."
            " HINT: pass the DataModule's `label_names` the model was trained with, or None."
        )
    return names


# ------------------------------------------------------------------------------------------------------- checks
def _is_peft(network: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(network, PeftModel)


def _is_transformers(network: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(network, PreTrainedModel)


def _refuse_package_adapters(network: nn.Module, hint: str) -> None:
    from lightning_peft.adapters import adapter_modules

    adapters = list(adapter_modules(network))
    if adapters:
        raise ExportError(
            f"The model holds {len(adapters)} adapters of lightning_peft (e.g. {adapters[0][0]!r}), which transformers"
            f" and timm models do not have, so their formats cannot describe it. HINT: {hint}."
        )


def _make_config_true(network: nn.Module) -> None:
    """State pruned sizes in an HF config where it has a field for them and every layer agrees."""
    from lightning_peft.pruning import find_sites

    config = network.config
    try:
        sites = find_sites(network)
    except Exception:  # no layout that the pruning knows, so nothing was pruned by it (the shape check still runs)
        return
    widths = {site.hidden for site in sites.mlp}
    if len(widths) == 1 and hasattr(config, "intermediate_size"):
        config.intermediate_size = widths.pop()
    heads = {(site.num_heads, site.num_kv_heads) for site in sites.attention}
    if len(heads) == 1 and getattr(config, "head_dim", None) and hasattr(config, "num_key_value_heads"):
        config.num_attention_heads, config.num_key_value_heads = heads.pop()


def _empty_like_config(network: nn.Module) -> nn.Module:
    with torch.device("meta"):
        return type(network)(copy.deepcopy(network.config))


def _check_shapes(network: nn.Module, described: nn.Module, what: str, hint: str) -> None:
    """Refuse when the format's description builds tensors of other shapes (or names) than the model's."""
    own = network.state_dict()
    theirs = described.state_dict()
    differ = [
        f"`{name}` {tuple(own[name].shape)} here, {tuple(theirs[name].shape)} by the {what}"
        for name in own
        if name in theirs and own[name].shape != theirs[name].shape
    ]
    missing = [name for name in own if name not in theirs]
    if differ or missing:
        shown = "; ".join(differ[:3] + [f"`{name}` unknown to the {what}" for name in missing[:2]])
        raise ExportError(
            f"The {what} of {type(network).__name__} cannot state this model's sizes ({len(differ) + len(missing)}"
            f" tensors differ: {shown}). After pruning, per-layer head counts and MLP widths have no field in this"
            f" format, and a config that claims the original sizes would load the weights wrongly. HINT: {hint}."
        )


def _write(output: Path, save, load, network: nn.Module, verify: bool, hint: str) -> Path:
    created = not output.exists()
    try:
        save()
        if verify:
            loaded = load()
            expected = network.state_dict()
            got = loaded.state_dict()
            wrong = [n for n, t in expected.items() if n not in got or not torch.equal(got[n].cpu(), t.cpu())]
            if wrong:
                raise ExportError(
                    f"The written folder loads back with {len(wrong)} different tensors (e.g. {wrong[:3]}), so it"
                    f" would not be the fine-tuned model. HINT: {hint}."
                )
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        else:
            for child in output.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return output


def _export_timm(
    network: nn.Module,
    output: Path,
    model_args: dict[str, Any],
    verify: bool,
    hint: str,
    label_names: list[str] | None = None,
) -> Path:
    import timm
    from timm.models import save_for_hf

    architecture = network.pretrained_cfg.get("architecture")
    num_classes = getattr(network, "num_classes", None)
    with torch.device("meta"):
        described = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    _check_shapes(network, described, f"timm config ({architecture} with {model_args})", hint)

    def save() -> None:
        output.mkdir(parents=True, exist_ok=True)
        # timm keeps the names only when its pretrained config states the same number of classes
        labels = {"pretrained_cfg": {"label_names": label_names, "num_classes": num_classes}} if label_names else None
        save_for_hf(network, str(output), model_config=labels, model_args=model_args or None, safe_serialization=True)

    def load() -> nn.Module:
        return timm.create_model(f"local-dir:{output}", pretrained=True)

    return _write(output, save, load, network, verify, hint)


def _export_peft_adapter(network: nn.Module, output: Path, hint: str, verify: bool) -> Path:
    base = network.get_base_model()
    if _is_transformers(base):
        unwrapped = copy.deepcopy(network).unload()
        _check_shapes(unwrapped, _empty_like_config(unwrapped), "config.json of the base model", hint)
    else:
        raise ExportError(
            f"`merge_lora=False` writes a peft adapter for a transformers base model; {type(base).__name__} is not"
            f" one. HINT: export with `merge_lora=True` (LoRA merged into the weights), or {hint}."
        )

    def save() -> None:
        network.save_pretrained(output, safe_serialization=True)

    def load() -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(unwrapped, output)

    return _write(output, save, load, network, verify, hint)
