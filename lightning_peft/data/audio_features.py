"""The AST filterbank features and their training-time augmentation.

:class:`FilterbankFeatures` computes the features the Audio Spectrogram Transformer was trained on: Kaldi-style
log-mel filterbanks with 128 mel bins, a 25 ms Hann window and a 10 ms shift, padded or cut to a fixed number of
frames, normalised as ``(x - mean) / (2 * std)``. It uses the numpy path of transformers' ``ASTFeatureExtractor``
(torchaudio has no release for the torch this package runs on), so the features match what Hugging Face's AST
checkpoints expect. :class:`SpecAugment` is the AST recipe's augmentation: random frequency and time masks, and for
speech commands a random time roll and additive noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_peft._validation import check_choice, check_int, check_number

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "SAMPLE_RATE",
    "FeatureClips",
    "FilterbankFeatures",
    "SpecAugment",
    "resample_to_16k",
]

# Mean and standard deviation of AudioSet filterbanks: the normalisation of the public AST checkpoints.
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
# The sample rate of the AST's features (25 ms / 10 ms frames of 400 / 160 samples).
SAMPLE_RATE = 16000


def resample_to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    """Resample float audio from ``rate`` to 16 kHz: polyphase filtering with scipy, linear interpolation without it.

    Example::

        >>> import numpy as np
        >>> from lightning_peft.data.audio_features import resample_to_16k
        >>> resample_to_16k(np.zeros(44100, dtype=np.float32), 44100).shape
        (16000,)
    """
    if rate == SAMPLE_RATE:
        return np.asarray(audio, dtype=np.float32)
    try:
        from scipy.signal import resample_poly
    except ImportError:
        n_out = int(round(len(audio) * SAMPLE_RATE / rate))
        return np.interp(np.arange(n_out) * rate / SAMPLE_RATE, np.arange(len(audio)), audio).astype(np.float32)
    common = np.gcd(SAMPLE_RATE, rate)
    return resample_poly(audio, SAMPLE_RATE // common, rate // common).astype(np.float32)


class FilterbankFeatures:
    """Log-mel filterbanks of 16 kHz waveforms as the AST expects them: ``(target_length, num_mel_bins)`` per clip.

    Frames are 25 ms (400 samples) with a 10 ms (160 samples) shift and a Hann window, with Kaldi's pre-emphasis
    (0.97) and DC removal; clips are zero-padded or cut to ``target_length`` frames *before* normalisation, as in
    the AST recipe. Waveforms are floats in [-1, 1].

    Args:
        num_mel_bins: Mel bins (the AST uses 128).
        target_length: Frames per clip (1024 for 10 s AudioSet clips, 128 for 1 s speech commands).
        sampling_rate: Sample rate of the waveforms; only 16 kHz is supported by the extractor's 25 ms / 10 ms
            framing.
        mean: Normalisation mean (AudioSet's by default, what the public AST checkpoints were trained with).
        std: Normalisation standard deviation (> 0); features become ``(x - mean) / (2 * std)``.

    Raises:
        ValueError: If a size is not positive, ``std`` is not positive or ``sampling_rate`` is not 16000.

    Example::

        >>> import numpy as np
        >>> from lightning_peft.data.audio_features import FilterbankFeatures
        >>> features = FilterbankFeatures(target_length=128)
        >>> features(np.zeros(16000, dtype=np.float32)).shape
        (128, 128)
        >>> features([np.zeros(8000), np.zeros(24000)]).shape
        (2, 128, 128)
    """

    def __init__(
        self,
        num_mel_bins: int = 128,
        target_length: int = 1024,
        sampling_rate: int = 16000,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
    ) -> None:
        check_int("num_mel_bins", num_mel_bins, 1, "the AST uses 128.")
        check_int("target_length", target_length, 1, "the AST uses 1024 frames (10 s); 128 for one-second clips.")
        check_choice(
            "sampling_rate",
            sampling_rate,
            [16000],
            "25 ms / 10 ms frames are 400 / 160 samples at 16 kHz: resample the audio to 16 kHz first.",
        )
        check_number("mean", mean, -math.inf, math.inf, f"AudioSet's is {AUDIOSET_MEAN}.", "a real number")
        check_number("std", std, 0, math.inf, f"AudioSet's is {AUDIOSET_STD}.", "positive (a number > 0)")
        from transformers import ASTFeatureExtractor

        self.num_mel_bins = num_mel_bins
        self.target_length = target_length
        self.sampling_rate = sampling_rate
        self.mean = float(mean)
        self.std = float(std)
        with warnings.catch_warnings():
            # Kaldi's mel scale leaves the lowest of 128 filters empty at a 512-point FFT; the AST was trained so.
            warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
            self._extractor = ASTFeatureExtractor(
                num_mel_bins=num_mel_bins, max_length=target_length, sampling_rate=sampling_rate, do_normalize=False
            )

    def raw(self, waveforms: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Return unnormalised log-mel filterbanks: ``(T, F)`` for one waveform, ``(N, T, F)`` for a list."""
        single = isinstance(waveforms, np.ndarray) and waveforms.ndim == 1
        clips = [waveforms] if single else list(waveforms)
        clips = [np.asarray(clip, dtype=np.float32) for clip in clips]
        if not clips or any(clip.ndim != 1 or clip.size < 400 for clip in clips):
            raise ValueError(
                "`waveforms` must be one 1-D waveform or a list of them, each at least 400 samples (25 ms) long."
                " HINT: pass mono audio at 16 kHz as a float array."
            )
        values = self._extractor(clips, sampling_rate=self.sampling_rate, return_tensors="np")["input_values"]
        values = values.astype(np.float32)
        return values[0] if single else values

    def normalize(self, features: np.ndarray) -> np.ndarray:
        """Return ``(features - mean) / (2 * std)``."""
        return ((features - self.mean) / (2.0 * self.std)).astype(np.float32)

    def __call__(self, waveforms: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Return normalised filterbanks: ``(T, F)`` for one waveform, ``(N, T, F)`` for a list."""
        return self.normalize(self.raw(waveforms))


class SpecAugment:
    """Training-time augmentation of AST filterbanks: frequency and time masks, time roll and noise.

    For each clip, one frequency band of width drawn from ``[0, freq_mask)`` and one time span of width drawn from
    ``[0, time_mask)`` are set to ``fill`` (SpecAugment, as torchaudio's ``FrequencyMasking`` / ``TimeMasking`` do
    in the AST recipe, where masking precedes normalisation: ``fill`` is then the normalised zero). With
    ``time_shift``, the clip is rolled along time by an integer drawn from ``[-time_shift, time_shift)``; with
    ``noise``, uniform noise of amplitude ``noise * u`` (``u`` drawn once per clip from [0, 1)) is added before
    the roll (the AST recipe for speech commands uses a roll of 10 frames and noise 0.1). Randomness comes from
    ``torch``'s global generator (seeded by ``seed_everything``) or a given one.

    Args:
        freq_mask: Maximum width of the frequency mask in bins (AST: 48 for speech commands and AudioSet).
        time_mask: Maximum width of the time mask in frames (AST: 48 for speech commands, 192 for AudioSet).
        time_shift: Maximum time roll in frames (0: none).
        noise: Maximum noise amplitude (0: none).
        fill: Value of masked cells; for features normalised with ``mean`` / ``std`` the recipe's value is
            ``-mean / (2 * std)``.

    Raises:
        ValueError: If a width, shift or noise level is negative.

    Example::

        >>> import torch
        >>> from lightning_peft.data.audio_features import SpecAugment
        >>> augment = SpecAugment(freq_mask=24, time_mask=24)
        >>> augment(torch.zeros(128, 128), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([128, 128])
    """

    def __init__(
        self,
        freq_mask: int = 48,
        time_mask: int = 48,
        time_shift: int = 0,
        noise: float = 0.0,
        fill: float = 0.0,
    ) -> None:
        for name, value in (("freq_mask", freq_mask), ("time_mask", time_mask), ("time_shift", time_shift)):
            check_int(name, value, 0, "0 switches it off.")
        check_number(
            "noise",
            noise,
            0,
            math.inf,
            "the AST recipe uses 0.1 for speech; 0 switches it off.",
            "a number >= 0",
            include_low=True,
        )
        check_number("fill", fill, -math.inf, math.inf, "the normalised zero of the features.", "a real number")
        self.freq_mask = freq_mask
        self.time_mask = time_mask
        self.time_shift = time_shift
        self.noise = float(noise)
        self.fill = float(fill)

    @staticmethod
    def _span(size: int, max_width: int, generator: torch.Generator | None) -> tuple[int, int]:
        width = int(torch.randint(0, min(max_width, size), (1,), generator=generator)) if max_width > 0 else 0
        start = int(torch.randint(0, size - width + 1, (1,), generator=generator))
        return start, width

    def __call__(self, features: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return an augmented copy of one clip's features ``(T, F)``."""
        if features.dim() != 2:
            raise ValueError(
                f"SpecAugment takes one clip's features of shape (time, frequency), got {tuple(features.shape)}."
            )
        out = features.clone()
        if self.noise > 0:
            scale = float(torch.rand((), generator=generator)) * self.noise
            out += torch.rand(out.shape, generator=generator) * scale
        if self.time_shift > 0:
            shift = int(torch.randint(-self.time_shift, self.time_shift, (1,), generator=generator))
            out = torch.roll(out, shift, dims=0)
        start, width = self._span(out.shape[1], self.freq_mask, generator)
        out[:, start : start + width] = self.fill
        start, width = self._span(out.shape[0], self.time_mask, generator)
        out[start : start + width, :] = self.fill
        return out


class FeatureClips(Dataset):
    """Filterbank features of one split with their labels; training items may be augmented.

    Items are ``(features (T, F), label)``. ``sources`` names where each clip came from (a file, a voice).

    Example::

        >>> clips = FeatureClips(torch.zeros(2, 8, 4), torch.tensor([0, 1]), ["a.wav", "b.wav"], None)
        >>> len(clips), clips[1][1].item()
        (2, 1)
    """

    def __init__(self, features: Tensor, labels: Tensor, sources: list[str], augment: SpecAugment | None) -> None:
        self.features = features
        self.labels = labels
        self.sources = sources
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        features = self.features[index]
        if self.augment is not None:
            features = self.augment(features)
        return features, self.labels[index]
