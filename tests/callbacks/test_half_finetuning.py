from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    ConvStack,
    TinyBlockModel,
    changed,
    retry_spawn_teardown_abort,
    snapshot,
    tiny_transformer,
    trainer_kwargs,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_peft.callbacks import LISA, HalfFineTuning
from lightning_peft.layout import find_blocks
from lightning_peft.trainable import TrainableSetController

OUTSIDE = {"embed.weight", "embed.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}


pytestmark = pytest.mark.usefixtures("one_thread")


class Holder(pl.LightningModule):
    """Holds any network; only the selection is exercised (no training step)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.model = network


def _vit():
    return tiny_transformer("timm_vit", layers=4, intermediate=128, img_size=32)


def _bert():
    return tiny_transformer("bert", layers=4, vocab_size=100)


def _minilm_shape():
    # all-MiniLM-L6-v2's layout (6 BERT layers), tiny widths
    return tiny_transformer("bert", layers=6, hidden=24, intermediate=48, vocab_size=100, bare=True)


def _llama():
    return tiny_transformer("llama", layers=4, vocab_size=100, num_key_value_heads=2)


def _ast():
    return tiny_transformer("ast", layers=4, max_length=16)


class SmallCNN(nn.Module):
    """The layout of the MNIST CNN of digit-recognizer-py (no repeated blocks), narrower."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.fc_layers(self.conv_layers(x).flatten(1))


class CNNModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = SmallCNN()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(
            torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        )
        return torch.utils.data.DataLoader(data, batch_size=8)


def _draw(hft, module, tmp_path):
    """Run the callback's set-up and first draw as `fit` would, without training."""
    trainer = pl.Trainer(**trainer_kwargs(tmp_path))
    hft.setup(trainer, module, "fit")
    hft.on_fit_start(trainer, module)
    return trainer


def _block_stats(module, selected):
    stack = find_blocks(module)
    named = dict(module.named_parameters())
    total = sum(named[p].numel() for i in range(len(stack)) for p in stack.block_parameter_names(i))
    trained = sum(named[p].numel() for p in selected)
    largest = max(named[p].numel() for i in range(len(stack)) for u in stack.units(i) for p in u.parameters)
    return stack, total, trained, largest


# --------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.0}, r"`ratio` must be a number strictly between 0 and 1.*got 0.0.*HINT"),
        ({"ratio": 1}, r"`ratio` must be a number strictly between 0 and 1"),
        ({"ratio": "half"}, r"`ratio` must be a number"),
        ({"granularity": "block"}, r"`granularity` must be one of \['category', 'layer', 'model'\], got 'block'"),
        ({"reselect_every_n_epochs": 0}, r"`reselect_every_n_epochs` must be None or an integer >= 1, got 0"),
        ({"reset": "always"}, r"`reset` must be one of \[None, 'on_reselect', 'on_train_end'\], got 'always'"),
        ({"seed": 1.5}, r"`seed` must be None or an integer"),
    ],
)
def test_misconfiguration_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HalfFineTuning(**kwargs)


def test_layer_granularity_that_trains_no_block(tmp_path):
    trainer = pl.Trainer(
        callbacks=[HalfFineTuning(ratio=0.1, granularity="layer")], max_steps=1, **trainer_kwargs(tmp_path)
    )
    with pytest.raises(ValueError, match=r"trains round\(0.1 x 4\) = 0 of the model's 4 blocks.*HINT"):
        trainer.fit(TinyBlockModel())


def test_wrong_layers_path(tmp_path):
    trainer = pl.Trainer(callbacks=[HalfFineTuning(layers="encoder.layer")], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"`layers='encoder.layer'`.*Candidate container paths"):
        trainer.fit(TinyBlockModel())


# ------------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("build", [_vit, _bert, _minilm_shape, _llama, _ast])
@pytest.mark.parametrize("granularity", ["category", "layer", "model"])
def test_trained_fraction_is_the_ratio_within_one_matrix(build, granularity, tmp_path):
    module = Holder(build())
    hft = HalfFineTuning(granularity=granularity, seed=3)
    _draw(hft, module, tmp_path)
    stack, total, trained, largest = _block_stats(module, hft.selected)
    assert abs(trained - 0.5 * total) <= largest
    outside = set(stack.outside_parameter_names())
    assert outside <= hft.trainable_parameters(None, module, 0)  # embeddings, final norm and head train
    assert not outside & set(hft.selected)


