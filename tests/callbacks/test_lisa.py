import lightning.pytorch as pl
import pytest
import torch
from figures import bar_spans, capture_saved_figures, history_spans
from helpers import TinyBlockModel, changed, retry_spawn_teardown_abort, snapshot, trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft.callbacks import LISA

OUTSIDE = {"embed.weight", "embed.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}


def _block_names(model, indices):
    return {n for n, _ in model.named_parameters() if n.startswith("blocks.") and int(n.split(".")[1]) in indices}


class History(Callback):
    def __init__(self, lisa):
        self.lisa = lisa
        self.sampled = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sampled.append(tuple(self.lisa.sampled))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_layers": 0}, r"`n_layers` must be an integer >= 1.*got 0.*HINT"),
        ({"n_layers": 1.5}, r"`n_layers` must be an integer"),
        ({"n_layers": True}, r"`n_layers` must be an integer >= 1.*got True"),  # a bool is not a number
        ({"plot": "no"}, r"`plot` must be True or False, got 'no'"),
        ({"seed": 1.5}, r"`seed` must be None or an integer"),
        ({"interval": 0}, r"`interval` must be an integer >= 1.*got 0.*HINT"),
        ({"layer_weights": [1.0, -1.0, 1.0]}, r"`layer_weights` must be non-negative"),
        ({"n_layers": 2, "layer_weights": [0.0, 0.0, 1.0]}, r"at least `n_layers`=2 positive values"),
    ],
)
def test_misconfiguration_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LISA(**kwargs)


