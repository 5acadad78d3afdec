import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyBlockModel, changed, snapshot, trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft.callbacks import LISA, GradualUnfreezing
from lightning_peft.layout.depth import depth_groups

pytestmark = pytest.mark.usefixtures("one_thread")

TOP = {"norm.weight", "norm.bias", "head.weight", "head.bias"}
EMBED = {"embed.weight", "embed.bias"}
SCRIPT = Path(__file__).parents[1] / "unfreezing_script.py"


def _block(index):
    return {
        f"blocks.{index}.{p}" for p in ("norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    }


class Record(Callback):
    """Per optimizer step: the parameters that train, those that moved, those with optimizer state."""

    def __init__(self):
        self.trainable, self.moved, self.state = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = snapshot(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.moved.append(changed(self.before, pl_module))
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.state.append({names[id(p)] for p in trainer.optimizers[0].state})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"unfreeze_every": 0}, r"`unfreeze_every` must be an integer >= 1.*got 0.*HINT"),
        ({"unfreeze_every": True}, r"`unfreeze_every` must be an integer >= 1.*got True"),
        ({"unit": "batches"}, r"`unit` must be one of \['steps', 'epochs'\], got 'batches'.*HINT"),
        ({"embeddings": "first"}, r"`embeddings` must be one of \['last', 'never'\], got 'first'.*HINT"),
        ({"blocks_per_stage": 0}, r"`blocks_per_stage` must be an integer >= 1.*HINT"),
        ({"milestones": [10, 10]}, r"`milestones` must be a non-empty list of strictly increasing.*HINT"),
        ({"milestones": [0, 5]}, r"`milestones` must be .*got \[0, 5\].*HINT"),
        ({"milestones": []}, r"`milestones` must be a non-empty list"),
        ({"milestones": [5], "unfreeze_every": 2}, r"`unfreeze_every` and `milestones` cannot both be given.*HINT"),
        ({"verbose": "yes"}, r"`verbose` must be True or False"),
    ],
)
def test_misconfiguration_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualUnfreezing(**kwargs)


def test_default_is_one_block_per_epoch():
    callback = GradualUnfreezing()
    assert (callback.unfreeze_every, callback.unit, callback.milestones) == (1, "epochs", None)
    # it never freezes what trained: composed with LISA(release_optimizer_state=False), LISA's choice holds
    assert callback.release_optimizer_state is False


