import math

import lightning.pytorch as pl
import pytest
import torch
from figures import capture_saved_figures
from helpers import TinyBlockModel, changed, retry_spawn_teardown_abort, snapshot, tiny_transformer, trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_peft.adapters import AdapterConfig, add_adapters, mark_only_adapters_as_trainable
from lightning_peft.callbacks import IST

OUTSIDE = {"embed.weight", "embed.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}


pytestmark = pytest.mark.usefixtures("one_thread")


class AdapterModel(TinyBlockModel):
    """TinyBlockModel whose blocks are frozen and carry a bottleneck adapter; embedding, norm and head train."""

    def __init__(self, n_blocks: int = 4, **kwargs) -> None:
        super().__init__(n_blocks=n_blocks, **kwargs)
        add_adapters(self, AdapterConfig(sites={"mlp": ["fc1", "fc2"]}, bottleneck_size=4), freeze_base=False)
        mark_only_adapters_as_trainable(self, ["embed", "head"])
        self.norm.requires_grad_(True)


class LossHookModel(AdapterModel):
    """Records, for each call of `compute_loss`, whether gradients were on and which modules were in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_calls = []

    def compute_loss(self, batch):
        self.loss_calls.append((torch.is_grad_enabled(), {n for n, m in self.named_modules() if m.training}))
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def _adapter_params(model, blocks):
    return {n for n, _ in model.named_parameters() if ".adapters." in n and int(n.split(".")[1]) in blocks}


def _base_block_params(model):
    return {n for n, _ in model.named_parameters() if n.startswith("blocks.") and ".adapters." not in n}


class StepRecorder(Callback):
    """The sampled blocks and the parameters with requires_grad at each optimizer step."""

    def __init__(self, ist):
        self.ist, self.steps = ist, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        trainable = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        self.steps.append((tuple(self.ist.sampled), trainable))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"update_ratio": 0.0}, r"`update_ratio` must be a fraction of the layers in \(0, 1\], got 0.0.*HINT"),
        ({"candidate_ratio": 1.5}, r"`candidate_ratio` must be a fraction"),
        ({"interval": 0}, r"`interval` must be an integer >= 1"),
        ({"n_candidates": 1}, r"`n_candidates` must be an integer >= 2"),
        ({"suppression": 1.0}, r"`suppression` must be in \[0, 1\)"),
        ({"reward_lr": 0}, r"`reward_lr` must be a positive number"),
    ],
)
def test_misconfiguration_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IST(**kwargs)


def test_a_model_without_peft_modules_is_refused(tmp_path):
    trainer = pl.Trainer(callbacks=[IST()], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"the blocks at 'blocks' hold none.*HINT: adapt the model first"):
        trainer.fit(TinyBlockModel())


def test_a_ratio_that_selects_no_block_is_refused(tmp_path):
    trainer = pl.Trainer(callbacks=[IST(update_ratio=0.25)], max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"`update_ratio`=0.25 selects int\(0.25 \* 2\) = 0 of the 2 blocks"):
        trainer.fit(AdapterModel(n_blocks=2))


def test_n_blocks_counts_every_block_and_the_old_name_warns(tmp_path):
    ist = IST(update_ratio=0.5, interval=100)
    pl.Trainer(callbacks=[ist], max_steps=1, **trainer_kwargs(tmp_path)).fit(AdapterModel(n_blocks=4))
    assert ist.n_blocks == 4 and ist.n_trained == 2  # LISA's `n_layers` is the blocks sampled; IST's total is this
    with pytest.warns(DeprecationWarning, match="`IST.n_layers` is renamed `IST.n_blocks`"):
        assert ist.n_layers == 4


def test_only_the_peft_parameters_of_sampled_blocks_train(tmp_path):
    model = AdapterModel()
    before = snapshot(model)
    ist = IST(update_ratio=0.5, interval=3, seed=0)
    recorder = StepRecorder(ist)
    pl.Trainer(callbacks=[ist, recorder], max_steps=12, **trainer_kwargs(tmp_path)).fit(model)
    assert len(recorder.steps) == 12
    for sampled, trainable in recorder.steps:
        assert len(sampled) == 2  # int(0.5 * 4)
        assert trainable == OUTSIDE | _adapter_params(model, sampled)  # head etc. keep training, base stays frozen
    assert len({sampled for sampled, _ in recorder.steps}) > 1  # resampled at every step
    ever = {b for sampled, _ in recorder.steps for b in sampled}
    assert changed(before, model) == OUTSIDE | _adapter_params(model, ever)
    assert not changed(before, model) & _base_block_params(model)


class AdamSteps(Callback):
    """After each optimizer step: Adam's step count of every adapter parameter that has optimizer state."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.steps.append({names[id(p)]: int(s["step"]) for p, s in state.items() if ".adapters." in names[id(p)]})


@pytest.mark.parametrize("release", [False, True])
def test_optimizer_state_of_undrawn_layers_is_kept_unless_released(tmp_path, release):
    """The official code only flips requires_grad: Adam's moments persist; released, they restart at each draw."""
    assert IST().release_optimizer_state is False  # the official behaviour is the default
    model = AdapterModel()
    ist = IST(update_ratio=0.25, interval=100, seed=0, release_optimizer_state=release)
    recorder, adam = StepRecorder(ist), AdamSteps()
    pl.Trainer(callbacks=[ist, recorder, adam], max_steps=12, **trainer_kwargs(tmp_path)).fit(model)
    draws = [sampled for sampled, _ in recorder.steps]
    assert all(len(sampled) == 1 for sampled in draws)  # int(0.25 * 4)
    for step, (sampled, counts) in enumerate(zip(draws, adam.steps, strict=True)):
        current = _adapter_params(model, sampled)
        # how many optimizer steps this block's adapters have trained so far, this one included
        trained = sum(1 for earlier in draws[: step + 1] if earlier == sampled)
        run = 1 + next((i for i, earlier in enumerate(reversed(draws[:step])) if earlier != sampled), step)
        assert {counts[name] for name in current} == {run if release else trained}
        if release:
            assert set(counts) == current  # undrawn layers hold no state
        else:
            assert set(counts) == _adapter_params(model, set().union(*draws[: step + 1]))
    assert len(set(draws)) > 1


def _lora_bert(n_layers=4):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(tiny_transformer("bert", layers=n_layers, vocab_size=50), lora)


class HFClassifier(pl.LightningModule):
    """Any HF classifier taking `input_key`; the loss comes from `training_step` (IST's fallback path)."""

    def __init__(self, network, input_key, inputs, lr=0.01):
        super().__init__()
        self.network, self.input_key, self.lr = network, input_key, lr
        generator = torch.Generator().manual_seed(0)
        x = torch.cat([inputs(generator) for _ in range(4)])
        y = torch.randint(0, 3, (len(x),), generator=generator)
        self.data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.network(**{self.input_key: x}, labels=y)
        self.log("train_loss", out.loss)
        return {"loss": out.loss}

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self):
        return self.data


