"""A Hugging Face causal language model as a LightningModule: next-token loss and perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_peft._validation import check_int
from lightning_peft.models.pretrained import load_pretrained
from lightning_peft.modules._base import OptimizedModule, checked_model_kwargs
from lightning_peft.modules._chunked_loss import chunked_next_token_loss
from lightning_peft.modules._peft import apply_peft, build_peft_config

_RESERVED_MODEL_KWARGS = ("pretrained_model_name_or_path", "config")
# Config fields of architectures that transform the logits after the head (softcapping, scaling): the chunked loss
# applies the head alone, so it refuses them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class CausalLM(OptimizedModule):
    """Train a Hugging Face causal LM (Llama, Mistral, Qwen2, GPT-2, ...) on next-token prediction.

    The network comes from a local folder or hub name (``model``, ``AutoModelForCausalLM.from_pretrained``) or is
    built with random weights from a config dict (``config``: ``AutoConfig.for_model(**config)``); it is stored as
    ``self.model`` (a ``peft.PeftModel`` when ``peft`` is given). Batches are dicts with ``input_ids``, optionally
    ``attention_mask``, and ``labels`` (``-100`` marks positions without a target); the model shifts the labels, so
    the loss is the mean cross-entropy of predicting each next token. It logs ``train/loss``, ``val/loss`` and
    ``val/ppl`` (``exp`` of the token-weighted mean validation loss over the epoch; ``test/...`` likewise). The
    optimizer is built in ``configure_optimizers`` over every parameter that requires gradients at that moment, so
    layer-sampling callbacks such as LISA find all of them in it.

    With ``loss_chunk_size``, the loss never builds the whole ``tokens x vocab`` logits: the backbone's hidden states
    go through the head and the cross-entropy ``loss_chunk_size`` tokens at a time, each chunk recomputed in backward
    (``torch.utils.checkpoint``), so the logits and their gradient are held one chunk at a time -- at a 128k
    vocabulary, 4096 tokens of float32 logits are 2 GiB, and their gradient as much again. The loss and gradients
    are those of the model's own loss (labels shifted, ``-100`` ignored, float32 logits) within float tolerance; the
    price is one more head projection per step (about ``2 x tokens x hidden x vocab`` FLOPs, a few percent of a
    step). Off by default: the model's own loss runs exactly as transformers computes it, and at small vocabularies
    (the tiny test models, GPT-2's 50k at short sequences) the logits are no larger than one block's activations;
    turn it on for large vocabularies (``loss_chunk_size: 1024`` holds 1024 x vocab logits at a time).

    Args:
        model: A local folder (``config.json`` + weights) or hub name; exclusive with ``config``.
        config: Config fields with a ``model_type``, e.g. ``{"model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 257}``.
        peft: An HF peft config as a dict (e.g. ``{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj",
            "v_proj"]}``) or a ``peft.PeftConfig``; without a ``task_type`` it gets ``CAUSAL_LM``.
        optimizer: Builds the optimizer from the trainable parameters (AdamW, lr 1e-3 by default).
        scheduler: Builds a learning-rate scheduler from the optimizer; stepped after every optimizer step.
        model_kwargs: More arguments for ``from_pretrained`` / ``from_config`` (e.g. ``{"torch_dtype": "bfloat16"}``).
        loss_chunk_size: Tokens per chunk of the chunked loss (see above); ``None`` or ``0``: the model's own loss.

    Raises:
        ValueError: If neither or both of ``model`` and ``config`` are given, ``config`` has no known
            ``model_type``, ``model_kwargs`` repeats an argument of this class, ``peft`` is not a valid config, or
            ``loss_chunk_size`` is negative or given for a model it cannot chunk (logit softcapping or scaling, no
            separate head, a prompt-learning peft method).
        OSError: If ``model`` can be loaded neither from disk nor from the hub.

    Example::

        >>> import torch
        >>> from lightning_peft.modules import CausalLM
        >>> lm = CausalLM(config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
        ...                       "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100})
        >>> ids = torch.randint(0, 100, (2, 16))
        >>> lm(input_ids=ids).shape
        torch.Size([2, 16, 100])
        >>> bool(lm.compute_loss({"input_ids": ids, "labels": ids}) > 0)
        True
    """

    def __init__(
        self,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        peft: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        model_kwargs: dict[str, Any] | None = None,
        loss_chunk_size: int | None = None,
    ) -> None:
        if (model is None) == (config is None):
            raise ValueError(
                f"Give exactly one of `model` (a folder or hub name) and `config` (config fields with a model_type),"
                f" got model={model!r} and config={config!r}."
                " HINT: e.g. config={'model_type': 'llama', 'hidden_size': 64, 'num_hidden_layers': 4}."
            )
        model_kwargs = checked_model_kwargs("CausalLM", model_kwargs, _RESERVED_MODEL_KWARGS)
        check_int(
            "loss_chunk_size",
            loss_chunk_size,
            0,
            "give the tokens per chunk (e.g. 1024), or None / 0 for the model's own loss.",
            "tokens per chunk of the loss",
            allow_none=True,
        )
        peft_config = build_peft_config(peft, default_task_type="CAUSAL_LM")
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])

        from transformers import AutoConfig, AutoModelForCausalLM

        if config is not None:
            fields = dict(config)
            model_type = fields.pop("model_type", None)
            try:
                hf_config = AutoConfig.for_model(model_type, **fields)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"`config` does not describe a Hugging Face model: {err}"
                    " HINT: name the architecture in a `model_type` key, e.g. 'llama', 'mistral', 'qwen2', 'gpt2'."
                ) from err
            network = AutoModelForCausalLM.from_config(hf_config, **model_kwargs)
        else:
            # Local folder, offline package copy or HF cache; a clear error within seconds when none has it.
            network = load_pretrained(AutoModelForCausalLM, model, "model", **model_kwargs)
        if peft_config is not None:
            network = apply_peft(network, peft_config)
        # `from_pretrained` returns eval mode, and the Trainer keeps the mode it finds: switch dropout back on.
        self.model = network.train()
        self.loss_chunk_size = loss_chunk_size or None
        if self.loss_chunk_size is not None:
            self._check_chunkable()
        self.val_nll = MeanMetric()
        self.test_nll = MeanMetric()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Return the next-token logits ``(B, T, vocab)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The mean next-token cross-entropy of a batch, without logging (IST scores layers with it)."""
        if self.loss_chunk_size is not None:
            network = self._transformers_model()
            hidden = network.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0]
            return chunked_next_token_loss(
                hidden, network.get_output_embeddings(), batch["labels"], self.loss_chunk_size
            )
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs).loss

    def _transformers_model(self) -> Any:
        """The transformers model inside ``self.model`` (a peft model's base model, its adapters injected)."""
        get_base_model = getattr(self.model, "get_base_model", None)
        return get_base_model() if callable(get_base_model) else self.model

    def _check_chunkable(self) -> None:
        network = self._transformers_model()
        config = network.config
        transforms = [f for f in _LOGIT_TRANSFORMS if getattr(config, f, None) not in (None, 1, 1.0)]
        peft_configs = getattr(self.model, "peft_config", {})
        prompt = [name for name, c in peft_configs.items() if getattr(c, "is_prompt_learning", False)]
        problem = None
        if transforms:
            problem = f"{type(network).__name__} transforms its logits after the head ({transforms})"
        elif network.get_output_embeddings() is None or network.base_model is network:
            problem = f"{type(network).__name__} has no separate backbone and output head"
        elif prompt:
            problem = f"the prompt-learning peft adapter {prompt} adds virtual tokens in the peft model's forward"
        if problem is not None:
            raise ValueError(
                f"`loss_chunk_size={self.loss_chunk_size}` cannot be used here: {problem}, which the chunked loss"
                " (backbone, then the head alone) would leave out. HINT: set `loss_chunk_size: null` to use the"
                " model's own loss."
            )

    @staticmethod
    def _n_targets(batch: dict[str, Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, Tensor], metric: MeanMetric, stage: str) -> None:
        loss = self.compute_loss(batch)
        metric.update(loss.detach(), weight=self._n_targets(batch))
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_nll, "val")

    @override
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The next-token logits of a batch (its ``labels`` are ignored)."""
        return self(batch["input_ids"], batch.get("attention_mask"))

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_nll, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        self.log("val/ppl", math.exp(min(float(self.val_nll.compute()), 50.0)), prog_bar=True)
        self.val_nll.reset()

    @override
    def on_test_epoch_end(self) -> None:
        self.log("test/ppl", math.exp(min(float(self.test_nll.compute()), 50.0)))
        self.test_nll.reset()
