"""The user's own labelled texts from a CSV / TSV / JSONL / JSON file, tokenised for a Hugging Face encoder."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_peft._validation import check_distinct, check_int, check_string
from lightning_peft.data._labelled import LabelledDataModule, check_val_fraction, stratified_split
from lightning_peft.data._records import Record, read_records, require_column
from lightning_peft.models.pretrained import load_pretrained

__all__ = ["TextClassificationFile"]


class _Tokenized(Dataset):
    """Tokenised texts; items are dicts of ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, encoded: dict[str, Tensor], labels: Tensor, texts: list[str]) -> None:
        self.encoded = encoded
        self.labels = labels
        self.texts = texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {name: values[index] for name, values in self.encoded.items()}
        item["labels"] = self.labels[index]
        return item


def _label_text(record: Record, column: str) -> str:
    value = record.values[column]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


class TextClassificationFile(LabelledDataModule):
    r"""Labelled texts from a table file, tokenised once for a Hugging Face encoder (:class:`TextClassifier`).

    ``train_file`` is a ``.csv``, ``.tsv``, ``.jsonl`` (one object per line) or ``.json`` (a list of objects) file
    with a text column and a label column (names set by ``text_column`` and ``label_column``). Labels are names
    (``positive``) or numbers; they are mapped to class indices in the order of ``label_names`` when given, else in
    sorted order of the names found in the training file. With ``val_file`` that file is the validation set;
    without it, a seeded ``val_fraction`` of each class is held out. The names are kept in checkpoints
    (:attr:`label_names`), so the outputs of a trained model can be named. Batches are dicts with ``input_ids``
    and ``attention_mask`` (``int64``, ``(B, max_length)``; plus ``token_type_ids`` where the tokenizer makes them)
    and ``labels`` (``int64``).

    Args:
        train_file: The training examples (or all examples without ``val_file``).
        val_file: Validation examples in the same format; None splits ``train_file``.
        text_column: Column (CSV) or key (JSON) of the text.
        label_column: Column or key of the label.
        label_names: The classes in output order; None takes the sorted names found in ``train_file``.
        tokenizer: A local folder or hub name for ``AutoTokenizer`` (names with an offline copy load from it).
        max_length: Tokens per text; longer texts are truncated, shorter ones padded.
        val_fraction: Fraction of each class held out for validation when there is no ``val_file``.
        batch_size: Texts per batch.
        seed: Seed of the split and of the training shuffle.
        num_workers: Worker processes of each DataLoader.

    Raises:
        ValueError: If an argument is out of range (at construction); at ``setup``, if a file is binary, not UTF-8
            or malformed, a row lacks a column or has a label outside ``label_names`` (naming the file and the
            line), or there are fewer than two classes.
        FileNotFoundError: If a file does not exist (at ``setup``).

    Example::

        >>> import os, tempfile
        >>> from lightning_peft.data import TextClassificationFile
        >>> path = os.path.join(tempfile.mkdtemp(), "reviews.csv")
        >>> rows = ["review,stars"] + [f"great film {i},good" for i in range(4)] + [f"dull {i},bad" for i in range(4)]
        >>> _ = open(path, "w").write("\n".join(rows))
        >>> data = TextClassificationFile(path, text_column="review", label_column="stars", max_length=16,
        ...                               batch_size=2, val_fraction=0.25)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input_ids"].shape, data.label_names
        (torch.Size([2, 16]), ('bad', 'good'))
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        label_names: list[str] | None = None,
        tokenizer: str = "sentence-transformers/all-MiniLM-L6-v2",
        max_length: int = 128,
        val_fraction: float = 0.1,
        batch_size: int = 16,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("max_length", max_length, 1, "tokens per example, e.g. max_length=128.")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=16; lower it if memory runs out.")
        check_val_fraction(val_fraction)
        check_int("num_workers", num_workers, 0, "use 0 on small data.")
        for name, value in (("text_column", text_column), ("label_column", label_column)):
            check_string(name, value, f"quote it in YAML, e.g. {name}: 'text'.", "a column name (a non-empty string)")
        if label_names is not None:
            hint = "list the classes in the order of the model's outputs, or leave it None."
            self.label_names = tuple(check_distinct("label_names", [str(n) for n in label_names], 2, hint))
        self.save_hyperparameters()
        self.train_file = os.path.expanduser(train_file)
        self.val_file = None if val_file is None else os.path.expanduser(val_file)
        self.text_column = text_column
        self.label_column = label_column
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def read(self, path: str) -> list[Record]:
        """Return the rows of ``path``, each checked to have a text and a label."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"The data file {path!r} does not exist. HINT: set --data.init_args.train_file (and val_file) to"
                " your .csv / .jsonl file."
            )
        records = read_records(path)
        if not records:
            raise ValueError(f"{path!r} has no rows. HINT: add one example per row.")
        require_column(records, self.text_column, "text_column")
        require_column(records, self.label_column, "label_column")
        return records

    def _indices(self, records: Sequence[Record], names: Sequence[str]) -> list[int]:
        index_of = {name: i for i, name in enumerate(names)}
        indices = []
        for record in records:
            label = _label_text(record, self.label_column)
            if label not in index_of:
                raise ValueError(
                    f"{record.where} has the label {label!r}, which is not one of the classes {list(names)}."
                    " HINT: fix the row, or add the class to `label_names` (the training file must show it too)."
                )
            indices.append(index_of[label])
        return indices

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            self.check_model_outputs()
            return
        train = self.read(self.train_file)
        if self.label_names is None:
            found = sorted({_label_text(r, self.label_column) for r in train})
            if len(found) < 2:
                raise ValueError(
                    f"{self.train_file!r} has {len(found)} class(es) in `label_column`={self.label_column!r}:"
                    f" {found}; a classifier needs at least 2. HINT: check `label_column`."
                )
            self.label_names = tuple(found)
        train_labels = self._indices(train, self.label_names)
        if self.val_file is not None:
            val = self.read(self.val_file)
            val_labels = self._indices(val, self.label_names)
        else:
            train_idx, val_idx = stratified_split(train_labels, self.val_fraction, self.seed)
            val, val_labels = [train[i] for i in val_idx], [train_labels[i] for i in val_idx]
            train, train_labels = [train[i] for i in train_idx], [train_labels[i] for i in train_idx]

        from transformers import AutoTokenizer

        tokenizer = load_pretrained(AutoTokenizer, self.tokenizer_name, "tokenizer")

        def encode(records: list[Record], labels: list[int]) -> _Tokenized:
            texts = [str(r.values[self.text_column]) for r in records]
            tokens = tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return _Tokenized(dict(tokens), torch.tensor(labels, dtype=torch.long), texts)

        self.train_set = encode(train, train_labels)
        self.val_set = encode(val, val_labels)
        self.test_set = self.val_set
        self.check_model_outputs()
