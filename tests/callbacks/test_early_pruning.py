import os

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from pruning_helpers import PruneModule, sample_input
from torch import nn

from lightning_peft.callbacks import LISA, ActivationQuantization, EarlyPruning
from lightning_peft.pruning import apply_pruning_plan, find_lora_layers, plan_applied
from lightning_peft.trainable import TrainableSetController

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_params(module):
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)


class Watch(Callback):
    """Records loss, learning rate and head counts per step, and the optimizer's parameters after pruning."""

    def __init__(self):
        self.losses, self.lrs, self.heads = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.heads.append(pl_module.net.base_model.model.model.bert.encoder.layer[0].attention.self.num_attention_heads)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"estimation_steps": 0}, r"`estimation_steps` must be an integer >= 1.*got 0.*HINT"),
        ({"head_ratio": 1.0}, r"`head_ratio` must be a number in \[0, 1\).*got 1.0.*HINT"),
        ({"neuron_ratio": -0.1}, r"`neuron_ratio` must be a number in \[0, 1\)"),
        ({"peft_module_ratio": 2}, r"`peft_module_ratio` must be"),
        ({"peft_rank_ratio": "half"}, r"`peft_rank_ratio` must be"),
        ({"l1": -1e-4}, r"`l1` must be a number >= 0"),
        ({"estimation_steps": True}, r"`estimation_steps` must be an integer >= 1.*got True"),
        ({"head_ratio": False}, r"`head_ratio` must be a number in \[0, 1\).*got False"),
        ({"check_batches": 2.0}, r"`check_batches` must be an integer >= 1"),
        ({"max_loss_increase": True}, r"`max_loss_increase` must be a number > 0.*or None"),
        ({"score": "random"}, r"`score` must be one of \['taylor', 'magnitude'\].*HINT"),
        ({"seed": 1.5}, r"`seed` must be None or an integer"),
        ({"plot": "no"}, r"`plot` must be True or False"),
        ({"layers": 3}, r"`layers` must be None, a dotted module path or a list of them.*HINT"),
    ],
)
def test_misconfiguration_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyPruning(**kwargs)


def test_estimation_longer_than_the_run(tmp_path):
    trainer = pl.Trainer(callbacks=[EarlyPruning(estimation_steps=6)], max_steps=6, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"`estimation_steps` must be shorter than the run \(6 optimizer steps\)"):
        trainer.fit(PruneModule())


def test_nothing_to_prune(tmp_path):
    from helpers import TinyBlockModel

    trainer = pl.Trainer(callbacks=[EarlyPruning(estimation_steps=2)], max_steps=4, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="found nothing to prune"):
        trainer.fit(TinyBlockModel())


def test_prunes_at_the_boundary_and_training_continues(tmp_path):
    torch.manual_seed(0)
    module = PruneModule("bert", scheduler=True)
    lora_before, n_lora = _lora_params(module), len(find_lora_layers(module))
    params_before = sum(p.numel() for p in module.parameters())
    pruning, watch = EarlyPruning(estimation_steps=4, l1=1e-3, max_loss_increase=None), Watch()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = pl.Trainer(callbacks=[pruning, watch], max_steps=10, **trainer_kwargs(tmp_path, logger=logger))
    trainer.fit(module)
    assert watch.heads[:4] == [6] * 4 and watch.heads[4:] == [4] * 6  # pruned before the 5th step
    assert pruning.pruned_at == 4 and not hasattr(module, "early_pruning_masks")
    assert all(torch.isfinite(torch.tensor(watch.losses)))
    torch.testing.assert_close(torch.tensor(watch.lrs), 1e-2 * 0.9 ** torch.arange(1, 11), rtol=1e-6, atol=0)
    # the optimizer holds exactly the model's trainable parameters, with state shaped like them
    optimizer = trainer.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.parameters() if p.requires_grad}
    for param, state in optimizer.state.items():
        assert state["exp_avg"].shape == param.shape
    # LoRA: 3/4 of the layers removed, half the ranks of the others
    layers = find_lora_layers(module)
    assert len(layers) == n_lora - round(0.75 * n_lora) and all(layer.r["default"] == 2 for layer in layers.values())
    assert _lora_params(module) <= 0.3 * lora_before
    assert sum(p.numel() for p in module.parameters()) < params_before
    summary = pruning.summary
    assert {row["kept"] for row in summary["layers"] if row["kind"] == "heads"} == {4}
    assert (tmp_path / "logs" / "version_0" / "early_pruning_masks.png").stat().st_size > 0


