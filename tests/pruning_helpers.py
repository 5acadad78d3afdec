"""Tiny models of every family EarlyPruning supports, and a LightningModule around them (importable by tests)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from helpers import tiny_transformer
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LORA_TARGETS = {
    "timm": ["qkv", "proj", "fc1", "fc2"],
    "bert": ["query", "key", "value", "dense"],
    "hf_vit": ["q_proj", "v_proj", "o_proj", "fc2"],
    "hf_ast": ["q_proj", "v_proj", "fc1"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}


class LlamaClassifier(nn.Module):
    """A Llama decoder (grouped-query attention) with mean pooling and a linear head."""

    def __init__(self, model: nn.Module, n_classes: int = 3) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.config.hidden_size, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(input_ids=x).last_hidden_state.mean(dim=1))


class Logits(nn.Module):
    """Calls an HF model with one positional input and returns its logits."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.key: x}).logits


def build(family: str, lora: bool = False, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised network of ``family`` (3 classes), optionally with LoRA (non-zero B)."""
    torch.manual_seed(seed)
    size = dict(layers=2, hidden=48, heads=6, intermediate=96)
    if family == "timm":
        net = tiny_transformer("timm_vit", layers=2, hidden=48, heads=6, intermediate=192, img_size=32)
    elif family == "timm_ast":
        from lightning_peft.models import build_timm_ast

        net = build_timm_ast(
            "vit_tiny_patch16_224",
            num_classes=3,
            num_mel_bins=32,
            target_length=32,
            fstride=16,
            tstride=16,
            backbone_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 6},
        )
    elif family == "bert":
        bert = tiny_transformer(
            "bert",
            **size,
            vocab_size=64,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        net = Logits(bert, "input_ids")
    elif family == "hf_vit":
        vit = tiny_transformer("vit", **size, image_size=16, patch_size=8, hidden_dropout_prob=0.0)
        net = Logits(vit, "pixel_values")
    elif family == "hf_ast":
        ast = tiny_transformer("ast", **size, num_mel_bins=32, max_length=32, hidden_dropout_prob=0.0)
        net = Logits(ast, "input_values")
    elif family == "llama":
        llama = tiny_transformer(
            "llama",
            layers=2,
            hidden=64,
            heads=8,
            intermediate=96,
            num_key_value_heads=4,
            vocab_size=64,
            max_position_embeddings=32,
            bare=True,
        )
        net = LlamaClassifier(llama)
    else:
        raise ValueError(family)
    if lora:
        base = family if family != "timm_ast" else "timm"
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[base], init_lora_weights=False)
        net = get_peft_model(net, config)
    return net.eval()


def sample_input(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family in ("timm",):
        return torch.randn(batch, 3, 32, 32, generator=g)
    if family == "hf_vit":
        return torch.randn(batch, 3, 16, 16, generator=g)
    if family in ("timm_ast", "hf_ast"):
        return torch.randn(batch, 32, 32, generator=g)
    return torch.randint(0, 64, (batch, 8), generator=g)


class PruneModule(pl.LightningModule):
    """Classifies random data with a tiny network of ``family``; AdamW over all trainable parameters."""

    def __init__(self, family: str = "bert", lora: bool = True, lr: float = 1e-2, scheduler: bool = False) -> None:
        super().__init__()
        self.family = family
        self.net = build(family, lora=lora).train()
        self.lr = lr
        self.use_scheduler = scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        x = torch.cat([sample_input(self.family, batch=4, seed=i) for i in range(6)])
        y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