def test_lora_layers_of_sampled_blocks_train_and_the_saved_head_too(tmp_path):
    torch.manual_seed(0)
    module = HFClassifier(_lora_bert(), "input_ids", lambda g: torch.randint(0, 50, (4, 6), generator=g))
    ist = IST(update_ratio=0.5, interval=2, seed=1)
    recorder = StepRecorder(ist)
    pl.Trainer(callbacks=[ist, recorder], max_steps=6, **trainer_kwargs(tmp_path)).fit(module)
    names = [n for n, _ in module.named_parameters()]
    head = {n for n in names if "classifier.modules_to_save" in n}
    for sampled, trainable in recorder.steps:
        lora = {n for n in names if "lora_" in n and int(n.split("encoder.layer.")[1].split(".")[0]) in sampled}
        assert lora and trainable == lora | head
    assert any(s != 0 for s in ist.scores.tolist())  # the importance update ran on the LoRA outputs


def test_score_update_matches_a_hand_computed_example():
    ist = IST(reward_lr=10.0)
    ist.scores = torch.zeros(4, dtype=torch.float64)
    sets, losses = [[0, 1], [1, 2], [2, 3]], [1.0, 2.0, 0.5]
    ist.update_scores(sets, losses)
    # R_k = exp(-loss_k): 0.367879, 0.135335, 0.606531; mean 0.369915; r_k = R_k - mean = -0.002036, -0.234580,
    # 0.236616.
    r = [math.exp(-1.0), math.exp(-2.0), math.exp(-0.5)]
    mean = sum(r) / 3
    r = [x - mean for x in r]
    # all scores 0 -> p = 0.5, p (1 - p) = 0.25; each block gains 10 * 0.25 * (sum of r_k of the sets holding it).
    expected = [2.5 * r[0], 2.5 * (r[0] + r[1]), 2.5 * (r[1] + r[2]), 2.5 * r[2]]
    assert ist.scores.tolist() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([-0.005089, -0.591539, 0.005089, 0.591539], abs=1e-6)
    # Second round from non-zero scores: p is taken from the scores *before* this round's updates.
    start = ist.scores.clone()
    ist.update_scores([[0, 3], [0, 1]], [0.2, 0.9])
    r = [math.exp(-0.2), math.exp(-0.9)]
    mean = sum(r) / 2
    r = [x - mean for x in r]
    p = [1 / (1 + math.exp(-s)) for s in start.tolist()]
    gain = [10.0 * q * (1 - q) for q in p]
    expected = start.tolist()
    expected[0] += gain[0] * (r[0] + r[1])
    expected[1] += gain[1] * r[1]
    expected[3] += gain[3] * r[0]
    assert ist.scores.tolist() == pytest.approx(expected, abs=1e-12)


