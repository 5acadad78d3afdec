"""Ready LightningModules: a network with its training, validation and test steps, metrics and optimizer set-up.

What Lightning's ``Trainer`` and a config's ``model:`` section take. Each wraps a network (``self.model``, an
``nn.Module`` from timm, transformers or :mod:`lightning_peft.models`) and adapts it with HF peft when given
``peft=``. The networks themselves are built in :mod:`lightning_peft.models`, which holds no LightningModule.
"""

from lightning_peft.modules.audio_classifier import AudioClassifier
from lightning_peft.modules.causal_lm import CausalLM
from lightning_peft.modules.image_classifier import ImageClassifier
from lightning_peft.modules.text_classifier import TextClassifier

__all__ = ["AudioClassifier", "CausalLM", "ImageClassifier", "TextClassifier"]
