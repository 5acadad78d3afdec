"""The user's own recordings, one folder per class, as the filterbanks an Audio Spectrogram Transformer takes."""

from __future__ import annotations

import wave

import numpy as np
import torch
from typing_extensions import override

from lightning_peft._validation import check_bool
from lightning_peft.data._labelled import LabelledDataModule, split_class_folders
from lightning_peft.data.audio_features import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    FeatureClips,
    FilterbankFeatures,
    SpecAugment,
    resample_to_16k,
)

__all__ = ["AUDIO_SUFFIXES", "AudioFolder", "read_audio"]

AUDIO_SUFFIXES = (".wav", ".flac")


def _read_wav_stdlib(path: str) -> tuple[np.ndarray, int]:
    with wave.open(path, "rb") as reader:
        width, channels, rate = reader.getsampwidth(), reader.getnchannels(), reader.getframerate()
        frames = reader.readframes(reader.getnframes())
    if width == 1:
        audio = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3)
        values = raw[:, 0].astype(np.int32) | (raw[:, 1].astype(np.int32) << 8) | (raw[:, 2].astype(np.int32) << 16)
        audio = (np.where(values >= 1 << 23, values - (1 << 24), values) / float(1 << 23)).astype(np.float32)
    else:
        audio = (np.frombuffer(frames, dtype="<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    return audio.reshape(-1, channels), rate


def read_audio(path: str) -> np.ndarray:
    """Return a WAV or FLAC file as mono float32 samples in [-1, 1] at 16 kHz (channels averaged, resampled).

    PCM WAV is decoded with the standard library; FLAC and float WAV with ``soundfile`` (``pip install
    soundfile``) when installed, float WAV otherwise with scipy.

    Raises:
        ValueError: If the file cannot be decoded (the message names it) or holds no samples.

    Example::

        >>> import os, tempfile, wave
        >>> import numpy as np
        >>> from lightning_peft.data.audio_folder import read_audio
        >>> path = os.path.join(tempfile.mkdtemp(), "tone.wav")
        >>> with wave.open(path, "wb") as writer:
        ...     writer.setnchannels(2); writer.setsampwidth(2); writer.setframerate(8000)
        ...     writer.writeframes((np.ones((8000, 2)) * 1000).astype("<i2").tobytes())
        >>> read_audio(path).shape
        (16000,)
    """
    try:
        if path.lower().endswith(".wav"):
            try:
                audio, rate = _read_wav_stdlib(path)
            except wave.Error:  # float WAV (format 3) and other encodings the stdlib does not read
                audio, rate = _read_with_libraries(path)
        else:
            audio, rate = _read_with_libraries(path)
    except (OSError, EOFError, ValueError, RuntimeError, wave.Error) as err:
        raise ValueError(
            f"{path!r} could not be decoded as audio: {err}. HINT: give PCM/float WAV or FLAC files (convert others"
            " with `ffmpeg -i in.mp3 -ar 16000 out.wav`), or remove the file."
        ) from err
    if audio.size == 0:
        raise ValueError(f"{path!r} holds no samples. HINT: remove the empty recording.")
    return resample_to_16k(audio.mean(axis=1), rate)


def _read_with_libraries(path: str) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
        return audio, rate
    if path.lower().endswith(".flac"):
        raise ValueError("reading FLAC needs the `soundfile` package. HINT: pip install soundfile")
    from scipy.io import wavfile

    rate, audio = wavfile.read(path)
    audio = np.asarray(audio, dtype=np.float32)
    return (audio if audio.ndim == 2 else audio[:, None]), rate


class AudioFolder(LabelledDataModule):
    """Recordings in one folder per class, as the log-mel filterbanks an Audio Spectrogram Transformer takes.

    ``root`` holds one sub-folder per class (``root/dog_bark/*.wav``, ``root/siren/*.flac``; class names are the
    folder names, sorted). With ``val_root`` (the same class folders) it is the validation set; without it, a
    seeded ``val_fraction`` of each class is held out. Each file is decoded (:func:`read_audio`: WAV or FLAC,
    channels averaged), resampled to 16 kHz and turned into the AST's Kaldi filterbanks
    (:class:`~lightning_peft.data.audio_features.FilterbankFeatures`: ``num_mel_bins`` bins, padded or cut to
    ``target_length`` frames of 10 ms, normalised with AudioSet's mean and std as the public AST checkpoints
    expect). Features are computed once in ``setup`` and kept in memory. With ``augment``, training clips get
    SpecAugment (a frequency band of up to ``freq_mask`` bins and a time span of up to ``time_mask`` frames
    masked). Batches are ``(features, labels)``: ``float32 (B, target_length, num_mel_bins)`` and ``int64 (B,)``,
    as :class:`~lightning_peft.modules.AudioClassifier` takes them (give it the same ``num_mel_bins`` and
    ``target_length``). The class names are kept in checkpoints (:attr:`label_names`).

    Args:
        root: Folder with one sub-folder of recordings per class.
        val_root: Validation folder with the same class sub-folders; None splits ``root``.
        val_fraction: Fraction of each class held out for validation when there is no ``val_root``.
        num_mel_bins: Mel bins of the features (the AST uses 128).
        target_length: Frames per clip (100 per second: 1024 for 10 s clips, 128 for 1 s words).
        augment: Apply SpecAugment to training clips.
        freq_mask: Maximum width of the frequency mask in bins.
        time_mask: Maximum width of the time mask in frames.
        batch_size: Clips per batch.
        seed: Seed of the split and the training shuffle.
        num_workers: Worker processes of each DataLoader.

    Raises:
        ValueError: If an argument is out of range (at construction); if a folder has fewer than two classes, a
            class has no recording, or a file cannot be decoded (at ``setup``, naming the file).
        FileNotFoundError: If ``root`` / ``val_root`` is not a folder, or ``val_root`` lacks a class (at ``setup``).

    Example::

        >>> import os, tempfile, wave
        >>> import numpy as np
        >>> from lightning_peft.data import AudioFolder
        >>> root = tempfile.mkdtemp()
        >>> for label, hz in (("low", 200), ("high", 2000)):
        ...     os.makedirs(os.path.join(root, label))
        ...     for i in range(3):
        ...         tone = (np.sin(np.arange(8000) * 2 * np.pi * hz / 16000) * 8000).astype("<i2")
        ...         with wave.open(os.path.join(root, label, f"{i}.wav"), "wb") as writer:
        ...             writer.setnchannels(1); writer.setsampwidth(2); writer.setframerate(16000)
        ...             writer.writeframes(tone.tobytes())
        >>> data = AudioFolder(root, target_length=64, batch_size=2, val_fraction=0.3)
        >>> data.setup("fit")
        >>> features, labels = next(iter(data.train_dataloader()))
        >>> features.shape, data.label_names
        (torch.Size([2, 64, 128]), ('high', 'low'))
    """

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        val_fraction: float = 0.1,
        num_mel_bins: int = 128,
        target_length: int = 1024,
        augment: bool = False,
        freq_mask: int = 48,
        time_mask: int = 48,
        batch_size: int = 16,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_bool("augment", augment)
        self._class_folder_settings(root, val_root, val_fraction, batch_size, seed, num_workers)
        self.save_hyperparameters()
        self.features = FilterbankFeatures(num_mel_bins=num_mel_bins, target_length=target_length)
        fill = (0.0 - AUDIOSET_MEAN) / (2.0 * AUDIOSET_STD)  # the normalised zero, as in the AST recipe
        augmentation = SpecAugment(freq_mask, time_mask, fill=fill)  # checks the masks even when unused
        self.augmentation = augmentation if augment else None

    def _clips(self, samples: list[tuple[str, int]], augment: bool) -> FeatureClips:
        paths = [path for path, _ in samples]
        waveforms = []
        for path in paths:
            audio = read_audio(path)
            if audio.size < 400:  # one 25 ms frame
                audio = np.pad(audio, (0, 400 - audio.size))
            waveforms.append(audio)
        features = torch.from_numpy(self.features(waveforms))
        labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        return FeatureClips(features, labels, paths, self.augmentation if augment else None)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            self.check_model_outputs()
            return
        self.label_names, train, val = split_class_folders(
            self.root, self.val_root, self.val_fraction, self.seed, AUDIO_SUFFIXES, "audio"
        )
        self.train_set = self._clips(train, augment=True)
        self.val_set = self._clips(val, augment=False)
        self.test_set = self.val_set
        self.check_model_outputs()