@pytest.mark.parametrize("build", [_bert, _minilm_shape, _llama, _ast, _vit])
def test_category_granularity_halves_every_category_of_every_block(build, tmp_path):
    module = Holder(build())
    hft = HalfFineTuning(seed=0)
    _draw(hft, module, tmp_path)
    stack = find_blocks(module)
    chosen = set(hft.selected)
    mlp_counts, fused = [], Counter()
    for index in range(len(stack)):
        units = stack.units(index)
        trained = [u for u in units if set(u.parameters) <= chosen]
        assert all(set(u.parameters).isdisjoint(chosen) for u in units if u not in trained)  # units whole
        by_category = Counter(u.category for u in trained)
        assert by_category["norm"] == 1  # one of the two norms
        roles = {u.role for u in units}
        if "qkv" in roles:  # timm: fused qkv is one unit; each block trains qkv or the output projection
            assert by_category["attention"] == 1
            fused.update(u.role for u in trained if u.category == "attention")
        else:
            assert by_category["attention"] == 2  # two of q, k, v, o
        mlp_counts.append(by_category["mlp"])
    n_mlp = sum(u.category == "mlp" for u in stack.units(0))
    if n_mlp == 3:  # Llama's gate/up/down: 2 and 1 alternate, half over the stack
        assert sorted(mlp_counts) == [1, 1, 2, 2]
    else:
        assert mlp_counts == [1] * len(stack)
    if fused:
        assert fused == Counter({"qkv": 2, "o": 2})


def test_only_outside_and_selected_change_and_frozen_halves_stay(tmp_path):
    model = TinyBlockModel()
    before = snapshot(model)
    hft = HalfFineTuning(seed=1)
    trainer = pl.Trainer(callbacks=[hft], max_steps=6, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    assert changed(before, model) == OUTSIDE | set(hft.selected)
    frozen = hft.frozen_parameter_names()
    assert frozen and all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in frozen)
    expected = sum(p.numel() for n, p in model.named_parameters() if n in OUTSIDE | set(hft.selected))
    assert trainer.callback_metrics["trainable_params"].item() == expected
    assert all(p.requires_grad for p in model.parameters())


