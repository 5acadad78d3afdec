from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyBlockModel, changed, snapshot, trainer_kwargs
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lightning_peft._compat import tensor_version
from lightning_peft.trainable import TrainableSetCallback, TrainableSetController


class Schedule(TrainableSetCallback):
    """Allows a fixed sequence of parameter-name sets: `plan[step]` (last one repeats)."""

    def __init__(self, plan, release_optimizer_state=True):
        super().__init__(release_optimizer_state=release_optimizer_state)
        self.plan = [frozenset(p) if p is not None else None for p in plan]
        self.calls = []

    def trainable_parameters(self, trainer, pl_module, step):
        self.calls.append(step)
        return self.plan[min(step, len(self.plan) - 1)]


def _block(i):
    return {f"blocks.{i}.{n}" for n in ("norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}


OUTSIDE = {"embed.weight", "embed.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}


class Recorder(Callback):
    """Records at each batch end which parameters trained in that batch and what the optimizer holds after it."""

    def __init__(self):
        self.trainable, self.state, self.steps = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.steps.append(trainer.global_step)
        self.trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})
        self.state.append({names[id(p)] for p in trainer.optimizers[0].state})


def _adam_steps(trainer):
    optimizer = trainer.optimizers[0]
    return {
        n: float(optimizer.state[p]["step"])
        for n, p in trainer.lightning_module.named_parameters()
        if p in optimizer.state
    }


def _fit(tmp_path, callbacks, model=None, **kw):
    model = model or TinyBlockModel()
    recorder = Recorder()
    trainer = pl.Trainer(callbacks=[*callbacks, recorder], **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model)
    return model, trainer, recorder


def test_frozen_parameters_lose_optimizer_state_and_reactivated_start_fresh(tmp_path):
    plan = [OUTSIDE | _block(0), OUTSIDE | _block(0), OUTSIDE | _block(1), OUTSIDE | _block(0)]
    _, trainer, rec = _fit(tmp_path, [Schedule(plan)], max_steps=5)
    assert rec.trainable[:3] == [OUTSIDE | _block(0), OUTSIDE | _block(0), OUTSIDE | _block(1)]
    # the optimizer only ever holds state for what trains: block 0's state is released when it freezes
    assert rec.state == rec.trainable
    # block 0 reactivated at step 3 with fresh state: its Adam step counter restarted (steps 3 and 4 only)
    steps = _adam_steps(trainer)
    assert steps["blocks.0.fc1.weight"] == 2.0
    assert steps["head.weight"] == 5.0


def test_keeping_state_when_release_is_off(tmp_path):
    plan = [OUTSIDE | _block(0), OUTSIDE | _block(1), OUTSIDE | _block(0)]
    _, trainer, rec = _fit(tmp_path, [Schedule(plan, release_optimizer_state=False)], max_steps=4)
    assert rec.state[1] == OUTSIDE | _block(0) | _block(1)  # block 0's state survives its freezing
    assert _adam_steps(trainer)["blocks.0.fc1.weight"] == 3.0  # steps 0, 2, 3: state carried across periods


def test_masks_combine_by_intersection(tmp_path):
    a = Schedule([OUTSIDE | _block(0) | _block(1)])
    b = Schedule([OUTSIDE | _block(1) | _block(2)])
    model = TinyBlockModel()
    before = snapshot(model)
    _, trainer, rec = _fit(tmp_path, [a, b], model=model, max_steps=3)
    assert rec.trainable[0] == OUTSIDE | _block(1)
    assert changed(before, model) == OUTSIDE | _block(1)
    assert sum(isinstance(cb, TrainableSetController) for cb in trainer.callbacks) == 1


def test_changes_only_at_accumulation_boundaries(tmp_path):
    plan = [OUTSIDE | _block(i % 4) for i in range(10)]
    sched = Schedule(plan)
    _, trainer, rec = _fit(tmp_path, [sched], max_steps=4, accumulate_grad_batches=3)
    assert rec.steps == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]  # recorded after each batch
    for window in range(4):
        sets = rec.trainable[3 * window : 3 * window + 3]
        assert all(s == OUTSIDE | _block(window) for s in sets)
    assert sched.calls == [0, 1, 2, 3]  # asked once per optimizer step


