"""Tiny models and data shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


class TinyBlockModel(pl.LightningModule):
    """An embedding, `n_blocks` residual blocks in `self.blocks`, a final norm and a head."""

    def __init__(
        self,
        n_blocks: int = 4,
        width: int = 8,
        n_classes: int = 3,
        lr: float = 0.05,
        optimizer: str = "adamw",
        scheduler: bool = False,
        freeze_head: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)
        if freeze_head:
            self.head.requires_grad_(False)
        self.lr = lr
        self.optimizer_name = optimizer
        self.use_scheduler = scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(params, lr=self.lr, min_8bit_size=16)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr)
        if not self.use_scheduler:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return make_loader()


class ConvStack(pl.LightningModule):
    """A VGG-like stack: `n_blocks` blocks in `self.blocks` holding one convolution each, then a linear head.

    Blocks of a single layer cannot be halved by whole tensors: Half Fine-Tuning splits their channels.
    """

    def __init__(self, n_blocks: int = 4, channels: int = 6, weight_decay: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.ReLU())
            for i in range(n_blocks)
        )
        self.head = nn.Linear(channels, 3)
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=self.weight_decay)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
        return DataLoader(data, batch_size=4)


def make_loader(n: int = 48, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


# A worker started by `ddp_spawn` can abort at interpreter exit ("terminate called without an active exception": a
# gloo thread torn down after the test's work is done and saved), mostly on a busy machine. Only that failure is
# retried, up to twice; any assertion failure fails at once.
retry_spawn_teardown_abort = pytest.mark.flaky(reruns=2, only_rerun=["terminated with signal SIGABRT"])


# family: (config class, model class with the family's usual head, bare model class, defaults for the headed model,
# extra defaults). Every transformers class is named here and looked up when a model is built.
_TRANSFORMERS = {
    "bert": ("BertConfig", "BertForSequenceClassification", "BertModel", {"num_labels": 3}, {"vocab_size": 64}),
    "vit": ("ViTConfig", "ViTForImageClassification", None, {"num_labels": 3}, {"image_size": 16, "patch_size": 8}),
    "ast": ("ASTConfig", "ASTForAudioClassification", None, {"num_labels": 3}, {"num_mel_bins": 16, "max_length": 24}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaModel", {}, {"vocab_size": 64}),
    "mistral": ("MistralConfig", "MistralForCausalLM", None, {}, {"vocab_size": 64}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", None, {}, {"vocab_size": 64}),
}


def tiny_transformer(
    family: str,
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int = 64,
    bare: bool = False,
    seed: int | None = None,
    **overrides,
) -> nn.Module:
    """A tiny randomly initialised transformer of ``family``.

    Families: "bert" (BertForSequenceClassification), "vit" (ViTForImageClassification), "ast"
    (ASTForAudioClassification), "llama", "mistral", "qwen2" (*ForCausalLM) and "timm_vit" (timm's
    vit_tiny_patch16_224 reshaped). Classifiers have 3 labels; BERT and the decoders a vocabulary of 64; HF ViT
    16x16 images in 8x8 patches, AST 24 frames of 16 mel bins, timm ViT 16x16 images in 8x8 patches.
    ``intermediate`` is the MLP width (timm: ``mlp_ratio = intermediate / hidden``). ``bare`` gives the model
    without its head (BertModel, LlamaModel). ``overrides`` go to the config (timm: to ``timm.create_model``) and
    replace the defaults. With ``seed``, the global torch generator is seeded right before the weights are drawn.
    """
    if family == "timm_vit":
        import timm

        kwargs = {"img_size": 16, "patch_size": 8, "num_classes": 3, **overrides}
        if seed is not None:
            torch.manual_seed(seed)
        return timm.create_model(
            "vit_tiny_patch16_224",
            depth=layers,
            embed_dim=hidden,
            num_heads=heads,
            mlp_ratio=intermediate / hidden,
            **kwargs,
        )
    import transformers

    config_name, headed_name, bare_name, headed_defaults, defaults = _TRANSFORMERS[family]
    if bare and bare_name is None:
        raise ValueError(f"no bare model for {family!r}")
    config = getattr(transformers, config_name)(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        **{**defaults, **({} if bare else headed_defaults), **overrides},
    )
    if seed is not None:
        torch.manual_seed(seed)
    return getattr(transformers, bare_name if bare else headed_name)(config)


CONFIGS_DIR = Path(__file__).parents[1] / "configs"
_FINAL = re.compile(r"Final validation metrics after (\d+) steps: (.*)")


def run_config(config_name: str, cwd: Path, *overrides: str, timeout: int = 900) -> tuple[int, dict[str, float]]:
    """Run ``lightning-peft fit --config configs/<config_name> <overrides>`` as a user does, in ``cwd``.

    Returns the number of steps and the final validation metrics the CLI prints (fails the test on an error).
    """
    command = [shutil.which("lightning-peft"), "fit", "--config", str(CONFIGS_DIR / config_name), *overrides]
    command.append("--trainer.enable_progress_bar=false")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    found = _FINAL.search(result.stdout)
    assert found is not None, result.stdout[-2000:]
    metrics = dict(item.split("=") for item in found.group(2).split(", "))
    return int(found.group(1)), {name: float(value) for name, value in metrics.items()}