def test_too_many_layers_for_the_model(tmp_path):
    trainer = pl.Trainer(callbacks=[LISA(n_layers=5)], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(
        ValueError, match=r"`n_layers` must be between 1 and 4 \(the model has 4 blocks at 'blocks'\), got 5"
    ):
        trainer.fit(TinyBlockModel())


def test_wrong_layers_path(tmp_path):
    trainer = pl.Trainer(callbacks=[LISA(layers="encoder.layer")], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"`layers='encoder.layer'`.*Candidate container paths: \['blocks'\]"):
        trainer.fit(TinyBlockModel())


def test_only_sampled_blocks_and_outside_change_within_an_interval(tmp_path):
    model = TinyBlockModel()
    before = snapshot(model)
    lisa = LISA(n_layers=2, interval=50, seed=3)
    trainer = pl.Trainer(callbacks=[lisa], max_steps=6, **trainer_kwargs(tmp_path))
    trainer.fit(model)
    assert len(lisa.sampled) == 2
    assert changed(before, model) == OUTSIDE | _block_names(model, lisa.sampled)
    expected = sum(p.numel() for n, p in model.named_parameters() if n in OUTSIDE | _block_names(model, lisa.sampled))
    assert trainer.callback_metrics["trainable_params"].item() == expected
    assert all(p.requires_grad for p in model.parameters())  # given back as it came after fit


def test_every_block_is_sampled_over_a_run_and_resampled_on_schedule(tmp_path):
    lisa = LISA(n_layers=1, interval=3, seed=0)
    history = History(lisa)
    trainer = pl.Trainer(callbacks=[lisa, history], max_steps=36, **trainer_kwargs(tmp_path))
    trainer.fit(TinyBlockModel())
    assert {b for s in history.sampled for b in s} == {0, 1, 2, 3}
    for start in range(0, 36, 3):  # constant within each period
        assert len(set(history.sampled[start : start + 3])) == 1


def test_seed_makes_runs_reproducible_and_verbose_prints(tmp_path, capsys, caplog):
    runs = []
    for _ in range(2):
        lisa = LISA(n_layers=2, interval=2, seed=11, verbose=True)
        history = History(lisa)
        pl.Trainer(callbacks=[lisa, history], max_steps=8, **trainer_kwargs(tmp_path)).fit(TinyBlockModel())
        runs.append(history.sampled)
    assert runs[0] == runs[1]
    assert "LISA step 2: training blocks" in caplog.text + capsys.readouterr().err


def test_seed_everything_seed_is_used_without_explicit_seed(tmp_path):
    runs = []
    for _ in range(2):
        pl.seed_everything(5)
        lisa = LISA(n_layers=1, interval=1)
        history = History(lisa)
        pl.Trainer(callbacks=[lisa, history], max_steps=10, **trainer_kwargs(tmp_path)).fit(TinyBlockModel())
        runs.append(history.sampled)
    assert runs[0] == runs[1]


def test_resume_mid_interval_matches_uninterrupted_run(tmp_path):
    # 12 batches per epoch, interval 5: the epoch-end checkpoint at step 12 falls in the middle of a period.
    torch.manual_seed(0)
    reference = TinyBlockModel()
    start = snapshot(reference)
    pl.Trainer(callbacks=[LISA(n_layers=2, interval=5, seed=7)], max_epochs=3, **trainer_kwargs(tmp_path / "a")).fit(
        reference
    )

    first = TinyBlockModel()
    first.load_state_dict(start)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kw = trainer_kwargs(tmp_path / "b", enable_checkpointing=True)
    pl.Trainer(callbacks=[LISA(n_layers=2, interval=5, seed=7), checkpoint], max_epochs=1, **kw).fit(first)

    resumed = TinyBlockModel()
    lisa = LISA(n_layers=2, interval=5, seed=999)  # the checkpoint's sampler state must win over this seed
    trainer = pl.Trainer(callbacks=[lisa, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=3, **kw)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 36
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, dict(resumed.named_parameters())[name], rtol=0, atol=0, msg=name)


class RankDump(Callback):
    def __init__(self, lisa, path):
        self.lisa, self.path, self.sampled = lisa, path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sampled.append(tuple(self.lisa.sampled))

    def on_train_end(self, trainer, pl_module):
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save({"sampled": self.sampled, "weights": weights}, f"{self.path}/rank{trainer.global_rank}.pt")


@retry_spawn_teardown_abort
def test_ddp_ranks_sample_the_same_blocks_and_stay_identical(tmp_path):
    lisa = LISA(n_layers=1, interval=2)  # no seed, no seed_everything: ranks must still agree
    trainer = pl.Trainer(
        callbacks=[lisa, RankDump(lisa, tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=8),
    )
    trainer.fit(TinyBlockModel())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert len(set(ranks[0]["sampled"])) > 1  # it did resample
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(weight, ranks[1]["weights"][name], msg=name)


def test_plot_of_sampled_blocks_is_saved_in_the_log_dir(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    figures = capture_saved_figures(monkeypatch)
    lisa = LISA(n_layers=1, interval=2, seed=1)
    kw = trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path, name="run"))
    trainer = pl.Trainer(callbacks=[lisa], max_steps=8, **kw)
    trainer.fit(TinyBlockModel())
    assert [step for step, _ in lisa.history] == [0, 2, 4, 6]
    png = tmp_path / "run" / "version_0" / "lisa_blocks.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    # the figure draws, for each period, a bar from its first step to the next draw on the row of each sampled block
    (figure,) = figures
    (ax,) = figure.axes
    assert bar_spans(ax) == history_spans(lisa.history, 8)
    assert ax.get_xlim() == (0, 8) and ax.get_ylim() == (-0.5, 3.5)  # every step, all 4 blocks


DDP_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch
sys.path.insert(0, {tests!r})
from helpers import TinyBlockModel
from lightning_peft.callbacks import LISA


class Dump(pl.Callback):
    def __init__(self, lisa, out):
        self.lisa, self.out, self.sampled = lisa, out, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.sampled.append(tuple(self.lisa.sampled))

    def on_train_end(self, trainer, pl_module):
        weights = {{n: p.detach().clone() for n, p in pl_module.named_parameters()}}
        torch.save({{"sampled": self.sampled, "weights": weights}}, f"{{self.out}}/rank{{trainer.global_rank}}.pt")


if __name__ == "__main__":
    lisa = LISA(n_layers=1, interval=2)
    callbacks = [lisa, Dump(lisa, sys.argv[1])]
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=callbacks)
    trainer.fit(TinyBlockModel())
"""


def test_plain_ddp_script_needs_no_extra_flags(tmp_path):
    """What a user writes: `strategy="ddp"` in a script (Lightning relaunches it per rank), no seed, no flags."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parents[1])))
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(weight, ranks[1]["weights"][name], rtol=0, atol=0, msg=name)


