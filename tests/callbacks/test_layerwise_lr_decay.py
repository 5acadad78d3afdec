import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyBlockModel, snapshot, trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft.callbacks import LISA, GradualUnfreezing, HalfFineTuning, LayerwiseLRDecay

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).parents[1] / "unfreezing_script.py"
BASE_LR = 0.05
# depth from the top of TinyBlockModel's parameters: head and final norm 0, blocks 3..0 depths 1..4, embedding 5
DEPTH = {"head": 0, "norm": 0, "embed": 5, **{f"blocks.{b}": 4 - b for b in range(4)}}


def depth(name):
    prefix = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
    return DEPTH[prefix]


def warmup_then_halve(step):
    return (step + 1) / 4 if step < 3 else 0.5 ** (step - 2)


class Scheduled(TinyBlockModel):
    """AdamW (or plain SGD) in two groups (AdamW: weight decay on matrices only) under a per-step scheduler."""

    def __init__(self, scheduler="lambda", optimizer="adamw"):
        super().__init__(lr=BASE_LR)
        self.scheduler_name = scheduler
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if p.dim() > 1]
        no_decay = [p for n, p in self.named_parameters() if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        if self.optimizer_name == "sgd":  # no weight decay: the update is the gradient times the learning rate
            groups[0]["weight_decay"] = 0.0
            optimizer = torch.optim.SGD(groups, lr=self.lr)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.lr)
        schedulers = {
            "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_halve),
            "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10),
            "sequential": lambda: torch.optim.lr_scheduler.SequentialLR(
                optimizer,
                [
                    torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=3),
                    torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10),
                ],
                milestones=[3],
            ),
            "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=20),
        }
        scheduler = schedulers[self.scheduler_name]()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def reference_lrs(scheduler, steps):
    """The learning rate of each step of the same scheduler over one plain group of BASE_LR."""
    param = torch.nn.Parameter(torch.zeros(1))
    model = Scheduled(scheduler)
    model.parameters = lambda: iter([param])  # noqa: B023
    model.named_parameters = lambda: iter([("p", param)])
    config = model.configure_optimizers()
    optimizer, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    return lrs


class LRs(Callback):
    """Per optimizer step: each parameter's learning rate, its gradient, and how far the step moved it."""

    def __init__(self):
        self.lr, self.grad, self.delta = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self.lr.append({n: float(lr_of[id(p)]) for n, p in pl_module.named_parameters()})
        self.grad.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.before = snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.delta.append({n: p.detach() - self.before[n] for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 0}, r"`decay` must be a number in \(0, 1\], got 0.*HINT"),
        ({"decay": 1.5}, r"`decay` must be a number in \(0, 1\], got 1.5.*HINT"),
        ({"decay": True}, r"`decay` must be a number in \(0, 1\], got True"),
        ({"verbose": 1}, r"`verbose` must be True or False"),
    ],
)
def test_misconfiguration_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerwiseLRDecay(**kwargs)


def test_preview_gives_each_parameter_decay_to_its_depth():
    plan = LayerwiseLRDecay(decay=0.5).preview(TinyBlockModel())
    assert plan.n_blocks == 4
    for name, factor in plan.factors.items():
        assert factor == 0.5 ** depth(name), name
    assert plan.trainable == {n for n, _ in TinyBlockModel().named_parameters()}


def test_timm_vit_blocks_and_stem_from_its_group_matcher():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", depth=3, img_size=32, patch_size=8, num_classes=3)
    plan = LayerwiseLRDecay(decay=0.5).preview(vit)
    assert plan.depths["head.weight"] == plan.depths["norm.weight"] == 0
    assert plan.depths["blocks.2.attn.qkv.weight"] == 1 and plan.depths["blocks.0.mlp.fc2.bias"] == 3
    for stem in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert plan.factors[stem] == 0.5**4, stem


@pytest.mark.parametrize("scheduler", ["lambda", "cosine", "sequential", "onecycle"])
def test_effective_lr_is_base_times_schedule_times_decay_to_the_depth(tmp_path, scheduler):
    lrs = LRs()
    steps = 8
    trainer = pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.5), lrs], max_steps=steps, **trainer_kwargs(tmp_path))
    model = Scheduled(scheduler)
    trainer.fit(model)
    schedule = reference_lrs(scheduler, steps)
    assert len(set(schedule)) > 2  # the schedule moves
    for step in range(steps):
        for name, lr in lrs.lr[step].items():
            assert math.isclose(lr, schedule[step] * 0.5 ** depth(name), rel_tol=1e-12), (step, name)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 * 6  # each of the two groups split over the 6 depths
    assert {g["weight_decay"] for g in groups[:6]} == {0.1} and {g["weight_decay"] for g in groups[6:]} == {0.0}


