import hashlib

import numpy as np
import pytest
import torch

from lightning_peft.data import SpokenKeywords
from lightning_peft.data.spoken_keywords import synthesize

# Every test that synthesises speech; without espeak-ng they skip (fail under CI), see conftest.py at the root.
needs_espeak = pytest.mark.espeak

SMALL = dict(
    words=["yes", "no", "stop"],
    voices=["en-us", "en-gb+f2", "en-029+m3"],
    speeds=[140, 180],
    pitches=[50],
    val_voices=1,
    test_voices=1,
    target_length=96,
    batch_size=4,
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    cache = tmp_path_factory.mktemp("keywords")
    data = SpokenKeywords(cache_dir=str(cache), **SMALL)
    data.setup("fit")
    return data


@needs_espeak
def test_synthesis_is_deterministic_and_16khz():
    a = synthesize("left", "en-gb+f2", speed=160, pitch=40)
    b = synthesize("left", "en-gb+f2", speed=160, pitch=40)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert 0.2 < len(a) / 16000 < 1.5 and 0.05 < np.abs(a).max() <= 1.0
    assert not np.array_equal(a, synthesize("left", "en-gb+f2", speed=160, pitch=70))


@needs_espeak
def test_two_generations_are_identical(generated, tmp_path):
    again = SpokenKeywords(cache_dir=str(tmp_path), **SMALL)
    again.setup("fit")
    for split in ("train_set", "val_set", "test_set"):
        first, second = getattr(generated, split), getattr(again, split)
        assert torch.equal(first.features, second.features) and torch.equal(first.labels, second.labels)
    wav = generated.audio_path("stop", "en-029+m3", 180, 50)
    assert (
        hashlib.sha256(wav.read_bytes()).digest()
        == hashlib.sha256(again.audio_path("stop", "en-029+m3", 180, 50).read_bytes()).digest()
    )


@needs_espeak
def test_split_by_voice_and_shapes(generated):
    split = generated.split_voices()
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(SMALL["voices"])
    train_voices = set(generated.train_set.sources)
    assert train_voices == set(split["train"])
    assert not train_voices & set(generated.val_set.sources) and not train_voices & set(generated.test_set.sources)
    assert set(generated.val_set.sources).isdisjoint(generated.test_set.sources)
    # 3 words x 1 voice x 2 speeds x 1 pitch per voice
    assert len(generated.train_set) == len(generated.val_set) == len(generated.test_set) == 6
    assert sorted(generated.val_set.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    features, labels = next(iter(generated.val_dataloader()))
    assert features.shape == (4, 96, 128) and features.dtype == torch.float32 and labels.dtype == torch.int64
    assert generated.num_classes == 3 and generated.label_names == ("yes", "no", "stop")


@needs_espeak
def test_cache_is_reused_and_words_pick_classes(generated):
    cache = generated.cache_dir
    subset = SpokenKeywords(cache_dir=str(cache), **{**SMALL, "words": ["stop", "yes"]})
    subset.setup("fit")
    # labels follow the order of `words`; the features are the cached ones of those words
    stop_val = generated.val_set.features[generated.val_set.labels == 2]
    torch.testing.assert_close(subset.val_set.features[subset.val_set.labels == 0], stop_val)


@needs_espeak
def test_training_clips_are_augmented_validation_clips_are_not(generated):
    torch.manual_seed(0)
    features, _ = generated.train_set[0]
    assert not torch.equal(features, generated.train_set.features[0])
    assert torch.equal(generated.val_set[0][0], generated.val_set.features[0])


def test_missing_program_is_named_with_the_install_hint(tmp_path):
    data = SpokenKeywords(cache_dir=str(tmp_path), program="espeak-ng-not-installed", **SMALL)
    with pytest.raises(FileNotFoundError, match=r"`espeak-ng-not-installed`.*apt-get install espeak-ng"):
        data.setup("fit")


@needs_espeak
def test_unknown_voice_is_reported():
    with pytest.raises(ValueError, match="voice 'xx-nonexistent'.*--voices"):
        synthesize("yes", "xx-nonexistent", speed=160, pitch=50)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`words` must be a list of at least 2 different entries"):
        SpokenKeywords(words=["yes", "yes"], cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"`val_voices` \+ `test_voices` must be below the 2 voices"):
        SpokenKeywords(voices=["en-us", "en-gb"], val_voices=1, test_voices=1, cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"voices": "en-us"}, r"`voices` must be a non-empty list without duplicates, got 'en-us'"),
        ({"speeds": []}, r"`speeds` must be a non-empty list without duplicates, got \[\]"),
        ({"test_voices": -1}, r"`test_voices` must be an integer >= 0, got -1"),
        ({"val_voices": 0}, r"`val_voices` must be an integer >= 1, got 0"),
        ({"augment": "no"}, r"`augment` must be True or False, got 'no'"),
        ({"augment": False, "time_shift": -2}, r"`time_shift` must be an integer >= 0, got -2"),  # checked even off
    ],
)
def test_misconfiguration_is_rejected_before_synthesis(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        SpokenKeywords(cache_dir=str(tmp_path), **kwargs)
    assert "HINT: " in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing synthesised
