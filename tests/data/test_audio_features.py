import numpy as np
import pytest
import torch

from lightning_peft.data.audio_features import AUDIOSET_MEAN, AUDIOSET_STD, FilterbankFeatures, SpecAugment


def _tone(seconds: float, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_shape_frames_and_padding():
    features = FilterbankFeatures(target_length=128)
    # 25 ms windows every 10 ms: a 0.5 s clip has 1 + (8000 - 400) // 160 = 48 frames, then zero padding
    raw = features.raw(_tone(0.5))
    assert raw.shape == (128, 128)
    assert np.all(raw[48:] == 0.0) and np.all(raw[:48] != 0.0)
    assert features([_tone(2.0), _tone(0.3)]).shape == (2, 128, 128)  # a long clip is cut to 128 frames


def test_normalisation_is_x_minus_mean_over_two_std():
    features = FilterbankFeatures(target_length=64)
    raw = features.raw(_tone(0.6))
    np.testing.assert_allclose(features(_tone(0.6)), (raw - AUDIOSET_MEAN) / (2 * AUDIOSET_STD), rtol=1e-6)
    custom = FilterbankFeatures(target_length=64, mean=1.0, std=0.5)
    np.testing.assert_allclose(custom(_tone(0.6)), raw - 1.0, rtol=1e-6)


def test_a_tone_lights_up_its_mel_bin():
    low, high = FilterbankFeatures(target_length=32).raw([_tone(0.3, 300.0), _tone(0.3, 4000.0)])
    assert low[5:20].mean(0).argmax() < high[5:20].mean(0).argmax()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`sampling_rate` must be one of \[16000\]"):
        FilterbankFeatures(sampling_rate=22050)
    with pytest.raises(ValueError, match="`std` must be positive"):
        FilterbankFeatures(std=0.0)
    with pytest.raises(ValueError, match="at least 400 samples"):
        FilterbankFeatures(target_length=16).raw(np.zeros(100, dtype=np.float32))


def test_spec_augment_masks_one_band_and_one_span():
    augment = SpecAugment(freq_mask=20, time_mask=30, fill=-7.0)
    features = torch.randn(100, 128)
    out = augment(features, generator=torch.Generator().manual_seed(3))
    masked = out == -7.0
    columns = masked.all(0).nonzero().flatten()
    rows = masked.all(1).nonzero().flatten()
    assert 0 < len(columns) < 20 and 0 < len(rows) < 30
    assert torch.equal(columns, torch.arange(columns[0], columns[0] + len(columns)))  # one contiguous band
    assert torch.equal(out[~masked], features[~masked])  # the rest is untouched
    assert not torch.equal(features, out) and features.ne(-7.0).all()  # a copy: the input is unchanged


def test_spec_augment_roll_noise_and_determinism():
    augment = SpecAugment(freq_mask=0, time_mask=0, time_shift=10, noise=0.1)
    features = torch.arange(50.0).view(50, 1).expand(50, 4).contiguous()
    a = augment(features, generator=torch.Generator().manual_seed(0))
    b = augment(features, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    shift = int((a[:, 0] - features[:, 0]).round().remainder(50)[0])
    assert torch.allclose(torch.roll(features, -shift if shift < 25 else 50 - shift, 0), a, atol=0.1) or shift == 0
    assert (a - a.round()).abs().max() <= 0.1
    with pytest.raises(ValueError, match="`time_mask` must be an integer >= 0"):
        SpecAugment(time_mask=-1)