def test_masks_learn_and_the_l1_penalty_pulls_them_down(tmp_path):
    module = PruneModule("timm", lora=False, lr=1e-3)
    # the penalty dominates: every mask shrinks
    pruning = EarlyPruning(estimation_steps=5, l1=1.0, head_ratio=0.5, max_loss_increase=None)
    seen = {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                seen["heads"] = [m.detach().clone() for m in pruning.masks.heads]

    trainer = pl.Trainer(callbacks=[pruning, Peek()], max_steps=6, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    assert all((m < 1).all() for m in seen["heads"])
    assert module.net.blocks[0].attn.num_heads == 3


def test_checkpoint_reloads_into_a_fresh_module_and_resumes(tmp_path):
    torch.manual_seed(0)
    kw = trainer_kwargs(tmp_path, enable_checkpointing=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=6)
    module = PruneModule("bert", scheduler=True)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(callbacks=[EarlyPruning(estimation_steps=3, seed=1), checkpoint], max_steps=6, **kw)
    trainer.fit(module)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert "pruning_plan" in ckpt

    fresh = PruneModule("bert")
    apply_pruning_plan(fresh, ckpt["pruning_plan"])
    fresh.load_state_dict(ckpt["state_dict"])
    x = sample_input("bert")
    module.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)

    # resume after pruning == an uninterrupted run of the same length
    resumed = PruneModule("bert", scheduler=True)
    trainer = pl.Trainer(callbacks=[EarlyPruning(estimation_steps=3, seed=1)], max_steps=10, **kw)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 10

    reference = PruneModule("bert", scheduler=True)
    reference.load_state_dict(start)
    pl.Trainer(callbacks=[EarlyPruning(estimation_steps=3, seed=1)], max_steps=10, **trainer_kwargs(tmp_path)).fit(
        reference
    )
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, dict(resumed.named_parameters())[name], rtol=1e-6, atol=1e-7, msg=name)


