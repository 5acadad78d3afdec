"""A Hugging Face sequence classifier as a LightningModule, optionally adapted with HF peft."""

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from transformers import AutoModelForSequenceClassification

from lightning_peft._validation import check_int
from lightning_peft.models.pretrained import load_pretrained
from lightning_peft.modules._base import ClassifierModule, checked_model_kwargs
from lightning_peft.modules._peft import apply_peft, build_peft_config

_RESERVED_MODEL_KWARGS = ("num_labels", "pretrained_model_name_or_path")


class TextClassifier(ClassifierModule):
    """Classify text with a Hugging Face encoder, fully fine-tuned or through an HF peft adapter.

    The network is ``AutoModelForSequenceClassification.from_pretrained(...)``, stored as ``self.model`` (a
    ``peft.PeftModel`` when ``peft`` is given). Model names with an offline copy (see
    :func:`lightning_peft.models.resolve_pretrained`) load from that copy. The optimizer is built in
    ``configure_optimizers`` over every parameter that requires gradients at that moment. Batches are dicts with
    ``input_ids``, ``attention_mask`` and ``labels`` (other keys, such as ``token_type_ids``, go to the model too).

    Args:
        model: A local folder or hub name, e.g. ``"sentence-transformers/all-MiniLM-L6-v2"``.
        num_labels: Number of classes; a new classification head of this size is created when needed.
        peft: An HF peft config as a dict, e.g. ``{"peft_type": "LORA", "r": 8, "target_modules": ["query",
            "value"]}``, or a ``peft.PeftConfig``. Without a ``task_type`` it gets ``SEQ_CLS``, which keeps the
            classification head trainable.
        optimizer: Builds the optimizer from the trainable parameters (AdamW, lr 1e-3 by default).
        scheduler: Builds a learning-rate scheduler from the optimizer; stepped after every optimizer step.
        model_kwargs: More arguments for ``from_pretrained``, e.g. ``{"hidden_dropout_prob": 0.0}``.

    Raises:
        ValueError: If ``num_labels`` is below 2, ``model_kwargs`` repeats an argument of this class, or ``peft`` is
            not a valid config.
        OSError: If the model can be found neither locally nor on the hub.

    Example::

        >>> import torch
        >>> from lightning_peft.modules import TextClassifier
        >>> module = TextClassifier("sentence-transformers/all-MiniLM-L6-v2", num_labels=3,
        ...                         peft={"peft_type": "LORA", "r": 4, "target_modules": ["query", "value"]})
        >>> input_ids = torch.tensor([[101, 2307, 102]])
        >>> module(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        model: str,
        num_labels: int,
        peft: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_int(
            "num_labels",
            num_labels,
            2,
            "pass the number of classes of your data, e.g. `num_labels=3` for TweetSentiment.",
            what="one output per class",
        )
        model_kwargs = checked_model_kwargs("TextClassifier", model_kwargs, _RESERVED_MODEL_KWARGS)
        peft_config = build_peft_config(peft, default_task_type="SEQ_CLS")
        super().__init__(num_classes=num_labels, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

        # Local folder, offline package copy or HF cache; a clear error within seconds when none has it.
        network = load_pretrained(
            AutoModelForSequenceClassification, model, "model", num_labels=num_labels, **model_kwargs
        )
        if peft_config is not None:
            network = apply_peft(network, peft_config)
        # `from_pretrained` returns eval mode, and the Trainer keeps the mode it finds: switch dropout back on.
        self.model = network.train()

    def forward(self, **inputs: Tensor) -> Tensor:
        """Return the logits of a tokenised batch (``input_ids``, ``attention_mask``, ...; no ``labels``)."""
        return self.model(**inputs).logits

    def logits_and_labels(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Return ``(logits, labels)`` of a dict batch; the loss is computed by the caller, not by the model."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self(**inputs), batch["labels"]