def test_layer_weights_steer_sampling(tmp_path):
    lisa = LISA(n_layers=1, interval=1, layer_weights=[0.0, 1.0, 0.0, 3.0], seed=0)
    history = History(lisa)
    pl.Trainer(callbacks=[lisa, history], max_steps=40, **trainer_kwargs(tmp_path)).fit(TinyBlockModel())
    counts = {b: sum(s == (b,) for s in history.sampled) for b in range(4)}
    assert counts[0] == counts[2] == 0  # weight 0: never trained
    assert counts[3] > counts[1] > 0  # three times the weight: sampled more often


def test_layer_weights_must_match_the_blocks(tmp_path):
    trainer = pl.Trainer(
        callbacks=[LISA(n_layers=1, layer_weights=[1.0, 1.0])], max_steps=1, **trainer_kwargs(tmp_path)
    )
    with pytest.raises(ValueError, match=r"`layer_weights` must have one weight per block \(4 at 'blocks'\), got 2"):
        trainer.fit(TinyBlockModel())


class TwoStackModel(TinyBlockModel):
    """An encoder of 4 blocks and a decoder of 2 (two stacks)."""

    def __init__(self) -> None:
        super().__init__(n_blocks=4)
        from helpers import Block

        self.decoder = torch.nn.ModuleList(Block(8) for _ in range(2))

    def forward(self, x):
        h = self.embed(x)
        for block in (*self.blocks, *self.decoder):
            h = block(h)
        return self.head(self.norm(h))


def test_pool_of_all_stacks_and_per_stack_sampling(tmp_path):
    pool = LISA(n_layers=1, interval=1, seed=0, layers=["blocks", "decoder"], plot=False)
    module = TwoStackModel()
    pl.Trainer(callbacks=[pool], max_steps=40, **trainer_kwargs(tmp_path)).fit(module)
    assert pool.stack.paths == ["blocks", "decoder"]
    drawn = {block for _, blocks in pool.history for block in blocks}
    assert drawn == set(range(6))  # every block of both stacks, from one pool of 6
    per_stack = LISA(n_layers=1, interval=1, seed=0, layers=["blocks", "decoder"], per_stack=True, plot=False)
    pl.Trainer(callbacks=[per_stack], max_steps=5, **trainer_kwargs(tmp_path)).fit(TwoStackModel())
    for _, blocks in per_stack.history:  # one block of each stack at every draw
        assert len(blocks) == 2 and blocks[0] < 4 <= blocks[1]
    with pytest.raises(ValueError, match=r"`n_layers` must be between 1 and 2 with `per_stack=True`.*'decoder'"):
        lisa = LISA(n_layers=3, per_stack=True, layers=["blocks", "decoder"])
        pl.Trainer(callbacks=[lisa], max_steps=1, **trainer_kwargs(tmp_path)).fit(TwoStackModel())


