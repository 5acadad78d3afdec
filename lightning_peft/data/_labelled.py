"""What the DataModules of the user's own labelled data share: label names in checkpoints, seeded stratified splits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from typing_extensions import override

from lightning_peft._validation import check_int, check_number
from lightning_peft.data._split import SplitDataModule


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Return ``(train indices, validation indices)``: ``val_fraction`` of each class, drawn with ``seed``.

    A class with at least two examples gives at least one to validation, so every class is validated.

    Example::

        >>> from lightning_peft.data._labelled import stratified_split
        >>> train, val = stratified_split([0, 0, 0, 0, 1, 1, 1, 1], val_fraction=0.25, seed=0)
        >>> len(train), len(val), sorted(i // 4 for i in val)
        (6, 2, [0, 1])
    """
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members)))) if len(members) > 1 else 0
        val += [members[i] for i in order[:n_val]]
        train += [members[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


def split_class_folders(
    root: str, val_root: str | None, val_fraction: float, seed: int, suffixes: Sequence[str], kind: str
) -> tuple[tuple[str, ...], list[tuple[str, int]], list[tuple[str, int]]]:
    """Class names and ``(train, val)`` samples ``(path, label)`` of a class-per-folder tree.

    The validation samples come from ``val_root`` (the same class folders) when given, else ``val_fraction`` of each
    class of ``root``, drawn with ``seed``.

    Example::

        >>> import os, tempfile
        >>> root = tempfile.mkdtemp()
        >>> for name in ("cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png"):
        ...     os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        ...     open(os.path.join(root, name), "wb").close()
        >>> names, train, val = split_class_folders(root, None, 0.5, 0, (".png",), "image")
        >>> names, len(train), len(val)
        (('cat', 'dog'), 2, 2)
    """
    from lightning_peft.data._records import class_folders, scan_class_folders

    names = tuple(class_folders(root))
    samples = scan_class_folders(root, names, suffixes, kind)
    if val_root is not None:
        return names, samples, scan_class_folders(val_root, names, suffixes, kind)
    train_idx, val_idx = stratified_split([y for _, y in samples], val_fraction, seed)
    return names, [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def check_val_fraction(val_fraction: Any) -> float:
    """The share of each class held out for validation: a number strictly between 0 and 1.

    Example::

        >>> check_val_fraction(1)
        Traceback (most recent call last):
        ...
        ValueError: `val_fraction` must be a number strictly between 0 and 1, got 1. HINT: e.g. 0.1, or give a \
separate validation folder / file.
    """
    return check_number(
        "val_fraction",
        val_fraction,
        0,
        1,
        "e.g. 0.1, or give a separate validation folder / file.",
        "a number strictly between 0 and 1",
    )


class LabelledDataModule(SplitDataModule):
    """A classification DataModule whose class names are found in the data and kept in checkpoints.

    Subclasses set :attr:`label_names` in ``setup``. ``state_dict`` stores them, so a checkpoint says what each
    output of the model means (``checkpoint["LabelledDataModuleSubclass"]["label_names"]``), and a resumed run
    whose data has other classes fails instead of training a head on shuffled meanings. ``setup`` also checks
    that the model has one output per class when it runs under a Trainer.

    Example::

        >>> from lightning_peft.data._labelled import LabelledDataModule
        >>> class Pets(LabelledDataModule):
        ...     def setup(self, stage=None):
        ...         self.label_names = ("cat", "dog")
        >>> pets = Pets()
        >>> pets.num_classes, pets.state_dict()
        (2, {'label_names': ['cat', 'dog']})
    """

    label_names: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (known after ``setup``)."""
        if self.label_names is None:
            self.setup()
        return len(self.label_names)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"label_names": list(self.label_names or [])}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = tuple(state_dict.get("label_names") or ())
        if not saved:
            return
        if self.label_names is not None and tuple(self.label_names) != saved:
            raise ValueError(
                f"The checkpoint was trained on the classes {list(saved)}, the data now has {list(self.label_names)}."
                " HINT: use data with the same class names (a model's outputs keep the meaning they were trained"
                " with), or start a new run without `ckpt_path`."
            )
        self.label_names = saved

    def _class_folder_settings(
        self, root: str, val_root: str | None, val_fraction: float, batch_size: int, seed: int, num_workers: int
    ) -> None:
        """Check and keep the settings every class-per-folder DataModule shares (root, split, loader)."""
        check_val_fraction(val_fraction)
        check_int("batch_size", batch_size, 1, "e.g. batch_size=16; lower it if memory runs out.")
        check_int("num_workers", num_workers, 0, "use 0 on small data.")
        self.root = os.path.expanduser(root)
        self.val_root = None if val_root is None else os.path.expanduser(val_root)
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def check_model_outputs(self) -> None:
        """Raise a ValueError if the Trainer's model was built for another number of classes than the data has."""
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        hparams = getattr(model, "hparams", None) or {}
        for name in ("num_classes", "num_labels"):
            expected = hparams.get(name)
            if isinstance(expected, int) and expected != len(self.label_names):
                raise ValueError(
                    f"The model has `{name}`={expected}, the data has {len(self.label_names)} classes"
                    f" {list(self.label_names)}. HINT: set --model.init_args.{name}={len(self.label_names)}."
                )
