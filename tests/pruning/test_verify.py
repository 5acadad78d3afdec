import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import EarlyPruning
from lightning_peft.layout import AttentionSpec, MlpSpec, find_blocks, register_layout
from lightning_peft.pruning import find_sites
from lightning_peft.pruning.verify import SiteVerifier

WIDTH = 16


class FixedWidthBlock(nn.Module):
    """Attention whose forward reshapes the heads' output to a hard-coded width: fewer heads cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.n_heads = 4
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.up, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t(x).view(b, s, self.n_heads, -1).transpose(1, 2) for t in (self.q, self.k, self.v))
        heads = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        x = x + self.o(heads.transpose(1, 2).reshape(b, s, WIDTH))
        return x + self.down(torch.relu(self.up(x)))


register_layout(
    FixedWidthBlock,
    attention=[AttentionSpec("", q="q", k="k", v="v", o="o")],
    mlp=[MlpSpec(up=["up"], down="down")],
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(FixedWidthBlock() for _ in range(3))
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def test_verifier_leaves_out_what_a_pruned_copy_cannot_compute():
    net = Net()
    stack, sites = find_blocks(net), find_sites(net)
    assert len(sites.attention) == 3 and len(sites.mlp) == 3  # the declared layout reads as prunable
    verifier = SiteVerifier(stack.names, stack.blocks, sites)
    verifier.start()
    net(torch.randn(2, 5, WIDTH))
    verifier.stop()
    excluded = verifier.verify()
    assert set(excluded) == {"blocks.0", "blocks.1", "blocks.2"}  # the attention of every block, not the MLPs
    assert all("FixedWidthBlock fails" in reason for reason in excluded.values())
    # the model itself is untouched
    assert net.blocks[0].q.out_features == WIDTH and net.blocks[0].up.out_features == 2 * WIDTH


def test_verifier_passes_a_block_that_prunes_exactly():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, img_size=32)
    stack = find_blocks(vit)
    verifier = SiteVerifier(stack.names, stack.blocks, find_sites(vit))
    verifier.start()
    vit(torch.randn(1, 3, 32, 32))
    verifier.stop()
    assert verifier.verify() == {}


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(24, 5, WIDTH, generator=g), torch.randint(0, 2, (24,))), 4)


def test_early_pruning_warns_and_prunes_only_what_verifies(tmp_path):
    module = Module()
    pruning = EarlyPruning(estimation_steps=2, head_ratio=0.5, neuron_ratio=0.5, peft_module_ratio=0, peft_rank_ratio=0)
    with pytest.warns(UserWarning, match=r"leaves 3 attention / MLP site\(s\) whole.*FixedWidthBlock fails"):
        pl.Trainer(callbacks=[pruning], max_steps=4, **trainer_kwargs(tmp_path)).fit(module)
    assert not pruning.plan.heads  # the attention stayed whole...
    assert pruning.plan.neurons and module.net.blocks[0].up.out_features < 2 * WIDTH  # ...the MLPs were pruned