def test_scheduler_steps_every_group_and_param_groups_untouched(tmp_path):
    model = TinyBlockModel(scheduler=True)
    plan = [OUTSIDE | _block(0), OUTSIDE | _block(1)]
    _, trainer, _ = _fit(tmp_path, [Schedule(plan)], model=model, max_steps=4)
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 1
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)


def test_user_frozen_parameters_stay_frozen_and_flags_restored_after_fit(tmp_path):
    model = TinyBlockModel(freeze_head=True)
    before = snapshot(model)
    _fit(tmp_path, [Schedule([None])], model=model, max_steps=2)
    assert "head.weight" not in changed(before, model)
    assert not model.head.weight.requires_grad  # never made trainable by the controller
    model2 = TinyBlockModel()
    _fit(tmp_path, [Schedule([OUTSIDE])], model=model2, max_steps=2)
    assert all(p.requires_grad for p in model2.parameters())  # what it froze is trainable again after fit


def test_bitsandbytes_adamw8bit(tmp_path):
    model = TinyBlockModel(optimizer="adamw8bit", width=32)
    before = snapshot(model)
    plan = [OUTSIDE | _block(0), OUTSIDE | _block(2)]
    _, trainer, rec = _fit(tmp_path, [Schedule(plan)], model=model, max_steps=4)
    assert changed(before, model) == OUTSIDE | _block(0) | _block(2)
    assert rec.state[-1] == OUTSIDE | _block(2)
    assert type(trainer.optimizers[0]).__name__ == "AdamW8bit"


def test_ddp_strategy_is_told_about_unused_parameters(tmp_path):
    strategy = DDPStrategy()
    trainer = pl.Trainer(strategy=strategy, callbacks=[Schedule([None])], **trainer_kwargs(tmp_path))
    TrainableSetController.attach(trainer, trainer.callbacks[0])
    assert strategy._ddp_kwargs["find_unused_parameters"] is True
    static = DDPStrategy(static_graph=True)
    trainer = pl.Trainer(strategy=static, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="static_graph"):
        TrainableSetController.attach(trainer, Schedule([None]))


def test_sharded_strategies_are_refused_with_a_hint(tmp_path):
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[])  # FSDP needs a GPU to build a Trainer
    with pytest.raises(ValueError, match=r"`Schedule` changes which parameters train.*HINT: use `strategy=\"ddp\"`"):
        TrainableSetController.attach(trainer, Schedule([None]))


def test_warns_when_a_candidate_is_in_no_optimizer(tmp_path):
    class Partial(TinyBlockModel):
        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    with pytest.warns(UserWarning, match="in no optimizer"):
        _fit(tmp_path, [Schedule([None])], model=Partial(), max_steps=1)


def test_trainable_params_reach_the_logger_on_its_steps(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    plan = [OUTSIDE | _block(0)] * 3 + [OUTSIDE | _block(0) | _block(1)]
    kw = trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=2)
    trainer = pl.Trainer(callbacks=[Schedule(plan)], max_steps=8, **kw)
    trainer.fit(TinyBlockModel())
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["trainable_params"]) for r in csv.DictReader(f) if r["trainable_params"]}
    model = trainer.lightning_module
    size = {n: p.numel() for n, p in model.named_parameters()}
    one, two = sum(size[n] for n in OUTSIDE | _block(0)), sum(size[n] for n in OUTSIDE | _block(0) | _block(1))
    assert logged == {1: one, 3: two, 5: two, 7: two}  # every logging step, with the value of that step


class Only(TrainableSetCallback):
    """Allows one fixed set of parameter names."""

    def __init__(self, names):
        super().__init__()
        self.names = frozenset(names)

    def trainable_parameters(self, trainer, pl_module, step):
        return self.names


def test_disjoint_sets_fail_with_the_methods_named(tmp_path):
    callbacks = [Only({"blocks.0.fc1.weight"}), Only({"blocks.1.fc1.weight"})]
    with pytest.raises(ValueError, match=r"At optimizer step 0 the trainable sets of Only, Only have no parameter in"):
        pl.Trainer(callbacks=callbacks, max_steps=1, **trainer_kwargs(tmp_path)).fit(TinyBlockModel())