def test_the_step_moves_each_parameter_by_its_decayed_learning_rate(tmp_path):
    """Plain SGD: the update is -lr * decay**depth * grad, exactly what the group's learning rate says."""
    lrs = LRs()
    trainer = pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.5), lrs], max_steps=4, **trainer_kwargs(tmp_path))
    trainer.fit(Scheduled("lambda", optimizer="sgd"))
    schedule = reference_lrs("lambda", 4)
    for step in range(4):
        for name, grad in lrs.grad[step].items():
            expected = -schedule[step] * 0.5 ** depth(name) * grad
            torch.testing.assert_close(lrs.delta[step][name], expected, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    kw = trainer_kwargs(tmp_path)
    torch.manual_seed(0)
    reference = Scheduled("lambda")
    initial = snapshot(reference)
    pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.5)], max_steps=24, **kw).fit(reference)

    first = Scheduled("lambda")
    first.load_state_dict(initial)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    kw_ckpt = {**kw, "enable_checkpointing": True}
    pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.5), checkpoint], max_steps=12, **kw_ckpt).fit(first)

    resumed = Scheduled("lambda")
    resumed.load_state_dict(initial)
    trainer = pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.5)], max_steps=24, **kw)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, dict(resumed.named_parameters())[name], rtol=0, atol=0, msg=name)


def test_resuming_with_another_decay_warns(tmp_path):
    kw = {**trainer_kwargs(tmp_path), "enable_checkpointing": True}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.5), checkpoint], max_steps=2, **kw).fit(Scheduled())
    trainer = pl.Trainer(callbacks=[LayerwiseLRDecay(decay=0.8)], max_steps=3, **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match=r"trained with `decay=0.5`.*`decay=0.8`.*HINT"):
        trainer.fit(Scheduled(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def test_timm_layer_decay_groups_are_refused(tmp_path):
    class TimmGroups(TinyBlockModel):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": list(self.parameters()), "lr_scale": 0.5}], lr=0.01)

    trainer = pl.Trainer(callbacks=[LayerwiseLRDecay()], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"timm's `lr_scale`.*HINT"):
        trainer.fit(TimmGroups())


def test_a_foreign_scheduler_with_per_group_lists_is_refused(tmp_path):
    class Warmup(torch.optim.lr_scheduler.LRScheduler):
        def __init__(self, optimizer):
            self.peaks = [g["lr"] for g in optimizer.param_groups]
            super().__init__(optimizer)

        def get_lr(self):
            return [peak * min(1.0, (self.last_epoch + 1) / 3) for peak in self.peaks]

    class Foreign(TinyBlockModel):
        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=0.01)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": Warmup(optimizer), "interval": "step"}}

    trainer = pl.Trainer(callbacks=[LayerwiseLRDecay()], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"Warmup keeps a per-group list `peaks`.*HINT"):
        trainer.fit(Foreign())


@pytest.mark.parametrize("method", ["lisa", "hft", "gradual_unfreezing"])
def test_composes_with_the_methods_that_choose_what_trains(tmp_path, method):
    lrs = LRs()
    other = {
        "lisa": lambda: LISA(n_layers=2, interval=2, seed=0, plot=False),
        "hft": lambda: HalfFineTuning(seed=0),
        "gradual_unfreezing": lambda: GradualUnfreezing(unfreeze_every=2, unit="steps"),
    }[method]()
    trainer = pl.Trainer(callbacks=[other, LayerwiseLRDecay(decay=0.5), lrs], max_steps=6, **trainer_kwargs(tmp_path))
    trainer.fit(Scheduled("lambda", optimizer="sgd"))
    schedule = reference_lrs("lambda", 6)
    for step in range(6):
        assert lrs.grad[step], step
        for name, grad in lrs.grad[step].items():  # what trains moves by its decayed learning rate
            expected = -schedule[step] * 0.5 ** depth(name) * grad
            torch.testing.assert_close(lrs.delta[step][name], expected, rtol=1e-5, atol=1e-7, msg=name)
        frozen = set(lrs.delta[step]) - set(lrs.grad[step])
        assert all(not lrs.delta[step][n].any() for n in frozen), step
    assert len(trainer.optimizers[0].param_groups) == 12  # no method added or removed a group


def test_ddp_script_ranks_identical_with_decayed_lrs(tmp_path):
    """`strategy="ddp"` in a user's script; nothing is frozen, so DDP needs no `find_unused_parameters`."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "ddp", "llrd", str(tmp_path), "4"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "find_unused_parameters" not in result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"]
    for name, weight in ranks[0]["final"].items():
        torch.testing.assert_close(weight, ranks[1]["final"][name], rtol=0, atol=0, msg=name)
    for step, record in enumerate(ranks[0]["steps"]):
        for name, lr in record["lr"].items():
            assert math.isclose(lr, 0.05 * min(1.0, (step + 1) / 3) * 0.5 ** depth(name), rel_tol=1e-12), name