def test_resume_during_estimation(tmp_path):
    path = tmp_path / "mid.ckpt"

    class SaveAndStop(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                trainer.save_checkpoint(path)
                trainer.should_stop = True

    kw = trainer_kwargs(tmp_path)
    pl.Trainer(callbacks=[EarlyPruning(estimation_steps=4), SaveAndStop()], max_steps=6, **kw).fit(PruneModule("bert"))
    ckpt = torch.load(path, weights_only=False)
    assert "pruning_plan" not in ckpt and any(k.startswith("early_pruning_masks.") for k in ckpt["state_dict"])
    assert ckpt["callbacks"]["EarlyPruning"]["importance"]["rank_count"] == 1  # steps 2 and 3 of 4 score ranks
    resumed = PruneModule("bert")
    pruning = EarlyPruning(estimation_steps=4)
    trainer = pl.Trainer(callbacks=[pruning], max_steps=6, **kw)
    trainer.fit(resumed, ckpt_path=str(path))
    assert pruning.pruned_at == 4 and trainer.global_step == 6


DDP_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch
from torch import nn
sys.path.insert(0, {tests!r})
from pruning_helpers import PruneModule
from lightning_peft.callbacks import EarlyPruning


class Dump(pl.Callback):
    def __init__(self, out):
        self.out, self.losses = out, []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args):
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module):
        weights = {{n: p.detach().clone() for n, p in pl_module.named_parameters()}}
        check = next(cb for cb in trainer.callbacks if isinstance(cb, EarlyPruning)).check
        state = {{"losses": self.losses, "weights": weights, "check": check}}
        torch.save(state, f"{{self.out}}/rank{{trainer.global_rank}}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[EarlyPruning(estimation_steps=3, max_loss_increase=1e6), Dump(sys.argv[1])])
    trainer.fit(PruneModule("bert"))
"""


@pytest.mark.slow
def test_ddp_continues_after_pruning_with_identical_ranks(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1])))
    root = str(Path(__file__).parents[2])  # the package imports from the checkout even without an install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(script), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]["losses"]) == 6 and all(torch.isfinite(torch.tensor(ranks[0]["losses"])))
    weights = [r["weights"] for r in ranks]
    assert weights[0].keys() == weights[1].keys()
    query = next(n for n in weights[0] if "layer.0.attention.self.query" in n and "lora" not in n and "weight" in n)
    assert weights[0][query].shape[0] == 4 * 8  # 6 heads of 8 features, 4 kept
    # rank 0 ran the loss check (a tolerance no cut exceeds: the ratios stay) and every rank got its report
    assert ranks[0]["check"]["enabled"] and ranks[0]["check"] == ranks[1]["check"]
    for name, weight in weights[0].items():
        torch.testing.assert_close(weight, weights[1][name], rtol=0, atol=0, msg=name)


def test_spawning_ddp_is_refused(tmp_path):
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=6))
    with pytest.raises(ValueError, match='spawning strategy.*HINT: use `strategy="ddp"`'):
        EarlyPruning(estimation_steps=3).setup(trainer, PruneModule("bert"), "fit")


def test_with_lisa_the_controller_learns_the_new_parameters(tmp_path):
    module = PruneModule("timm", lora=False)
    lisa = LISA(n_layers=1, interval=2, seed=0)
    trainer = pl.Trainer(callbacks=[lisa, EarlyPruning(estimation_steps=3)], max_steps=8, **trainer_kwargs(tmp_path))
    before = {}

    class Check(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:  # right after pruning (EarlyPruning ran first in this hook)
                before.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer.callbacks.append(Check())
    trainer.fit(module)
    controller = next(cb for cb in trainer.callbacks if isinstance(cb, TrainableSetController))
    params = dict(module.named_parameters())
    assert all(controller.candidates[n] is params[n] for n in controller.candidates)
    assert not any(n.startswith("early_pruning_masks") for n in controller.candidates)
    changed = {n for n, p in params.items() if not torch.equal(before[n], p.detach())}
    assert changed and any(n.startswith("net.blocks.") for n in changed)  # sampled blocks train after pruning


def test_with_activation_quantization(tmp_path):
    module = PruneModule("timm", lora=True)
    watch_losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            watch_losses.append(float(outputs["loss"]))

    callbacks = [ActivationQuantization(), EarlyPruning(estimation_steps=2, max_loss_increase=None), Losses()]
    pl.Trainer(callbacks=callbacks, max_steps=5, **trainer_kwargs(tmp_path)).fit(module)
    assert module.net.base_model.model.blocks[0].attn.num_heads == 4
    assert len(watch_losses) == 5 and all(torch.isfinite(torch.tensor(watch_losses)))


def test_bottleneck_adapters_are_pruned(tmp_path):
    from lightning_peft.adapters import AdapterConfig, adapter_modules, add_adapters

    module = PruneModule("timm", lora=False)
    add_adapters(module.net, AdapterConfig(layout="houlsby", bottleneck_size=8, modules_to_save=["head"]))
    before = sum(p.numel() for _, a in adapter_modules(module) for p in a.parameters())
    pruning = EarlyPruning(estimation_steps=4, head_ratio=0, neuron_ratio=0, max_loss_increase=None)
    pl.Trainer(callbacks=[pruning], max_steps=6, **trainer_kwargs(tmp_path)).fit(module)
    adapters = dict(adapter_modules(module))
    assert len(adapters) == 1 and all(a.down.out_features == 4 for a in adapters.values())  # 4 -> 1, 8 -> 4
    assert sum(p.numel() for a in adapters.values() for p in a.parameters()) <= 0.3 * before
    assert pruning.plan.adapters_removed and not pruning.plan.heads


@pytest.mark.parametrize("method", ["hft", "ist"])
def test_with_half_finetuning_and_ist(tmp_path, method):
    from lightning_peft.callbacks import IST, HalfFineTuning

    module = PruneModule("bert", lora=method == "ist")
    other = HalfFineTuning(seed=0) if method == "hft" else IST(seed=0, update_ratio=0.5, interval=2)
    trainer = pl.Trainer(callbacks=[other, EarlyPruning(estimation_steps=3)], max_steps=8, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    assert trainer.global_step == 8
    controller = next(cb for cb in trainer.callbacks if isinstance(cb, TrainableSetController))
    params = dict(module.named_parameters())
    assert controller.candidates and all(controller.candidates[n] is params[n] for n in controller.candidates)
    assert all(torch.isfinite(p).all() for p in params.values())


def test_a_fitted_plan_that_prunes_only_lora_is_applied_to_a_fresh_model(tmp_path):
    """Resuming into a fresh model: the plan is applied whatever it prunes, LoRA ranks and layers included."""
    torch.manual_seed(0)
    callback = EarlyPruning(estimation_steps=2, head_ratio=0, neuron_ratio=0, seed=1)
    module = PruneModule("bert")
    pl.Trainer(callbacks=[callback], max_steps=3, **trainer_kwargs(tmp_path)).fit(module)
    plan = callback.plan
    assert not plan.heads and not plan.neurons and (plan.lora_removed or plan.lora_ranks)
    assert plan_applied(module, plan)

    fresh = PruneModule("bert")
    assert not plan_applied(fresh, plan)
    lora_before = _lora_params(fresh)
    callback.setup(pl.Trainer(**trainer_kwargs(tmp_path)), fresh, "fit")
    assert plan_applied(fresh, plan)
    assert _lora_params(fresh) == _lora_params(module) < lora_before
    # a second setup leaves the pruned model as it is
    callback.setup(pl.Trainer(**trainer_kwargs(tmp_path)), fresh, "fit")
    assert _lora_params(fresh) == _lora_params(module)


class NoisyModule(PruneModule):
    """Dropout on the logits from the global generator: every later step depends on the global random state."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(nn.functional.dropout(self(x), 0.5, training=True), y)


def test_the_plot_leaves_the_run_unchanged(tmp_path):
    """Drawing the mask plot uses its own generator: with and without it the weights are bit-identical."""
    weights = {}
    for plotted in (True, False):
        torch.manual_seed(0)
        module = NoisyModule("bert")
        logger = CSVLogger(tmp_path / str(plotted), name="logs")
        pruning = EarlyPruning(estimation_steps=3, plot=plotted, max_loss_increase=None, seed=1)
        pl.Trainer(callbacks=[pruning], max_steps=6, **trainer_kwargs(tmp_path, logger=logger)).fit(module)
        assert (tmp_path / str(plotted) / "logs" / "version_0" / "early_pruning_masks.png").exists() == plotted
        weights[plotted] = {n: p.detach().clone() for n, p in module.named_parameters()}
    assert weights[True].keys() == weights[False].keys()
    for name, weight in weights[True].items():
        assert torch.equal(weight, weights[False][name]), name


def test_the_plot_shows_every_mask_value_kept_or_pruned(tmp_path, monkeypatch):
    """The saved figure's points are the masks at the cut: kept units in blue, pruned ones in red, one x per layer."""
    from lightning_peft.pruning import report

    figures, masks = [], {}
    monkeypatch.setattr(report, "save_figure", lambda figure, path: figures.append(figure) or path)
    pruning = EarlyPruning(estimation_steps=3, l1=1e-2, max_loss_increase=None)

    class Peek(Callback):  # runs before EarlyPruning in this hook: the masks right before the cut
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                masks["heads"] = [m.detach().clone() for m in pruning.masks.heads]
                masks["neurons"] = [m.detach().clone() for m in pruning.masks.neurons]

    logger = CSVLogger(tmp_path, name="logs")
    kwargs = trainer_kwargs(tmp_path, logger=logger)
    pl.Trainer(callbacks=[Peek(), pruning], max_steps=4, **kwargs).fit(PruneModule("timm", lora=False))
    (figure,) = figures
    heads_axes, neuron_axes = figure.axes
    for axes, kind, kept_by_site in (
        (heads_axes, "heads", pruning.plan.heads),
        (neuron_axes, "neurons", pruning.plan.neurons),
    ):
        assert axes.get_title().startswith(f"{kind} masks at step 3")
        collections = axes.collections
        assert len(collections) == 2 * len(masks[kind]) == 4  # kept and pruned, per layer
        for position, (mask, path) in enumerate(zip(masks[kind], sorted(kept_by_site), strict=True)):
            kept = torch.zeros(len(mask), dtype=torch.bool)
            kept[kept_by_site[path]] = True
            blue, red = collections[2 * position : 2 * position + 2]
            torch.testing.assert_close(torch.tensor(blue.get_offsets()[:, 1]).float(), mask[kept], rtol=0, atol=0)
            torch.testing.assert_close(torch.tensor(red.get_offsets()[:, 1]).float(), mask[~kept], rtol=0, atol=0)
            assert len(red.get_offsets()) > 0
            xs = torch.tensor([*blue.get_offsets()[:, 0], *red.get_offsets()[:, 0]])
            assert ((xs - position).abs() <= 0.25).all() and xs.std() > 0  # jittered around the layer's position


class ManualModule(PruneModule):
    """Manual optimization: `training_step` steps the optimizer itself."""

    def __init__(self, with_compute_loss=False):
        super().__init__("bert")
        self.automatic_optimization = False
        if with_compute_loss:
            self.compute_loss = lambda batch: nn.functional.cross_entropy(self(batch[0]), batch[1])

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_needs_compute_loss_for_the_loss_check(tmp_path):
    trainer = pl.Trainer(callbacks=[EarlyPruning(estimation_steps=2)], max_steps=4, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"loss check.*manual optimization.*HINT: add a `compute_loss\(batch\)`"):
        trainer.fit(ManualModule())


@pytest.mark.parametrize("check", ["compute_loss", "off"])
def test_manual_optimization_carries_the_optimizer_over(tmp_path, check):
    module = ManualModule(with_compute_loss=check == "compute_loss")
    pruning = EarlyPruning(estimation_steps=2, max_loss_increase=0.5 if check == "compute_loss" else None, plot=False)
    watch = Watch()
    trainer = pl.Trainer(callbacks=[pruning, watch], max_steps=5, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    assert pruning.pruned_at == 2 and trainer.global_step == 5
    assert watch.heads[0] == 6 and watch.heads[-1] < 6 and all(torch.isfinite(torch.tensor(watch.losses)))
    optimizer = trainer.optimizers[0]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in module.parameters() if p.requires_grad
    }


def test_a_plan_applies_through_a_compiled_wrapper():
    module = PruneModule("timm")
    plain_paths = sorted(find_lora_layers(module))
    plan = {"heads": {"net.base_model.model.blocks.0.attn": [0, 2, 4]}, "lora_removed": [plain_paths[0]]}
    module.net = torch.compile(module.net)  # names gain `_orig_mod.`; the plan's are the plain model's
    assert not plan_applied(module, plan)
    apply_pruning_plan(module, plan)
    assert plan_applied(module, plan) and type(module.net).__name__ == "OptimizedModule"
    assert module.net._orig_mod.base_model.model.blocks[0].attn.num_heads == 3