class Boundary(TrainableSetCallback):
    """Decides its set in `on_step_boundary`; records the order of calls."""

    def __init__(self, log, name):
        super().__init__()
        self.record, self.name = log, name

    def on_step_boundary(self, trainer, pl_module, batch, batch_idx, step):
        self.record.append(("boundary", self.name, step))

    def trainable_parameters(self, trainer, pl_module, step):
        self.record.append(("set", self.name, step))
        return None


@pytest.mark.parametrize("reverse", [False, True])
def test_every_boundary_comes_before_any_set_whatever_the_callback_order(tmp_path, reverse):
    log = []
    callbacks = [Boundary(log, "a"), Boundary(log, "b")]
    trainer = pl.Trainer(
        callbacks=callbacks[::-1] if reverse else callbacks,
        max_steps=2,
        accumulate_grad_batches=2,
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(TinyBlockModel())
    for step in (0, 1):  # once per optimizer step, not per batch
        calls = [(kind, name) for kind, name, s in log if s == step]
        assert sorted(calls[:2]) == [("boundary", "a"), ("boundary", "b")] and len(calls) == 4


class BoundaryReader(Callback):
    """Reads the controller's `last_boundary` after every batch, as a benchmark would."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(TrainableSetController.of(trainer).last_boundary)


def test_last_boundary_reports_each_boundary_once_with_its_cost(tmp_path):
    schedule = Schedule([OUTSIDE | _block(0), OUTSIDE | _block(1)])
    schedule.plan.insert(1, schedule.plan[0])  # the same set object twice: no change at step 1
    reader = BoundaryReader()
    _fit(tmp_path, [schedule, reader], max_steps=3, accumulate_grad_batches=2)
    # one timing per optimizer step, the same object for both batches of an accumulation window
    assert [t.step for t in reader.seen] == [0, 0, 1, 1, 2, 2]
    assert reader.seen[0] is reader.seen[1]
    assert [t.changed for t in reader.seen[::2]] == [True, False, True]
    for timing in reader.seen:
        assert 0 <= timing.logging_ns <= timing.total_ns
    # a changed set is logged, so part of that boundary's time is Lightning's logging
    assert reader.seen[0].logging_ns > 0


# ------------------------------------------------------------------------------------------------------ row masks


def _rows(n, trained):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[list(trained)] = True
    return mask


class Rows(TrainableSetCallback):
    """Trains parts of parameters: `plan[step]` maps names to row masks (last one repeats); `sets` likewise."""

    def __init__(self, plan, sets=(None,)):
        super().__init__()
        self.plan, self.sets = list(plan), [frozenset(s) if s is not None else None for s in sets]
        self.calls = []

    def trainable_parameters(self, trainer, pl_module, step):
        return self.sets[min(step, len(self.sets) - 1)]

    def trainable_rows(self, trainer, pl_module, step):
        self.calls.append(step)
        return self.plan[min(step, len(self.plan) - 1)]


class Steps(Callback):
    """Records, for every batch, the parameters before and after it and the controller's row masks."""

    def __init__(self):
        self.before, self.after, self.masks, self.steps, self.grad_flags = [], [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(snapshot(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(snapshot(pl_module))
        self.masks.append(dict(TrainableSetController.of(trainer).row_masks))
        self.steps.append(trainer.global_step - 1)  # the step this batch belonged to
        self.grad_flags.append({n for n, p in pl_module.named_parameters() if p.requires_grad})


def _moved_rows(before, after):
    return (before != after).reshape(before.shape[0], -1).any(dim=1)


def _same(masks, expected):
    return masks.keys() == expected.keys() and all(torch.equal(masks[n], expected[n]) for n in masks)


FC1 = ("blocks.0.fc1.weight", "blocks.0.fc1.bias")


def test_frozen_rows_never_move_under_weight_decay_and_momentum_and_trained_rows_do(tmp_path):
    first = {n: _rows(16, range(0, 16, 2)) for n in FC1}  # one object for both: as Half Fine-Tuning shares them
    second = {n: _rows(16, range(4, 12)) for n in FC1}  # a new mapping from step 3: held again there
    model = TinyBlockModel()  # AdamW, weight decay 0.01
    start = snapshot(model)
    steps = Steps()
    _, trainer, _ = _fit(tmp_path, [Rows([first, first, first, second]), steps], model=model, max_steps=6)
    for index, (before, after) in enumerate(zip(steps.before, steps.after, strict=True)):
        masks = first if index < 3 else second
        for name in FC1:
            assert torch.equal(_moved_rows(before[name], after[name]), masks[name]), (index, name)
            frozen = ~masks[name]
            # bit-identical to the values held when the mask began applying
            held_at = start if index < 3 else steps.before[3]
            assert torch.equal(after[name][frozen], held_at[name][frozen])
    final = dict(model.named_parameters())
    always_frozen = ~(first[FC1[0]] | second[FC1[0]])
    assert torch.equal(final[FC1[0]][always_frozen], start[FC1[0]][always_frozen])
    assert trainer.optimizers[0].state[final[FC1[0]]]  # a row-masked parameter keeps its optimizer state
    assert _same(steps.masks[0], first) and _same(steps.masks[3], second)


def test_a_step_over_a_view_of_the_groups_writes_back_only_the_parameters_in_the_view(tmp_path):
    """A per-parameter step (OptimizerInBackward's, inside backward) must not write into the other parameters."""

    class StepWeightAlone(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            weight, bias = (dict(pl_module.named_parameters())[n] for n in FC1)
            with torch.no_grad():  # the frozen rows drift (as weight decay would move them)
                weight[~mask] += 1.0
                bias[~mask] += 1.0
            self.bias_version = tensor_version(bias)
            group, params, groups = (
                optimizer.param_groups[0],
                optimizer.param_groups[0]["params"],
                optimizer.param_groups,
            )
            group["params"], optimizer.param_groups = [weight], [group]
            try:
                type(optimizer).step(optimizer)
            finally:
                group["params"], optimizer.param_groups = params, groups
            self.weight_rows_back = torch.equal(weight[~mask], start[FC1[0]][~mask])
            self.bias_untouched = tensor_version(bias) == self.bias_version and bool(
                (bias[~mask] != start[FC1[1]][~mask]).all()
            )
            with torch.no_grad():
                bias[~mask] -= 1.0

    mask = _rows(16, range(0, 16, 2))
    model = TinyBlockModel()
    start = snapshot(model)
    probe = StepWeightAlone()
    _fit(tmp_path, [Rows([{n: mask for n in FC1}]), probe], model=model, max_steps=1)
    assert probe.weight_rows_back  # the parameter of the view: frozen rows written back
    assert probe.bias_untouched  # the other one: not written (its version unchanged)


def test_row_masks_combine_by_and_and_a_set_freezes_whole_with_state_released(tmp_path):
    w1 = "blocks.1.fc1.weight"
    a = Rows([{FC1[0]: _rows(16, range(8)), w1: _rows(16, range(8))}], sets=[OUTSIDE | _block(0) | _block(2)])
    b = Rows([{FC1[0]: _rows(16, range(0, 16, 2))}])
    model = TinyBlockModel()
    start = snapshot(model)
    steps, rec = Steps(), Recorder()
    _, trainer, _ = _fit(tmp_path, [a, b, steps, rec], model=model, max_steps=4)
    assert _same(steps.masks[0], {FC1[0]: _rows(16, (0, 2, 4, 6))})  # AND; w1 is frozen by a's set: no rows apply
    final = dict(model.named_parameters())
    assert torch.equal(_moved_rows(start[FC1[0]], final[FC1[0]]), _rows(16, (0, 2, 4, 6)))
    assert torch.equal(final[w1], start[w1])  # frozen whole, whatever its rows say
    assert all(w1 not in flags for flags in steps.grad_flags)
    assert all(w1 not in held for held in rec.state)  # its optimizer state is released


def test_row_masks_change_only_at_accumulation_boundaries(tmp_path):
    plan = [{FC1[0]: _rows(16, range(i, i + 8))} for i in range(4)]  # a new mapping at every step
    rows = Rows(plan)
    steps = Steps()
    _fit(tmp_path, [rows, steps], max_steps=4, accumulate_grad_batches=3)
    assert rows.calls == [0, 1, 2, 3]  # asked once per optimizer step
    assert len(steps.masks) == 12
    for index, masks in enumerate(steps.masks):
        assert _same(masks, plan[index // 3])  # the same mask for every batch of a window
    for window in range(4):  # over a whole accumulation window (one optimizer step) only the window's rows move
        before, after = steps.before[3 * window], steps.after[3 * window + 2]
        assert torch.equal(_moved_rows(before[FC1[0]], after[FC1[0]]), plan[window][FC1[0]])


def test_row_hooks_are_removed_after_fit(tmp_path):
    masks = {FC1[0]: _rows(16, range(8))}
    model, trainer, _ = _fit(tmp_path, [Rows([masks])], max_steps=2)
    controller = TrainableSetController.of(trainer)
    assert not controller.row_masks and not controller._step_hooks
    x, y = next(iter(model.train_dataloader()))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    weight = model.blocks[0].fc1.weight
    assert bool((weight.grad[8:] != 0).any())  # no gradient hook zeroes the frozen rows any more
    before = weight.detach().clone()
    trainer.optimizers[0].step()
    assert not torch.equal(weight[8:], before[8:])  # and no step hook writes them back


def test_trainable_params_counts_the_trained_rows(tmp_path):
    masks = {n: _rows(16, range(5)) for n in FC1}
    model, trainer, _ = _fit(tmp_path, [Rows([masks], sets=[OUTSIDE | _block(0)])], max_steps=2)
    size = {n: p.numel() for n, p in model.named_parameters()}
    expected = sum(size[n] for n in OUTSIDE | _block(0)) - (16 - 5) * (8 + 1)  # fc1: 16 rows of 8 weights + bias
    assert trainer.callback_metrics["trainable_params"].item() == expected


def test_refresh_moves_row_masks_to_replaced_parameters(tmp_path):
    masks = {FC1[0]: _rows(16, range(8))}

    class Replace(Callback):
        """Replaces blocks.0.fc1.weight by a copy after step 1, as pruning replaces parameters."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != 2:
                return
            layer, optimizer = pl_module.blocks[0].fc1, trainer.optimizers[0]
            old = layer.weight
            layer.weight = torch.nn.Parameter(old.detach().clone())
            params = optimizer.param_groups[0]["params"]
            params[next(i for i, p in enumerate(params) if p is old)] = layer.weight
            optimizer.state.pop(old, None)
            TrainableSetController.of(trainer).refresh(trainer, pl_module)

    model = TinyBlockModel()
    start = snapshot(model)
    _fit(tmp_path, [Rows([masks]), Replace()], model=model, max_steps=5)
    weight = model.blocks[0].fc1.weight
    assert torch.equal(weight[8:], start[FC1[0]][8:])  # the new object's frozen rows were held and kept
    assert not torch.equal(weight[:8], start[FC1[0]][:8])


def test_a_row_mask_of_the_wrong_shape_fails_with_a_hint(tmp_path):
    with pytest.raises(ValueError, match=r"`Rows.trainable_rows` gave 'blocks.0.fc1.weight' a mask.*\(16,\).*HINT"):
        _fit(tmp_path, [Rows([{FC1[0]: torch.ones(8, dtype=torch.bool)}])], max_steps=1)


def test_a_row_mask_naming_no_parameter_fails_and_one_of_a_user_frozen_parameter_is_ignored(tmp_path):
    with pytest.raises(ValueError, match=r"`Rows.trainable_rows` names 'blocks.0.fc9.weight', which is no parameter"):
        _fit(tmp_path, [Rows([{"blocks.0.fc9.weight": _rows(16, range(8))}])], max_steps=1)
    model = TinyBlockModel()
    model.blocks[0].fc1.weight.requires_grad_(False)  # the user's choice: not a candidate, its mask does not matter
    before = snapshot(model)
    _fit(tmp_path, [Rows([{FC1[0]: _rows(16, range(8))}])], model=model, max_steps=2)
    assert FC1[0] not in changed(before, model)


def test_row_masks_are_refused_under_fsdp2(tmp_path):
    from lightning.pytorch.strategies import ModelParallelStrategy

    model = TinyBlockModel()
    rows = Rows([{FC1[0]: _rows(16, range(8))}])
    controller = TrainableSetController()
    controller.participants = [rows]
    controller.candidates = dict(model.named_parameters())
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), global_step=0, optimizers=[])
    with pytest.raises(ValueError, match=r"`Rows` trains parts of parameters.*`strategy=ModelParallelStrategy`.*HINT"):
        controller.on_train_batch_start(trainer, model, None, 0)


# ---------------------------------------------------------------------------- identity, and flags changed outside


class BlockByStep(TrainableSetCallback):
    """Trains the parameters outside the blocks and block `step % 4`, named as the module names them now."""

    def trainable_parameters(self, trainer, pl_module, step):
        block = f"blocks.{step % 4}."
        return frozenset(n for n, _ in pl_module.named_parameters() if not n.startswith("blocks.") or block in n)


class PruneFc1(Callback):
    """Prunes every block's `fc1.weight` at the end of epoch 0 (`weight` becomes `weight_orig` plus a mask)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            for block in pl_module.blocks:
                torch.nn.utils.prune.l1_unstructured(block.fc1, "weight", amount=0.5)


def _fc1_weight(block):  # the parameter, whatever its name (`weight`, or `weight_orig` once pruned)
    return next(p for n, p in block.fc1.named_parameters() if n.startswith("weight"))


class Fc1Moved(Callback):
    """Per batch, the blocks whose `fc1` weight changed."""

    def __init__(self):
        self.moved = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [_fc1_weight(b).detach().clone() for b in pl_module.blocks]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.moved.append(
            {i for i, b in enumerate(pl_module.blocks) if not torch.equal(self.before[i], _fc1_weight(b))}
        )


def test_a_parameter_renamed_by_pruning_keeps_training_when_its_block_is_chosen(tmp_path):
    moved = Fc1Moved()
    model, _, _ = _fit(tmp_path, [BlockByStep(), PruneFc1(), moved], max_epochs=2, limit_train_batches=4)
    assert hasattr(model.blocks[0].fc1, "weight_orig")  # pruned after epoch 0
    assert moved.moved == [{step % 4} for step in range(8)]  # by identity: `weight_orig` is the same parameter


def test_names_except_matches_by_identity_whatever_the_names_now():
    model = TinyBlockModel()
    method = Schedule([None])
    method.controller = TrainableSetController()
    method.controller.setup(SimpleNamespace(), model, "fit")  # remembers the names the methods see at setup
    torch.nn.utils.prune.l1_unstructured(model.blocks[0].fc1, "weight", amount=0.5)
    now = [n for n, _ in model.named_parameters()]
    kept = method.names_except(now, _block(0))  # names of setup against names of now
    assert "blocks.0.fc1.weight_orig" in now and not any(n.startswith("blocks.0.") for n in kept)
    assert kept == set(now) - {n for n in now if n.startswith("blocks.0.")}
    assert method.controller.parameter("blocks.0.fc1.weight") is model.blocks[0].fc1.weight_orig
    assert TrainableSetCallback().names_except(now, ["embed.weight"]) == set(now) - {"embed.weight"}  # no controller


class Meddler(Callback):
    """Changes `requires_grad` behind the controller's back, after the optimizer step of batch `at`."""

    def __init__(self, at, change):
        self.at, self.change = at, change

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.change(pl_module)


def _messages(recwarn, text):
    return [str(w.message) for w in recwarn if text in str(w.message)]


def test_a_parameter_the_methods_froze_and_someone_unfroze_is_frozen_again_and_reported_once(tmp_path, recwarn):
    def unfreeze_block1(module):
        module.blocks[1].requires_grad_(True)

    meddlers = [Meddler(1, unfreeze_block1), Meddler(3, unfreeze_block1)]
    model = TinyBlockModel()
    before = snapshot(model)
    _, _, rec = _fit(tmp_path, [Schedule([OUTSIDE | _block(0)]), *meddlers], model=model, max_steps=5)
    # the recorder reads the flags after the meddler: at the end of the batches it meddled in, block 1 is trainable
    assert [t == OUTSIDE | _block(0) for t in rec.trainable] == [True, False, True, False, True]
    assert not changed(before, model) & _block(1)
    (message,) = _messages(recwarn, "parameters trainable that Schedule keep frozen")
    assert "Before optimizer step 2, the LightningModule or a callback made 6 parameters" in message
    assert "`blocks.1.norm.weight`" in message and "HINT" in message


def test_a_parameter_someone_froze_stays_frozen_and_leaves_the_candidates(tmp_path, recwarn):
    def freeze_head(module):
        module.head.requires_grad_(False)

    model = TinyBlockModel()
    _, trainer, rec = _fit(
        tmp_path, [Schedule([OUTSIDE | _block(0)]), Meddler(1, freeze_head)], model=model, max_steps=4
    )
    assert [("head.weight" in t) for t in rec.trainable] == [True, False, False, False]
    assert "head.weight" not in TrainableSetController.of(trainer).candidates
    assert not model.head.weight.requires_grad  # not made trainable again at the end of fit: it is theirs
    (message,) = _messages(recwarn, "froze 2 parameters that Schedule let train")
    assert "`head.weight`, `head.bias`" in message and "They stay frozen" in message


def test_a_parameter_frozen_at_fit_start_and_unfrozen_later_joins_the_candidates(tmp_path, recwarn):
    def unfreeze_blocks(module):
        module.blocks.requires_grad_(True)

    model = TinyBlockModel()
    model.blocks.requires_grad_(False)  # as BackboneFinetuning does before training
    _, trainer, rec = _fit(
        tmp_path, [Schedule([OUTSIDE | _block(2)]), Meddler(1, unfreeze_blocks)], model=model, max_steps=4
    )
    # batch 1 is read after the meddler unfroze every block; from the next step the method's set holds on them
    assert [rec.trainable[0], *rec.trainable[2:]] == [OUTSIDE, OUTSIDE | _block(2), OUTSIDE | _block(2)]
    assert _block(0) <= set(TrainableSetController.of(trainer).candidates)
    (message,) = _messages(recwarn, "were frozen when training started")
    assert "made 24 parameters trainable" in message and "Schedule allow" in message


def test_unfreezing_a_parameter_ddp_left_out_is_refused():
    model = TinyBlockModel()
    model.blocks.requires_grad_(False)
    controller = TrainableSetController()
    controller.participants = [Schedule([None])]
    controller.candidates = {n: p for n, p in model.named_parameters() if p.requires_grad}
    controller._outsiders = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    controller._allowed_now, controller._last_wishes = set(controller.candidates), [None]
    model.blocks.requires_grad_(True)
    trainer = SimpleNamespace(strategy=DDPStrategy(), callbacks=[], global_step=3, optimizers=[])
    with pytest.raises(ValueError, match=r"frozen when DDP wrapped the model.*`blocks.0.norm.weight`.*HINT"):
        controller.on_train_batch_start(trainer, model, None, 0)


def test_likely_culprit_names_the_callbacks_that_change_requires_grad():
    from lightning.pytorch.callbacks import BackboneFinetuning, ModelPruning

    from lightning_peft.trainable import likely_culprit

    callbacks = [BackboneFinetuning(), ModelPruning("l1_unstructured"), Recorder()]
    assert likely_culprit(SimpleNamespace(callbacks=callbacks)) == "BackboneFinetuning or ModelPruning"
    assert likely_culprit(SimpleNamespace(callbacks=[Recorder()])) == "the LightningModule or a callback"


def test_a_parameter_unfrozen_before_the_first_step_joins_the_candidates_at_once(tmp_path, recwarn):
    class UnfreezeAtEpochStart(Callback):  # as BackboneFinetuning(unfreeze_backbone_at_epoch=0) does
        def on_train_epoch_start(self, trainer, pl_module):
            pl_module.blocks.requires_grad_(True)

    model = TinyBlockModel()
    model.blocks.requires_grad_(False)
    _, _, rec = _fit(tmp_path, [Schedule([OUTSIDE | _block(2)]), UnfreezeAtEpochStart()], model=model, max_steps=2)
    assert rec.trainable == [OUTSIDE | _block(2)] * 2
    assert _messages(recwarn, "Before optimizer step 0, the LightningModule or a callback made 24 parameters")
