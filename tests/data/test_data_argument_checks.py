"""Every DataModule and feature class checks its plain arguments at construction, in one wording.

Each error names the argument in backticks, says what is allowed and what was got, and ends with a HINT (the checks
of :mod:`lightning_peft._validation`); a bool is never taken for a number.
"""

import pytest

from lightning_peft.data import AudioFolder, Digits, ImageFolder, TextClassificationFile, TextFiles, TweetSentiment
from lightning_peft.data.audio_features import FilterbankFeatures, SpecAugment

CASES = [
    (Digits, {"channels": 0}, r"`channels` must be an integer >= 1, got 0"),
    (Digits, {"batch_size": True}, r"`batch_size` must be an integer >= 1, got True"),
    (Digits, {"num_workers": 1.5}, r"`num_workers` must be an integer >= 0, got 1.5"),
    (Digits, {"val_fraction": "0.2"}, r"`val_fraction` must be a number in \(0, 1\), got '0.2'"),
    (Digits, {"val_fraction": 0.0}, r"`val_fraction` must be a number in \(0, 1\), got 0.0"),
    (Digits, {"test_fraction": 1.0}, r"`test_fraction` must be None or a number in \[0, 1\), got 1.0"),
    (FilterbankFeatures, {"num_mel_bins": True}, r"`num_mel_bins` must be an integer >= 1, got True"),
    (FilterbankFeatures, {"std": "1"}, r"`std` must be positive \(a number > 0\), got '1'"),
    (FilterbankFeatures, {"mean": None}, r"`mean` must be a real number, got None"),
    (SpecAugment, {"noise": -0.1}, r"`noise` must be a number >= 0, got -0.1"),
    (SpecAugment, {"freq_mask": 2.0}, r"`freq_mask` must be an integer >= 0, got 2.0"),
    (ImageFolder, {"root": "r", "batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
    (ImageFolder, {"root": "r", "image_size": 0}, r"`image_size` must be None or an integer >= 1, got 0"),
    (ImageFolder, {"root": "r", "augment": "yes"}, r"`augment` must be True or False, got 'yes'"),
    (ImageFolder, {"root": "r", "val_fraction": 1}, r"`val_fraction` must be a number strictly between 0 and 1"),
    (AudioFolder, {"root": "r", "num_workers": -1}, r"`num_workers` must be an integer >= 0, got -1"),
    (AudioFolder, {"root": "r", "time_mask": -1}, r"`time_mask` must be an integer >= 0, got -1"),
    (AudioFolder, {"root": "r", "target_length": 0}, r"`target_length` must be an integer >= 1, got 0"),
    (TextClassificationFile, {"train_file": "t.csv", "max_length": 0}, r"`max_length` must be an integer >= 1"),
    (
        TextClassificationFile,
        {"train_file": "t.csv", "text_column": ""},
        r"`text_column` must be a column name \(a non-empty string\), got ''",
    ),
    (
        TextClassificationFile,
        {"train_file": "t.csv", "label_names": ["good", "good"]},
        r"`label_names` must be a list of at least 2 different entries, got \['good', 'good'\]",
    ),
    (TextFiles, {"files": "x.txt", "val_fraction": 1.0}, r"`val_fraction` must be a number strictly between 0 and 1"),
    (TextFiles, {"files": "x.txt", "max_documents": 1}, r"`max_documents` must be None or an integer >= 2, got 1"),
    (TextFiles, {"files": "x.txt", "messages_column": 3}, r"`messages_column` must be a field name"),
    (TweetSentiment, {"test_size": True}, r"`test_size` must be an integer >= 0, got True"),
    (TweetSentiment, {"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize(("factory", "kwargs", "match"), CASES, ids=lambda v: getattr(v, "__name__", None))
def test_bad_argument_is_named_with_what_is_allowed_and_a_hint(factory, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        factory(**kwargs)
    assert "HINT: " in str(info.value)
