"""Small files of the user's own kinds, written by the tests: class folders of images and recordings, labelled CSVs."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 6, size=(40, 30)) -> Path:
    """Write ``root/<class>/<i>.png``: each class a different colour with noise, so a model can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size[1], size[0], 3), dtype=np.float32)
            base[..., index % 3] = 200
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def write_wav(path: Path, audio: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> Path:
    """Write float audio in [-1, 1] as PCM WAV with ``width`` bytes per sample."""
    frames = np.repeat(audio[:, None], channels, axis=1)
    if width == 2:
        data = (frames * 32767).astype("<i2").tobytes()
    else:
        data = (frames * (2**31 - 1)).astype("<i4").tobytes()
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(data)
    return path


def tone(hz: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_audio_folder(root: Path, per_class: int = 4, flac: bool = True) -> Path:
    """Write ``root/low/*.wav`` (200 Hz) and ``root/high/*`` (3 kHz; FLAC at 22.05 kHz when ``flac``)."""
    (root / "low").mkdir(parents=True, exist_ok=True)
    (root / "high").mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        write_wav(root / "low" / f"{i}.wav", tone(200 + 10 * i, 0.5, 16000), 16000)
        if flac:
            import soundfile

            soundfile.write(str(root / "high" / f"{i}.flac"), tone(3000 + 50 * i, 0.5, 22050), 22050)
        else:
            write_wav(root / "high" / f"{i}.wav", tone(3000 + 50 * i, 0.5, 44100), 44100, channels=2)
    return root


def write_text_csv(path: Path, per_class: int = 8) -> Path:
    """Write a CSV with columns ``review`` and ``verdict`` (good / bad) that a model can separate by words."""
    rows = ["review,verdict"]
    for i in range(per_class):
        rows.append(f"a wonderful delightful film number {i},good")
        rows.append(f'"a dull, boring film number {i}",bad')
    path.write_text("\n".join(rows) + "\n")
    return path