def test_more_milestones_than_stages_is_refused_at_setup(tmp_path):
    # head, 4 blocks, embeddings: 6 stages, so at most 5 milestones
    trainer = pl.Trainer(callbacks=[GradualUnfreezing(milestones=[1, 2, 3, 4, 5, 6], unit="steps")], max_steps=2,
                         **trainer_kwargs(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match=r"`milestones` must have at most 5 entries.*got 6.*HINT"):
        trainer.fit(TinyBlockModel())


def test_a_model_without_a_head_is_refused(tmp_path):
    class Headless(TinyBlockModel):
        def __init__(self):
            super().__init__()
            del self.norm, self.head

        def forward(self, x):
            h = self.embed(x)
            for block in self.blocks:
                h = block(h)
            return h[:, :3]

    trainer = pl.Trainer(callbacks=[GradualUnfreezing(unit="steps")], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"no trainable parameter after its last block.*HINT"):
        trainer.fit(Headless())


def test_preview_lists_the_stages_top_down():
    plan = GradualUnfreezing(unfreeze_every=5, unit="steps").preview(TinyBlockModel())
    assert plan.n_blocks == 4 and len(plan.stages) == 6
    assert plan.stages[0] == TOP
    for stage in range(1, 5):  # the top block (3) first
        assert plan.stages[stage] - plan.stages[stage - 1] == _block(4 - stage)
    assert plan.stages[5] - plan.stages[4] == EMBED
    assert plan.trainable == plan.stages[-1] == {n for n, _ in TinyBlockModel().named_parameters()}
    never = GradualUnfreezing(embeddings="never", blocks_per_stage=3).preview(TinyBlockModel())
    assert [len(s) for s in never.stages] == [4, 4 + 18, 4 + 24]  # blocks 3, 2, 1 then block 0; no embeddings
    assert not never.trainable & EMBED


def test_steps_schedule_unfreezes_top_down_and_frozen_parameters_stay(tmp_path):
    record = Record()
    gu = GradualUnfreezing(unfreeze_every=2, unit="steps")
    model = TinyBlockModel()
    trainer = pl.Trainer(callbacks=[gu, record], max_steps=12, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    expected = [TOP]
    for block in (3, 2, 1, 0):
        expected.append(expected[-1] | _block(block))
    expected.append(expected[-1] | EMBED)
    for step in range(12):
        stage = min(step // 2, 5)
        assert record.trainable[step] == expected[stage], step
        assert record.moved[step] == expected[stage], step  # only what trains moves (weight decay included)
        assert record.state[step] == expected[stage], step  # optimizer state only for what trained
    assert gu.history == [(0, 0), (2, 1), (4, 2), (6, 3), (8, 4), (10, 5)]
    assert all(p.requires_grad for p in model.parameters())  # flags restored after fit


def test_milestones_in_epochs_and_blocks_per_stage(tmp_path):
    record = Record()
    gu = GradualUnfreezing(milestones=[1, 3], unit="epochs", blocks_per_stage=2, embeddings="never")
    # 12 batches per epoch, 4 epochs
    trainer = pl.Trainer(callbacks=[gu, record], max_epochs=4, **trainer_kwargs(tmp_path))
    trainer.fit(TinyBlockModel())
    per_epoch = 12
    stage_1 = TOP | _block(3) | _block(2)
    expected = [TOP] * per_epoch + [stage_1] * 2 * per_epoch + [stage_1 | _block(1) | _block(0)] * per_epoch
    assert record.trainable == expected
    assert [step for step, _ in gu.history] == [0, 12, 36]


def test_stages_change_only_between_optimizer_steps(tmp_path):
    record = Record()
    gu = GradualUnfreezing(unfreeze_every=1, unit="steps")
    trainer = pl.Trainer(callbacks=[gu, record], max_steps=3, accumulate_grad_batches=2, **trainer_kwargs(tmp_path))
    trainer.fit(TinyBlockModel())
    assert record.trainable == [TOP, TOP | _block(3), TOP | _block(3) | _block(2)]


def test_composes_with_lisa(tmp_path):
    record = Record()
    lisa = LISA(n_layers=2, interval=1, seed=0, plot=False)
    gu = GradualUnfreezing(unfreeze_every=3, unit="steps")
    trainer = pl.Trainer(callbacks=[lisa, gu, record], max_steps=9, **trainer_kwargs(tmp_path))
    trainer.fit(TinyBlockModel())
    history = dict(lisa.history)
    for step, trainable in enumerate(record.trainable):
        unfrozen = set().union(*(_block(b) for b in range(4 - step // 3, 4)))
        sampled = set().union(*(_block(b) for b in history[step]))
        assert trainable == TOP | (unfrozen & sampled), step  # the embeddings wait for a later stage


def test_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path):
    """Stopped at step 12 (an epoch's end: the plain DataLoader cannot resume mid-epoch), in the middle of stage 2."""
    kw = trainer_kwargs(tmp_path)
    torch.manual_seed(0)
    reference = TinyBlockModel()
    initial = snapshot(reference)
    gu = GradualUnfreezing(unfreeze_every=5, unit="steps")
    pl.Trainer(callbacks=[gu], max_steps=24, **kw).fit(reference)

    first = TinyBlockModel()
    first.load_state_dict(initial)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=0)
    kw_ckpt = {**kw, "enable_checkpointing": True}
    stopped = GradualUnfreezing(unfreeze_every=5, unit="steps")
    pl.Trainer(callbacks=[stopped, checkpoint], max_steps=12, **kw_ckpt).fit(first)
    assert stopped.stage == 2

    resumed = TinyBlockModel()
    resumed.load_state_dict(initial)
    again = GradualUnfreezing(unfreeze_every=5, unit="steps")
    pl.Trainer(callbacks=[again], max_steps=24, **kw).fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, dict(resumed.named_parameters())[name], rtol=0, atol=0, msg=name)
    assert again.history == gu.history


def test_the_top_group_holds_the_head_and_the_tied_embeddings_of_a_causal_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    groups = depth_groups(lm)
    assert "transformer.wte.weight" in groups.top and "transformer.ln_f.weight" in groups.top
    assert groups.embeddings == ("transformer.wpe.weight",)
    assert groups.groups[1][0].startswith("transformer.h.1.")


def _run_script(strategy, scenario, out, steps, resume=0):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), strategy, scenario, str(out), str(steps), str(resume)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    prefix = "resumed_" if resume else ""
    return [torch.load(out / f"{prefix}rank{rank}.pt", weights_only=False) for rank in range(2)]


def _assert_ranks_identical(ranks):
    assert ranks[0]["steps"] == ranks[1]["steps"]
    for name, weight in ranks[0]["final"].items():
        torch.testing.assert_close(weight, ranks[1]["final"][name], rtol=0, atol=0, msg=name)


def test_plain_ddp_script_needs_no_find_unused_parameters(tmp_path):
    """`strategy="ddp"` in a user's script (Lightning relaunches it per rank), no DDP flag set by the user."""
    ranks = _run_script("ddp", "gu", tmp_path, 6)
    _assert_ranks_identical(ranks)
    assert [len(s["trainable"]) for s in ranks[0]["steps"]] == [4, 4, 10, 10, 16, 16]


@pytest.mark.slow
def test_fsdp2_with_layerwise_lr_decay_resumes_exactly(tmp_path):
    """Under FSDP2 (blocks sharded): stop after 4 steps (mid-schedule), resume to 6: bit for bit, on both ranks."""
    reference = _run_script("fsdp2", "both", tmp_path / "reference", 6)
    _assert_ranks_identical(reference)
    counts = [len(s["trainable"]) for s in reference[0]["steps"]]
    assert counts[0] == counts[1] < counts[2] == counts[3] < counts[4] == counts[5]  # a block every 2 steps
    from fsdp2_script import ShardedViT

    from lightning_peft.callbacks import LayerwiseLRDecay

    plan = LayerwiseLRDecay(decay=0.5).preview(ShardedViT())
    for step, record in enumerate(reference[0]["steps"]):  # the LambdaLR warm-up times 0.5 ** depth, every group
        for name, lr in record["lr"].items():
            assert lr == pytest.approx(1e-3 * min(1.0, (step + 1) / 3) * plan.factors[name], rel=1e-12), name
    _run_script("fsdp2", "both", tmp_path / "split", 4)
    resumed = _run_script("fsdp2", "both", tmp_path / "split", 6, 1)
    _assert_ranks_identical(resumed)
    for name, weight in reference[0]["final"].items():
        torch.testing.assert_close(resumed[0]["final"][name], weight, rtol=0, atol=0, msg=name)
    assert resumed[0]["steps"] == reference[0]["steps"][4:]