def test_plot_marks_the_stacks_and_leaves_the_matplotlib_backend_alone(tmp_path, monkeypatch):
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        lisa = LISA(n_layers=1, interval=2, seed=0, layers=["blocks", "decoder"], per_stack=True)
        pl.Trainer(callbacks=[lisa], max_steps=6, **trainer_kwargs(tmp_path)).fit(TwoStackModel())
        figures = capture_saved_figures(monkeypatch)
        path = lisa.plot_history(str(tmp_path / "plot" / "lisa.png"), end_step=6)
        assert matplotlib.get_backend() == "pdf"
        with open(path, "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"
        (ax,) = figures[0].axes
        # one bar per sampled block and period (one block of each stack), a line where the decoder stack starts
        drawn = history_spans(lisa.history, 6)
        assert bar_spans(ax) == drawn and len(drawn) == 2 * len(lisa.history)
        assert [line.get_ydata()[0] for line in ax.lines] == [3.5]
        assert sorted(text.get_text().strip() for text in ax.texts) == ["blocks", "decoder"]
    finally:
        matplotlib.use(previous)


# ------------------------------------------------------------------------------------- embeddings, head, prefix

EMBED, HEAD = {"embed.weight", "embed.bias"}, {"head.weight", "head.bias"}


class PerStep(Callback):
    """Per optimizer step: what requires grad during the step, what the step changed, and LISA's draws."""

    def __init__(self, lisa):
        self.lisa, self.steps = lisa, []

    def on_before_backward(self, trainer, pl_module, loss):
        self._before = snapshot(pl_module)
        self._requires = {n for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        lisa = self.lisa
        self.steps.append(
            (self._requires, changed(self._before, pl_module), set(lisa.sampled), lisa.embeddings_trained,
             lisa.head_trained)
        )  # fmt: skip


@pytest.mark.parametrize(
    ("embeddings", "head"), [("frozen", "always"), ("always", "frozen"), ("sampled", "sampled"), ("frozen", "sampled")]
)
def test_embeddings_and_head_train_as_chosen_at_every_step(tmp_path, embeddings, head):
    model = TinyBlockModel()
    lisa = LISA(n_layers=2, interval=1, seed=0, embeddings=embeddings, head=head)
    record = PerStep(lisa)
    pl.Trainer(callbacks=[lisa, record], max_steps=24, **trainer_kwargs(tmp_path)).fit(model)
    draws = set()
    for requires, updated, sampled, embeddings_trained, head_trained in record.steps:
        expected = {"norm.weight", "norm.bias"} | _block_names(model, sampled)
        expected |= (EMBED if embeddings_trained else set()) | (HEAD if head_trained else set())
        assert requires == expected and updated == expected
        draws.add((embeddings_trained, head_trained))
    assert {e for e, _ in draws} == {"frozen": {False}, "always": {True}, "sampled": {False, True}}[embeddings]
    assert {h for _, h in draws} == {"frozen": {False}, "always": {True}, "sampled": {False, True}}[head]


def test_sampled_embeddings_leave_the_blocks_drawn_as_by_default(tmp_path):
    runs = []
    for kwargs in ({}, {"embeddings": "sampled", "head": "sampled"}):
        lisa = LISA(n_layers=1, interval=2, seed=4, **kwargs)
        history = History(lisa)
        pl.Trainer(callbacks=[lisa, history], max_steps=12, **trainer_kwargs(tmp_path)).fit(TinyBlockModel())
        runs.append(history.sampled)
    assert runs[0] == runs[1]


def test_resume_with_sampled_embeddings_and_head_matches_uninterrupted_run(tmp_path):
    def lisa(seed=7):
        return LISA(n_layers=1, interval=5, seed=seed, embeddings="sampled", head="sampled")

    torch.manual_seed(0)
    reference = TinyBlockModel()
    start = snapshot(reference)
    pl.Trainer(callbacks=[lisa()], max_epochs=3, **trainer_kwargs(tmp_path / "a")).fit(reference)
    first = TinyBlockModel()
    first.load_state_dict(start)
    kw = trainer_kwargs(tmp_path / "b", enable_checkpointing=True)
    pl.Trainer(callbacks=[lisa(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=1, **kw).fit(
        first
    )
    resumed = TinyBlockModel()
    callback = lisa(seed=999)
    trainer = pl.Trainer(callbacks=[callback, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=3, **kw)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 36
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, dict(resumed.named_parameters())[name], rtol=0, atol=0, msg=name)


def test_bad_embeddings_and_head_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`embeddings` must be one of .*'always'.*got 'sometimes'.*HINT"):
        LISA(embeddings="sometimes")
    with pytest.raises(ValueError, match=r"`head` must be one of .*got 'no'.*HINT"):
        LISA(head="no")
    with pytest.raises(ValueError, match=r"`no_grad_prefix` must be True or False"):
        LISA(no_grad_prefix="yes")
    from lightning_peft.modules import CausalLM

    tied = CausalLM(config={"model_type": "gpt2", "vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2})
    with pytest.raises(
        ValueError, match=r"`embeddings='frozen'` and `head='always'` differ, but the head is tied.*HINT"
    ):
        LISA(n_layers=1, embeddings="frozen").preview(tied)
    plan = LISA(n_layers=1, embeddings="frozen", head="frozen", seed=0).preview(tied)
    assert "model.transformer.wte.weight" in plan.embeddings and "model.transformer.wpe.weight" in plan.embeddings
    assert plan.head == ("model.transformer.wte.weight",) and not plan.trainable & set(plan.embeddings)

    class NoEmbeddings(TinyBlockModel):  # its first layer is named `stem`: nothing says it embeds the input
        def __init__(self):
            super().__init__()
            self.stem = self.embed
            del self.embed

        def forward(self, x):
            h = self.stem(x)
            for block in self.blocks:
                h = block(h)
            return self.head(self.norm(h))

    with pytest.raises(ValueError, match=r"`embeddings='frozen'` needs the model's input embeddings.*HINT"):
        LISA(n_layers=1, embeddings="frozen").preview(NoEmbeddings())


LLAMA = {
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _llama(checkpointing):
    from lightning_peft.modules import CausalLM

    torch.manual_seed(0)
    module = CausalLM(config=LLAMA).train()  # no dropout in Llama; checkpointing only runs in training mode
    if checkpointing:  # transformers marks the embedding output as requiring grad (enable_input_require_grads)
        module.model.gradient_checkpointing_enable()
    else:
        module.model.enable_input_require_grads()
    module.model.model.embed_tokens.requires_grad_(False)
    for block in module.model.model.layers[:2]:
        block.requires_grad_(False)
    return module


def _step(module, batch):
    module.zero_grad(set_to_none=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_frozen_prefix_gives_the_same_loss_and_gradients_and_saves_activations(checkpointing):
    from lightning_peft.frozen_prefix import FrozenPrefix

    module = _llama(checkpointing)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, grads, saved = _step(module, batch)
    prefix = FrozenPrefix(module.model.model.layers[:2])
    prefix_loss, prefix_grads, prefix_saved = _step(module, batch)
    assert prefix.calls_without_graph == 2
    prefix.remove()
    torch.testing.assert_close(prefix_loss, loss, rtol=0, atol=0)
    assert prefix_grads.keys() == grads.keys() and all(".layers.2." in n or ".layers.3." in n or "norm" in n
                                                       or "lm_head" in n for n in grads)  # fmt: skip
    for name, grad in grads.items():
        torch.testing.assert_close(prefix_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert prefix_saved < saved  # the two frozen blocks keep nothing for backward
    assert _step(module, batch)[2] == saved  # removed: as before


def test_frozen_prefix_steps_aside_when_something_below_trains():
    from lightning_peft.frozen_prefix import FrozenPrefix

    module = _llama(checkpointing=False)
    module.model.model.embed_tokens.requires_grad_(True)  # the embeddings train: gradients must reach them
    ids = torch.randint(0, 97, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    _, grads, _ = _step(module, batch)
    prefix = FrozenPrefix(module.model.model.layers[:2])
    _, prefix_grads, _ = _step(module, batch)
    assert prefix.calls_without_graph == 0
    torch.testing.assert_close(
        prefix_grads["model.model.embed_tokens.weight"], grads["model.model.embed_tokens.weight"]
    )


class PrefixSeen(Callback):
    def __init__(self, lisa):
        self.lisa, self.seen = lisa, []

    def on_before_backward(self, trainer, pl_module, loss):
        prefix = self.lisa.prefix
        state = None if prefix is None else (len(prefix.blocks), prefix.calls_without_graph)
        self.seen.append((min(self.lisa.sampled), state))


@pytest.mark.parametrize("no_grad_prefix", [True, False])
def test_lisa_installs_the_frozen_prefix_at_boundaries(tmp_path, no_grad_prefix):
    module = _llama(checkpointing=True).train()
    module.model.model.requires_grad_(True)
    lisa = LISA(n_layers=1, interval=2, seed=1, embeddings="frozen", no_grad_prefix=no_grad_prefix)
    seen = PrefixSeen(lisa)
    ids = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=2)
    trainer = pl.Trainer(callbacks=[lisa, seen], max_steps=8, accumulate_grad_batches=2, **trainer_kwargs(tmp_path))
    trainer.fit(module, train_dataloaders=loader)
    assert len(seen.seen) == 16 and len({lowest for lowest, _ in seen.seen}) > 1
    for lowest, prefix in seen.seen:
        if no_grad_prefix and lowest > 0:
            assert prefix is not None and prefix[0] == lowest and prefix[1] >= lowest
        else:
            assert prefix is None
    assert lisa.prefix is None  # removed at the end of training
