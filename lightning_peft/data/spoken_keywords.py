"""Spoken keywords synthesised offline with espeak-ng: a keyword-spotting set for Audio Spectrogram Transformers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from typing_extensions import override

from lightning_peft._validation import check_bool, check_distinct, check_int
from lightning_peft.data._split import SplitDataModule
from lightning_peft.data.audio_features import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    FeatureClips,
    FilterbankFeatures,
    SpecAugment,
    resample_to_16k,
)

__all__ = ["DEFAULT_VOICES", "DEFAULT_WORDS", "SpokenKeywords", "synthesize"]

# The ten command words of Google's Speech Commands benchmark.
DEFAULT_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# espeak-ng voices (accent + voice variant) that sound different from one another; `espeak-ng --voices=en` and
# `espeak-ng --voices=variant` list what else can be combined.
DEFAULT_VOICES = (
    "en-us+m3",
    "en-us+f2",
    "en-gb+m1",
    "en-gb+f3",
    "en-gb-scotland+m2",
    "en-gb-scotland+f1",
    "en-gb-x-rp+m4",
    "en-gb-x-rp+f4",
    "en-gb-x-gbclan+m5",
    "en-gb-x-gbclan+f5",
    "en-gb-x-gbcwmd+m6",
    "en-gb-x-gbcwmd+f2",
    "en-029+m7",
    "en-029+f3",
    "en-us-nyc+m2",
    "en-us-nyc+f4",
)
SAMPLE_RATE = 16000
_INSTALL_HINT = "HINT: install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng`."


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/lightning-peft/spoken_keywords`` (``~/.cache/...`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning-peft" / "spoken_keywords"


def _espeak_program(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(
            f"SpokenKeywords synthesises its audio with the program `{program}`, which was not found on PATH."
            f" {_INSTALL_HINT}"
        )
    return found


def _espeak_version(program: str) -> str:
    result = subprocess.run([program, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip().split("  ")[0]


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    return resample_to_16k(audio, rate)


def synthesize(word: str, voice: str, speed: int, pitch: int, program: str = "espeak-ng") -> np.ndarray:
    """Speak ``word`` with espeak-ng and return the waveform at 16 kHz as float32 in [-1, 1].

    The same arguments give the same samples on every run (espeak-ng is deterministic).

    Args:
        word: Text to speak.
        voice: An espeak-ng voice, optionally with a variant (``"en-us+f2"``).
        speed: Words per minute (espeak-ng's ``-s``; 175 is its default).
        pitch: Pitch, 0-99 (``-p``; 50 is the default).
        program: The espeak-ng executable.

    Raises:
        FileNotFoundError: If ``program`` is not installed.
        ValueError: If espeak-ng rejects the voice or produces no audio.

    Example::

        >>> from lightning_peft.data.spoken_keywords import synthesize
        >>> audio = synthesize("yes", "en-us", speed=160, pitch=50)
        >>> audio.dtype, 0.2 < len(audio) / 16000 < 2.0
        (dtype('float32'), True)
    """
    executable = _espeak_program(program)
    command = [executable, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or len(result.stdout) <= 44:
        message = result.stderr.decode(errors="replace").strip()
        raise ValueError(
            f"`{program}` could not speak {word!r} with voice {voice!r} (exit {result.returncode}: {message})."
            f" HINT: `{program} --voices=en` lists the voices and `{program} --voices=variant` the variants."
        )
    # The WAV header written to a pipe has placeholder sizes: read every frame that follows it.
    with wave.open(io.BytesIO(result.stdout)) as reader:
        rate, width, channels = reader.getframerate(), reader.getsampwidth(), reader.getnchannels()
        frames = reader.readframes(len(result.stdout))
    if width != 2 or channels != 1:
        raise ValueError(f"`{program}` wrote {channels}-channel {8 * width}-bit audio; expected mono 16-bit.")
    audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return _resample(audio, rate)


class SpokenKeywords(SplitDataModule):
    """A keyword-spotting set spoken by espeak-ng: words x voices x speeds x pitches, split by voice.

    Every combination of a word, a voice, a speed and a pitch is one clip, synthesised by Debian's ``espeak-ng``
    (which must be installed: ``sudo apt-get install espeak-ng``), resampled to 16 kHz and turned into AST
    filterbanks (:class:`~lightning_peft.data.audio_features.FilterbankFeatures`). Synthesis is deterministic, and
    everything is generated once into ``cache_dir``: the audio as 16 kHz WAV files (``audio/<word>/<voice>_s<speed>
    _p<pitch>.wav``) and the unnormalised features per word and voice (keyed by the espeak-ng version and the
    feature settings), so a second run, or another subset of the words, only reads files. The voices are split
    with a seeded permutation: ``val_voices`` and ``test_voices`` voices are held out, so validation and test clips
    come from voices never heard in training. Batches are ``(features, labels)``: ``float32`` of shape ``(B,
    target_length, num_mel_bins)`` and ``int64`` indices into ``words``. Training features are augmented with
    :class:`~lightning_peft.data.audio_features.SpecAugment` unless ``augment`` is False.

    With the defaults: 10 words x 16 voices x 3 speeds x 3 pitches = 1,440 clips (1,080 train, 180 validation,
    180 test), generated in about half a minute on two CPU cores.

    Args:
        words: The keywords, one class each, in label order (defaults: Speech Commands' ten).
        voices: espeak-ng voices, with an optional ``+variant``.
        speeds: Speaking rates in words per minute.
        pitches: Pitches, 0-99.
        val_voices: Voices held out for validation.
        test_voices: Voices held out for testing; 0 makes the test loader reuse the validation split.
        cache_dir: Folder of the generated clips and features (default: ``~/.cache/lightning-peft/spoken_keywords``,
            honouring ``XDG_CACHE_HOME``).
        target_length: Frames per clip (128 = 1.28 s, the AST recipe for speech commands).
        num_mel_bins: Mel bins of the features.
        mean: Normalisation mean of the features (AudioSet's, as the public AST checkpoints expect).
        std: Normalisation standard deviation.
        augment: Augment training clips (frequency/time masks, time roll, noise).
        freq_mask: Maximum frequency-mask width. The AST recipe for Speech Commands uses 48 (and 48, 10, 0.1 below)
            with 35 k recordings; on these 1,080 clean clips a small model trained from scratch learned much more
            slowly with them (chance level after 3 epochs instead of 0.36), so the defaults are milder.
        time_mask: Maximum time-mask width (AST recipe: 48).
        time_shift: Maximum time roll in frames (AST recipe for speech commands: 10).
        noise: Maximum additive noise (AST recipe for speech commands: 0.1).
        batch_size: Clips per batch.
        seed: Seed of the voice split and of the training shuffle.
        num_workers: Worker processes of each DataLoader.
        program: The espeak-ng executable.

    Raises:
        ValueError: If a list is empty or has duplicates, a count is out of range, or too few voices remain for
            training.
        FileNotFoundError: If espeak-ng is not installed (raised when the data is generated, by ``prepare_data`` /
            ``setup``).

    Example::

        >>> from lightning_peft.data import SpokenKeywords
        >>> data = SpokenKeywords(words=["yes", "no"], voices=["en-us", "en-gb", "en-029"], speeds=[160],
        ...                       pitches=[50], val_voices=1, test_voices=1, target_length=128)  # doctest: +SKIP
        >>> data.setup("fit")  # doctest: +SKIP
        >>> features, labels = next(iter(data.train_dataloader()))  # doctest: +SKIP
        >>> features.shape  # doctest: +SKIP
        torch.Size([2, 128, 128])
    """

    def __init__(
        self,
        words: Sequence[str] = DEFAULT_WORDS,
        voices: Sequence[str] = DEFAULT_VOICES,
        speeds: Sequence[int] = (130, 160, 190),
        pitches: Sequence[int] = (35, 50, 65),
        val_voices: int = 2,
        test_voices: int = 2,
        cache_dir: str | None = None,
        target_length: int = 128,
        num_mel_bins: int = 128,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
        augment: bool = True,
        freq_mask: int = 24,
        time_mask: int = 24,
        time_shift: int = 0,
        noise: float = 0.0,
        batch_size: int = 32,
        seed: int = 42,
        num_workers: int = 0,
        program: str = "espeak-ng",
    ) -> None:
        super().__init__()
        check_distinct("words", words, 2, "name the classes, e.g. words=['yes', 'no'].")
        check_distinct("voices", voices, 1, "e.g. voices=['en-us', 'en-gb+f2'] (`espeak-ng --voices` lists them).")
        check_distinct("speeds", speeds, 1, "words per minute, e.g. speeds=[160].")
        check_distinct("pitches", pitches, 1, "0-99, e.g. pitches=[50].")
        check_int("val_voices", val_voices, 1, "e.g. val_voices=2.")
        check_int("test_voices", test_voices, 0, "e.g. test_voices=2; 0 tests on the validation voices.")
        if val_voices + test_voices >= len(voices):
            raise ValueError(
                f"`val_voices` + `test_voices` must be below the {len(voices)} voices, got"
                f" {val_voices} + {test_voices}. HINT: give more `voices` or hold out fewer."
            )
        check_int("batch_size", batch_size, 1, "e.g. batch_size=32.")
        check_int("target_length", target_length, 1, "128 frames hold a one-second word.")
        check_int("num_workers", num_workers, 0, "use 0 on small data.")
        check_bool("augment", augment)
        self.save_hyperparameters()
        self.words = [str(w) for w in words]
        self.voices = [str(v) for v in voices]
        self.speeds = [int(s) for s in speeds]
        self.pitches = [int(p) for p in pitches]
        self.val_voices = val_voices
        self.test_voices = test_voices
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.features = FilterbankFeatures(num_mel_bins=num_mel_bins, target_length=target_length, mean=mean, std=std)
        fill = float(self.features.normalize(np.zeros(1, dtype=np.float32))[0])
        augmentation = SpecAugment(freq_mask, time_mask, time_shift=time_shift, noise=noise, fill=fill)  # checks them
        self.augmentation = augmentation if augment else None
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.program = program
        self.train_set: FeatureClips | None = None
        self.val_set: FeatureClips | None = None
        self.test_set: FeatureClips | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (words)."""
        return len(self.words)

    @property
    def label_names(self) -> tuple[str, ...]:
        """The words, in label order."""
        return tuple(self.words)

    def split_voices(self) -> dict[str, list[str]]:
        """Return the voices of each split: ``{"train": [...], "val": [...], "test": [...]}`` (seeded)."""
        order = torch.randperm(len(self.voices), generator=torch.Generator().manual_seed(self.seed)).tolist()
        shuffled = [self.voices[i] for i in order]
        n_val, n_test = self.val_voices, self.test_voices
        return {
            "val": shuffled[:n_val],
            "test": shuffled[n_val : n_val + n_test],
            "train": [v for v in self.voices if v not in shuffled[: n_val + n_test]],
        }

    def _variants(self) -> list[tuple[int, int]]:
        return [(speed, pitch) for speed in self.speeds for pitch in self.pitches]

    def audio_path(self, word: str, voice: str, speed: int, pitch: int) -> Path:
        """Path of a clip's 16 kHz WAV file in the cache."""
        return self.cache_dir / "audio" / _safe(word) / f"{_safe(voice)}_s{speed}_p{pitch}.wav"

    def _features_path(self, word: str, voice: str, version: str) -> Path:
        key = {
            "espeak": version,
            "speeds": self.speeds,
            "pitches": self.pitches,
            "num_mel_bins": self.features.num_mel_bins,
            "target_length": self.features.target_length,
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / f"features-{digest}" / _safe(word) / f"{_safe(voice)}.npy"

    def _clip(self, word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
        path = self.audio_path(word, voice, speed, pitch)
        if not path.is_file():
            audio = synthesize(word, voice, speed, pitch, program=self.program)
            samples = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
            with _atomic(path) as tmp, wave.open(str(tmp), "wb") as writer:
                writer.setnchannels(1)
                writer.setsampwidth(2)
                writer.setframerate(SAMPLE_RATE)
                writer.writeframes(samples.tobytes())
        with wave.open(str(path)) as reader:
            return np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").astype(np.float32) / 32768.0

    @override
    def prepare_data(self) -> None:
        """Synthesise the missing clips and compute the missing features (a no-op when all are cached)."""
        program = _espeak_program(self.program)
        version = _espeak_version(program)
        for word in self.words:
            for voice in self.voices:
                target = self._features_path(word, voice, version)
                if target.is_file():
                    continue
                clips = [self._clip(word, voice, speed, pitch) for speed, pitch in self._variants()]
                raw = self.features.raw(clips).astype(np.float16)
                with _atomic(target) as tmp, open(tmp, "wb") as file:
                    np.save(file, raw)

    def _load(self, voices: list[str], version: str, augment: bool) -> FeatureClips:
        features, labels, names = [], [], []
        for label, word in enumerate(self.words):
            for voice in voices:
                raw = np.load(self._features_path(word, voice, version)).astype(np.float32)
                features.append(self.features.normalize(raw))
                labels += [label] * len(raw)
                names += [voice] * len(raw)
        stacked = torch.from_numpy(np.concatenate(features))
        return FeatureClips(
            stacked, torch.tensor(labels, dtype=torch.long), names, self.augmentation if augment else None
        )

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        version = _espeak_version(_espeak_program(self.program))
        split = self.split_voices()
        self.train_set = self._load(split["train"], version, augment=True)
        self.val_set = self._load(split["val"], version, augment=False)
        self.test_set = self._load(split["test"], version, augment=False) if split["test"] else self.val_set


def _safe(name: str) -> str:
    """A file-name-safe version of a word or voice."""
    return "".join(c if c.isalnum() or c in "-_+" else "_" for c in name)


class _atomic:  # noqa: N801 - used as a context manager like open()
    """Yield a temporary path beside ``path`` and move it into place on success (safe for concurrent writers)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=self.path.suffix)
        os.close(handle)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