def test_lisa_and_hft_train_only_the_intersection(tmp_path):
    model = TinyBlockModel()
    before = snapshot(model)
    lisa, hft = LISA(n_layers=2, interval=100, seed=0), HalfFineTuning(seed=2)
    trainer = pl.Trainer(callbacks=[lisa, hft], max_steps=5, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    sampled = {n for n in hft.selected if int(n.split(".")[1]) in lisa.sampled}
    assert sampled and sampled != set(hft.selected)
    assert changed(before, model) == OUTSIDE | sampled


def test_every_fit_is_a_new_stage_with_a_new_reproducible_draw(tmp_path):
    draws = []
    for _ in range(2):
        hft = HalfFineTuning(seed=5)
        model = TinyBlockModel()
        stages = []
        for _ in range(3):
            pl.Trainer(callbacks=[hft], max_steps=1, **trainer_kwargs(tmp_path)).fit(model)
            stages.append(tuple(hft.selected))
        assert hft.stage == 3
        draws.append(stages)
    assert draws[0] == draws[1]  # same seed, same sequence of stages
    assert len(set(draws[0])) > 1  # and the stages differ


def test_reselect_every_n_epochs(tmp_path):
    hft = HalfFineTuning(reselect_every_n_epochs=2, seed=0)
    model = TinyBlockModel()
    trainer = pl.Trainer(callbacks=[hft], max_epochs=5, limit_train_batches=2, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    assert [h["epoch"] for h in hft.history] == [0, 2, 4]
    assert hft.stage == 1


# --------------------------------------------------------------------------------------------------- reset


@pytest.mark.parametrize("reset", ["on_train_end", "on_reselect"])
def test_reset_restores_exactly_the_pretrained_values(reset, tmp_path):
    model = TinyBlockModel()
    pretrained = snapshot(model)
    hft = HalfFineTuning(reselect_every_n_epochs=1, reset=reset, seed=0)
    trainer = pl.Trainer(callbacks=[hft], max_epochs=4, limit_train_batches=3, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    params = dict(model.named_parameters())
    frozen = hft.frozen_parameter_names()
    assert all(torch.equal(params[n], pretrained[n]) for n in frozen)
    assert all(not torch.equal(params[n], pretrained[n]) for n in hft.selected)
    # the snapshot is the first fit's: a second stage resets to it, not to the values at its own start
    trainer = pl.Trainer(callbacks=[hft], max_epochs=2, limit_train_batches=3, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    assert all(torch.equal(params[n], pretrained[n]) for n in hft.frozen_parameter_names())


def test_without_reset_trained_values_are_kept(tmp_path):
    model = TinyBlockModel()
    pretrained = snapshot(model)
    hft = HalfFineTuning(reselect_every_n_epochs=1, seed=0)
    trainer = pl.Trainer(callbacks=[hft], max_epochs=4, limit_train_batches=3, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    assert hft.state_dict()["pretrained"] is None  # no copy taken without reset
    assert len(changed(pretrained, model)) > len(OUTSIDE | set(hft.selected))  # earlier halves keep their training


def test_reset_copies_only_what_may_train(tmp_path):
    model = TinyBlockModel()
    model.blocks[0].requires_grad_(False)  # frozen by the user (as peft freezes a base model): never copied
    before = snapshot(model)
    hft = HalfFineTuning(reset="on_train_end", seed=0)
    pl.Trainer(callbacks=[hft], max_steps=2, **trainer_kwargs(tmp_path)).fit(model)
    copied = set(hft.state_dict()["pretrained"])
    assert copied and not any(n.startswith("blocks.0.") for n in copied)
    assert all(n.startswith("blocks.") for n in copied)
    assert not any(n.startswith("blocks.0.") for n in changed(before, model))


# -------------------------------------------------------------------------------------------------- resume


def _fit(model, hft, tmp_path, max_epochs, ckpt_path=None, checkpoint=False):
    callbacks = [hft]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0))
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=checkpoint)
    trainer = pl.Trainer(callbacks=callbacks, max_epochs=max_epochs, limit_train_batches=3, **kwargs)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def test_resume_continues_the_stage_and_keeps_the_pretrained_values(tmp_path):
    torch.manual_seed(0)
    reference = TinyBlockModel()
    pretrained = snapshot(reference)
    uninterrupted = HalfFineTuning(reselect_every_n_epochs=2, reset="on_reselect", seed=4)
    _fit(reference, uninterrupted, tmp_path / "a", max_epochs=5)

    torch.manual_seed(0)
    first = TinyBlockModel()
    _fit(
        first,
        HalfFineTuning(reselect_every_n_epochs=2, reset="on_reselect", seed=4),
        tmp_path / "b",
        3,
        checkpoint=True,
    )
    torch.manual_seed(1)  # other weights: parameters and pre-trained values must come from the checkpoint
    resumed_model = TinyBlockModel()
    resumed = HalfFineTuning(reselect_every_n_epochs=2, reset="on_reselect", seed=99)
    _fit(resumed_model, resumed, tmp_path / "b", 5, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))

    assert resumed.stage == uninterrupted.stage == 1
    assert resumed.history == uninterrupted.history
    assert resumed.selected == uninterrupted.selected
    assert all(torch.equal(resumed._pretrained[n], pretrained[n]) for n in resumed._pretrained)
    final = dict(resumed_model.named_parameters())
    assert all(torch.equal(final[n], p) for n, p in reference.named_parameters())


# ---------------------------------------------------------------------------------- models without a stack


def test_resume_with_channel_halves_matches_the_uninterrupted_run(tmp_path):
    def run(path, max_epochs, ckpt_path=None, checkpoint=False):
        torch.manual_seed(0)
        module = ConvStack()
        hft = HalfFineTuning(reselect_every_n_epochs=2, reset="on_reselect", seed=4)
        callbacks = [hft]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=path / "ckpt", save_last=True, save_top_k=0))
        kwargs = trainer_kwargs(path, enable_checkpointing=checkpoint)
        pl.Trainer(callbacks=callbacks, max_epochs=max_epochs, **kwargs).fit(module, ckpt_path=ckpt_path)
        return module, hft

    reference, uninterrupted = run(tmp_path / "a", 4)
    run(tmp_path / "b", 3, checkpoint=True)
    resumed_module, resumed = run(tmp_path / "b", 4, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed.history == uninterrupted.history and len(resumed.history) == 2
    assert resumed.masks.keys() == uninterrupted.masks.keys()
    assert all(torch.equal(resumed.masks[n], uninterrupted.masks[n]) for n in resumed.masks)
    final = dict(resumed_module.named_parameters())
    assert all(torch.equal(final[n], p) for n, p in reference.named_parameters())


def test_cnn_without_block_stack_trains_half_of_each_layers_channels(tmp_path):
    module = CNNModule()
    before = snapshot(module)
    hft = HalfFineTuning(seed=0)
    trainer = pl.Trainer(callbacks=[hft], max_steps=4, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    after = dict(module.named_parameters())
    hidden = ["model.conv_layers.0", "model.conv_layers.3", "model.fc_layers.0"]
    assert sorted(hft.masks) == sorted(f"{m}.{p}" for m in hidden for p in ("weight", "bias"))
    for name, mask in hft.masks.items():
        assert mask.sum() == mask.numel() // 2
        moved = (after[name] != before[name]).reshape(mask.numel(), -1).any(dim=1)
        assert torch.equal(moved, mask)  # frozen rows untouched despite weight decay, trained rows move
    head = ["model.fc_layers.2.weight", "model.fc_layers.2.bias"]
    assert all(not torch.equal(after[n], before[n]) for n in head)


def test_cnn_reset_restores_frozen_rows(tmp_path):
    module = CNNModule()
    pretrained = snapshot(module)
    hft = HalfFineTuning(reselect_every_n_epochs=1, reset="on_train_end", seed=0)
    trainer = pl.Trainer(callbacks=[hft], max_epochs=3, limit_train_batches=2, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    after = dict(module.named_parameters())
    for name, mask in hft.masks.items():
        frozen = ~mask
        assert torch.equal(after[name][frozen], pretrained[name][frozen])
        assert not torch.equal(after[name][mask], pretrained[name][mask])


@pytest.mark.parametrize("granularity", ["layer", "model"])
def test_cnn_layer_and_model_granularities_choose_whole_layers(granularity, tmp_path):
    module = CNNModule()
    hft = HalfFineTuning(granularity=granularity, seed=0)
    _draw(hft, module, tmp_path)
    assert not hft.masks
    hidden = {"model.conv_layers.0", "model.conv_layers.3", "model.fc_layers.0"}
    layers = {n.rsplit(".", 1)[0] for n in hft.selected}
    assert layers and layers < hidden
    assert "model.fc_layers.2.weight" in hft.trainable_parameters(None, module, 0)


class HeadFirstModule(CNNModule):
    """A stackless model whose classifier is registered before its feature layers."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.classifier = nn.Linear(8, 3)
        self.model.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh())


def test_a_stackless_model_keeps_the_head_the_layout_registry_finds(tmp_path):
    hft = HalfFineTuning(granularity="layer", seed=0)
    _draw(hft, HeadFirstModule(), tmp_path)
    assert hft._outside == ["model.classifier.weight", "model.classifier.bias"]  # not the last-registered layer
    assert {n.rsplit(".", 1)[0] for n in hft.selected} < {"model.features.1", "model.features.3"}


class EveryStep(pl.Callback):
    """Records every step: parameters before and after it, LISA's blocks, HFT's masks and the controller's."""

    def __init__(self, lisa, hft):
        self.lisa, self.hft = lisa, hft
        self.start, self.before, self.records = None, None, []

    def on_train_start(self, trainer, pl_module):
        self.start = snapshot(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = snapshot(pl_module)  # after any reset of this epoch's draw

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        controller = TrainableSetController.of(trainer)
        self.records.append(
            (self.before, snapshot(pl_module), set(self.lisa.sampled), dict(self.hft.masks), controller.row_masks)
        )


def test_lisa_and_channel_halves_of_single_layer_blocks_compose_through_the_controller(tmp_path):
    module = ConvStack()  # blocks of one convolution each: HFT splits channels; AdamW with weight decay 0.1
    lisa = LISA(n_layers=2, interval=3, seed=0, plot=False)
    hft = HalfFineTuning(reselect_every_n_epochs=1, reset="on_reselect", seed=1)
    record = EveryStep(lisa, hft)
    trainer = pl.Trainer(callbacks=[lisa, hft, record], max_epochs=3, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    assert [h["epoch"] for h in hft.history] == [0, 1, 2]
    assert len({tuple(sorted(r[2])) for r in record.records}) > 1  # LISA drew other blocks
    draws = {tuple(torch.cat([m for _, m in sorted(r[3].items())]).tolist()) for r in record.records}
    assert len(draws) == 3  # and HFT other channels
    for step, (before, after, sampled, masks, applied) in enumerate(record.records):
        for index in range(len(module.blocks)):
            names = [f"blocks.{index}.0.weight", f"blocks.{index}.0.bias"]
            for name in names:
                if index not in sampled:  # unsampled: frozen whole, nothing moves
                    assert name not in applied
                    assert torch.equal(after[name], before[name]), (step, name)
                    continue
                assert torch.equal(applied[name], masks[name])
                assert torch.equal((after[name] != before[name]).reshape(len(masks[name]), -1).any(1), masks[name])
                frozen = ~masks[name]  # frozen rows hold the fit-start (pre-trained) values, across draws
                assert torch.equal(after[name][frozen], record.start[name][frozen]), (step, name)
        assert not torch.equal(after["head.weight"], before["head.weight"])
    assert all(p.requires_grad for p in module.parameters())


def test_plan_and_preview_describe_the_draw(tmp_path):
    module = CNNModule()
    hft = HalfFineTuning(seed=3)
    with pytest.raises(ValueError, match=r"no selection yet.*HINT"):
        hft.plan()
    preview = hft.preview(module)
    assert hft.selected is None  # the callback itself is untouched
    assert preview.channels and preview.outside == ("model.fc_layers.2.weight", "model.fc_layers.2.bias")
    assert len(preview.blocks) == 3 and set(preview.masks) == set(preview.selected)
    _draw(hft, module, tmp_path)  # a fit's first draw with the same seed is the preview
    plan = hft.plan()
    assert plan.selected == preview.selected
    assert all(torch.equal(plan.masks[n], preview.masks[n]) for n in plan.masks)
    blocks = HalfFineTuning(seed=3).preview(TinyBlockModel())
    assert not blocks.channels and not blocks.masks and len(blocks.blocks) == 4


def test_works_through_a_real_fit_on_a_tiny_vit(tmp_path):
    class ViTModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _vit()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    module = ViTModule()
    before = snapshot(module)
    hft = HalfFineTuning(seed=0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
    )
    trainer = pl.Trainer(callbacks=[hft], max_steps=2, **trainer_kwargs(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    moved = changed(before, module)
    blocks = {n for n in moved if n.startswith("model.blocks.")}
    assert blocks == set(hft.selected)


# ------------------------------------------------------------------------------------------------------ DDP


class RankDump(pl.Callback):
    def __init__(self, hft, path):
        self.hft = hft
        self.path = path

    def on_train_end(self, trainer, pl_module):
        state = {"history": self.hft.history, "selected": self.hft.selected, "weights": snapshot(pl_module)}
        state["masks"] = self.hft.masks
        torch.save(state, self.path / f"rank{trainer.global_rank}.pt")


@retry_spawn_teardown_abort
@pytest.mark.slow
def test_ddp_ranks_draw_the_same_halves_and_stay_identical(tmp_path):
    hft = HalfFineTuning(reselect_every_n_epochs=1, reset="on_reselect")  # no seed: ranks must still agree
    trainer = pl.Trainer(
        callbacks=[hft, RankDump(hft, tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=3, limit_train_batches=3),
    )
    trainer.fit(TinyBlockModel())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["selected"] == ranks[1]["selected"]
    assert len(ranks[0]["history"]) == 3
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(weight, ranks[1]["weights"][name], rtol=0, atol=0, msg=name)


@retry_spawn_teardown_abort
@pytest.mark.slow
def test_ddp_ranks_keep_the_same_channel_halves_and_frozen_rows(tmp_path):
    hft = HalfFineTuning(reselect_every_n_epochs=1, reset="on_reselect")  # channel halves of a VGG-like stack
    module = ConvStack()
    start = snapshot(module)
    trainer = pl.Trainer(
        callbacks=[hft, RankDump(hft, tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2, limit_train_batches=2),
    )
    trainer.fit(module)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() and len(ranks[0]["history"]) == 2
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(mask, ranks[1]["masks"][name])
        weight = ranks[0]["weights"][name]
        assert torch.equal(weight[~mask], start[name][~mask]) and not torch.equal(weight[mask], start[name][mask])
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(weight, ranks[1]["weights"][name], rtol=0, atol=0, msg=name)


def test_channel_halves_are_refused_under_fsdp2(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match=r"no block stack.*FSDP2.*HINT: use `strategy=\"ddp\"`"):
        HalfFineTuning().setup(trainer, CNNModule(), "fit")