class UpdateRecorder(IST):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds = []

    def update_scores(self, sets, losses):
        self.rounds.append((sets, losses))
        super().update_scores(sets, losses)


def test_scores_during_training_follow_the_update_rule(tmp_path):
    ist = UpdateRecorder(update_ratio=0.5, interval=2, seed=3)
    pl.Trainer(callbacks=[ist], max_steps=9, **trainer_kwargs(tmp_path)).fit(AdapterModel())
    assert [step for step, _ in ist.history] == [0, 2, 4, 6, 8]
    scores = [0.0] * 4
    for sets, losses in ist.rounds:
        assert len(sets) == 3 and all(len(s) == 2 for s in sets) and len({tuple(s) for s in sets}) == 3
        rewards = [math.exp(-loss) for loss in losses]
        mean = sum(rewards) / len(rewards)
        p = [1 / (1 + math.exp(-s)) for s in scores]
        new = list(scores)
        for blocks, reward in zip(sets, rewards, strict=True):
            for i in blocks:
                new[i] += 10.0 * (reward - mean) * p[i] * (1 - p[i])
        scores = new
    assert ist.scores.tolist() == pytest.approx(scores, abs=1e-12)
    assert any(abs(s) > 0 for s in scores)


def _lora_bert_with_adapters():
    from peft import LoraConfig, get_peft_model

    bert = tiny_transformer("bert", layers=4, vocab_size=50, seed=0)
    bert = add_adapters(bert, AdapterConfig(layout="houlsby", bottleneck_size=4))
    for name, module in bert.named_modules():
        if name.endswith("adapters.mlp") or name.endswith("adapters.attention"):
            nn.init.normal_(module.up.weight)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    return get_peft_model(bert, lora).eval()


@pytest.mark.parametrize("suppression", [0.3, 0.0])
def test_suppression_restores_scales_exactly(tmp_path, suppression):
    network = _lora_bert_with_adapters()
    module = HFClassifier(network, "input_ids", lambda g: torch.randint(0, 50, (4, 6), generator=g))
    ist = IST(suppression=suppression, seed=0)
    ist.setup(pl.Trainer(**trainer_kwargs(tmp_path)), module, "fit")
    x = torch.randint(0, 50, (2, 6))
    lora_layers = [m for n, m in network.named_modules() if n.endswith("attention.self.query")]
    adapters = [m for n, m in network.named_modules() if n.endswith("adapters.mlp")]
    scalings = [dict(m.scaling) for m in lora_layers]
    assert scalings[0] == {"default": 2.0} and adapters[0].scale == 1.0
    with torch.no_grad():
        before = network(input_ids=x).logits
        with ist.suppressed([0, 2]):
            assert lora_layers[0].scaling["default"] == 2.0 * suppression and lora_layers[1].scaling["default"] == 2.0
            assert adapters[2].scale == suppression and adapters[1].scale == 1.0
            during = network(input_ids=x).logits
        after = network(input_ids=x).logits
        assert not torch.allclose(during, before)
        assert torch.equal(after, before)  # bit-identical
        assert [dict(m.scaling) for m in lora_layers] == scalings and all(a.scale == 1.0 for a in adapters)
        with pytest.raises(RuntimeError, match="boom"), ist.suppressed([1, 3]):
            raise RuntimeError("boom")
        assert torch.equal(network(input_ids=x).logits, before)


