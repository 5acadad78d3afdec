from lightning_peft.modules.audio_classifier import AudioClassifier
from lightning_peft.modules.causal_lm import CausalLM
from lightning_peft.modules.image_classifier import ImageClassifier
from lightning_peft.modules.text_classifier import TextClassifier

__all__ = ["AudioClassifier", "CausalLM", "ImageClassifier", "TextClassifier"]