class ModeMixer(Callback):
    """Puts one block in eval mode while the rest trains, as a user's module might."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.blocks[1].eval()
        self.modes = {n for n, m in pl_module.named_modules() if m.training}


class ModeChecker(Callback):
    def __init__(self, mixer):
        self.mixer, self.mismatches = mixer, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.mismatches += {n for n, m in pl_module.named_modules() if m.training} != self.mixer.modes


def test_importance_update_runs_in_eval_mode_without_gradients_and_restores_modes(tmp_path):
    model = LossHookModel()
    mixer = ModeMixer()
    checker = ModeChecker(mixer)
    ist = IST(update_ratio=0.5, interval=2, seed=0)
    pl.Trainer(callbacks=[mixer, ist, checker], max_steps=5, **trainer_kwargs(tmp_path)).fit(model)
    assert len(model.loss_calls) == 2 * 3  # updates at steps 2 and 4, three candidate sets each
    assert all(grad is False and training == set() for grad, training in model.loss_calls)
    assert checker.mismatches == 0
    assert "blocks.1" not in mixer.modes and "blocks.0" in mixer.modes


def test_resume_restores_scores_and_continues_exactly(tmp_path):
    # 12 batches per epoch, interval 5: the epoch-end checkpoint at step 12 falls between two importance updates.
    torch.manual_seed(0)
    reference = AdapterModel()
    start = snapshot(reference)
    uninterrupted = IST(update_ratio=0.5, interval=5, seed=7)
    kw = trainer_kwargs(tmp_path / "a")
    pl.Trainer(callbacks=[uninterrupted], max_epochs=3, **kw).fit(reference)

    first = AdapterModel()
    first.load_state_dict(start)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kw = trainer_kwargs(tmp_path / "b", enable_checkpointing=True)
    interrupted = IST(update_ratio=0.5, interval=5, seed=7)
    pl.Trainer(callbacks=[interrupted, checkpoint], max_epochs=1, **kw).fit(first)
    assert any(s != 0 for s in interrupted.scores.tolist())

    resumed = AdapterModel()
    ist = IST(update_ratio=0.5, interval=5, seed=999)  # the checkpoint's state must win over this seed
    trainer = pl.Trainer(callbacks=[ist, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=3, **kw)
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 36
    assert ist.scores.tolist() == uninterrupted.scores.tolist()
    assert ist.history == uninterrupted.history
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, dict(resumed.named_parameters())[name], rtol=0, atol=0, msg=name)


def test_state_dict_round_trip():
    ist = IST(seed=0)
    ist.scores = torch.tensor([0.5, -0.25], dtype=torch.float64)
    ist._generator = torch.Generator().manual_seed(3)
    ist.history = [(0, [0.0, 0.0]), (10, [0.5, -0.25])]
    other = IST()
    other.load_state_dict(ist.state_dict())
    assert other.scores.tolist() == [0.5, -0.25] and other.history == ist.history
    assert torch.equal(other._generator.get_state(), ist._generator.get_state())


class RankDump(Callback):
    def __init__(self, ist, path):
        self.ist, self.path, self.sampled = ist, path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sampled.append(tuple(self.ist.sampled))

    def on_train_end(self, trainer, pl_module):
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        dump = {"sampled": self.sampled, "weights": weights, "scores": self.ist.scores.tolist()}
        torch.save(dump, f"{self.path}/rank{trainer.global_rank}.pt")


@retry_spawn_teardown_abort
@pytest.mark.slow  # two spawned processes: ~40 s on a busy 2-core machine
def test_ddp_ranks_keep_identical_scores_and_weights(tmp_path):
    ist = IST(update_ratio=0.5, interval=2)  # no seed: ranks must still agree
    trainer = pl.Trainer(
        callbacks=[ist, RankDump(ist, tmp_path)],
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_steps=7),
    )
    trainer.fit(AdapterModel())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["sampled"] == ranks[1]["sampled"]
    assert ranks[0]["scores"] == ranks[1]["scores"]  # candidate losses averaged: every rank updates the same way
    assert any(s != 0 for s in ranks[0]["scores"])
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(weight, ranks[1]["weights"][name], msg=name)


def test_scores_are_logged_and_plotted(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    figures = capture_saved_figures(monkeypatch)
    ist = IST(update_ratio=0.5, interval=2, seed=1)
    kw = trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=2)
    trainer = pl.Trainer(callbacks=[ist], max_steps=8, **kw)
    trainer.fit(AdapterModel())
    assert "ist/score_3" in trainer.callback_metrics
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"ist/score_{i}" in header for i in range(4))
    png = tmp_path / "run" / "version_0" / "ist_scores.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    # one step line per block: each score at every update, held until the last step
    (figure,) = figures
    (ax,) = figure.axes
    steps = [step for step, _ in ist.history] + [8]
    assert [line.get_label() for line in ax.lines] == [f"block {i}" for i in range(4)]
    for index, line in enumerate(ax.lines):
        scores = [scores[index] for _, scores in ist.history]
        assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(scores + scores[-1:])
    assert any(s != 0 for _, scores in ist.history for s in scores)  # the plotted scores did move


class NoLossModel(AdapterModel):
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)


def test_a_training_step_without_loss_is_explained(tmp_path):
    trainer = pl.Trainer(callbacks=[IST(update_ratio=0.5, interval=1)], max_steps=3, **trainer_kwargs(tmp_path))
    with pytest.raises(TypeError, match=r"training_step returned NoneType.*HINT: return the loss tensor"):
        trainer.fit(NoLossModel())


def _image_module():
    from lightning_peft.modules import ImageClassifier

    return ImageClassifier(
        "vit_tiny_patch16_224",
        num_classes=3,
        model_kwargs={"img_size": 16, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2},
        peft={"peft_type": "BOTTLENECK", "layout": "houlsby", "bottleneck_size": 4},
    )


def _audio_module():
    from lightning_peft.modules import AudioClassifier

    return AudioClassifier(
        3,
        None,
        builder="hf",
        num_mel_bins=16,
        target_length=24,
        model_kwargs={"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64},
        peft={"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    )


def _loader(shape, n=16):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


@pytest.mark.parametrize("family", ["vision_timm_adapters", "audio_hf_ast_lora", "language_bert_lora"])
def test_ist_on_vision_audio_and_language(tmp_path, family):
    torch.manual_seed(0)
    if family == "vision_timm_adapters":
        module, loader = _image_module(), _loader((3, 16, 16))
    elif family == "audio_hf_ast_lora":
        module, loader = _audio_module(), _loader((24, 16))
    else:
        module = HFClassifier(_lora_bert(), "input_ids", lambda g: torch.randint(0, 50, (4, 6), generator=g))
        loader = None
    ist = IST(update_ratio=0.5, interval=2, seed=0)
    recorder = StepRecorder(ist)
    before = snapshot(module)
    trainer = pl.Trainer(callbacks=[ist, recorder], max_steps=6, **trainer_kwargs(tmp_path))
    trainer.fit(module, train_dataloaders=loader)
    assert len(ist.scores) == 4 and any(s != 0 for s in ist.scores.tolist())
    peft_names = {n for n in before if "lora_" in n or ".adapters." in n}
    for sampled, trainable in recorder.steps:
        assert len(sampled) == 2
        assert {n for n in trainable & peft_names if not any(f".{b}." in n for b in sampled)} == set()
    assert changed(before, module) <= {
        n for n in before if before[n] is not None and (n in peft_names or "head" in n or "classifier" in n)
    }


def test_module_without_loss_hook_still_logs_only_its_own_steps(tmp_path):
    # TinyBlockModel logs `train_loss` in training_step; IST's extra calls must not reach the logger.
    logged = []

    class Logged(AdapterModel):
        def log(self, name, value, *args, **kwargs):
            logged.append(name)
            super().log(name, value, *args, **kwargs)

    pl.Trainer(callbacks=[IST(update_ratio=0.5, interval=2, seed=0)], max_steps=5, **trainer_kwargs(tmp_path)).fit(
        Logged()
    )
    assert logged.count("train_loss") == 5


class BatchRecorder(Callback):
    def __init__(self, ist):
        self.ist, self.sampled = ist, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sampled.append(tuple(self.ist.sampled))


def test_gradient_accumulation_keeps_one_set_per_optimizer_step(tmp_path):
    ist = UpdateRecorder(update_ratio=0.25, interval=2, seed=0)
    recorder = BatchRecorder(ist)
    kw = trainer_kwargs(tmp_path, accumulate_grad_batches=3)
    pl.Trainer(callbacks=[ist, recorder], max_steps=6, **kw).fit(AdapterModel())
    assert len(recorder.sampled) == 18
    for start in range(0, 18, 3):  # the set changes only between optimizer steps
        assert len(set(recorder.sampled[start : start + 3])) == 1
    assert len(ist.rounds) == 2  # steps 2 and 4, once each despite three micro-batches per step
