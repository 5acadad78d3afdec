"""EarlyPruning's safety: Taylor scores, the loss check before the cut, and the defaults."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer_kwargs
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from pruning_helpers import PruneModule

from lightning_peft.callbacks import EarlyPruning
from lightning_peft.pruning import PruningMasks, find_sites

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score": "l2"}, r"`score` must be one of \['taylor', 'magnitude'\], got 'l2'.*HINT"),
        ({"max_loss_increase": 0}, r"`max_loss_increase` must be a number > 0.*got 0.*HINT"),
        ({"max_loss_increase": True}, r"`max_loss_increase` must be a number > 0.*got True"),
        ({"max_loss_increase": "5%"}, r"`max_loss_increase` must be"),
        ({"max_loss_increase": float("inf")}, r"`max_loss_increase` must be"),
        ({"check_batches": 0}, r"`check_batches` must be an integer >= 1.*got 0.*HINT"),
        ({"check_batches": True}, r"`check_batches` must be an integer >= 1.*got True"),
    ],
)
def test_new_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyPruning(**kwargs)


def test_defaults_check_the_loss_when_the_papers_ratios_are_kept():
    pruning = EarlyPruning()
    assert pruning.ratios() == {
        "head_ratio": 1 / 3,
        "neuron_ratio": 1 / 3,
        "peft_module_ratio": 0.75,
        "peft_rank_ratio": 0.5,
    }
    assert pruning.score == "taylor" and pruning.max_loss_increase == 0.03 and pruning.check_batches == 4


def test_taylor_scores_are_mean_abs_mask_times_gradient():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=4, img_size=32, pretrained=False)
    masks = PruningMasks(find_sites(vit))
    masks.install()
    expected = [torch.zeros(len(m)) for m in (*masks.heads, *masks.neurons)]
    for seed in range(2):
        with torch.no_grad():
            for m in (*masks.heads, *masks.neurons):
                m.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
        vit(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        for e, m in zip(expected, (*masks.heads, *masks.neurons), strict=True):
            e += (m.detach() * m.grad).abs()
        masks.record_taylor()
        masks.zero_grad()
    heads, neurons = masks.taylor_scores()
    for score, e in zip([*heads, *neurons], expected, strict=True):
        torch.testing.assert_close(score, e / 2)
    assert masks.taylor_count == 2 and all((s > 0).all() for s in heads)
    state = masks.taylor_state()
    fresh = PruningMasks(find_sites(vit))
    fresh.load_taylor_state(state)
    torch.testing.assert_close(fresh.taylor_scores()[0][0], heads[0])
    masks.remove()


def _estimate(tmp_path, module, pruning, steps=None):
    """Run the estimation of ``pruning`` and stop right before it prunes (the callback still holds its masks)."""

    class StopBeforeCut(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= pruning.estimation_steps:
                trainer.should_stop = True

    steps = steps or pruning.estimation_steps + 2
    trainer = pl.Trainer(callbacks=[pruning, StopBeforeCut()], max_steps=steps, **trainer_kwargs(tmp_path))
    trainer.fit(module)
    return trainer


def test_score_selects_what_ranks_heads_and_neurons(tmp_path):
    torch.manual_seed(0)
    pruning = EarlyPruning(estimation_steps=4, head_ratio=0.5, neuron_ratio=0.5, max_loss_increase=None)
    trainer = _estimate(tmp_path, PruneModule("bert", lora=False), pruning)
    assert not pruning.pruned and pruning.masks.taylor_count == 2  # steps 2 and 3 of 4
    # make the two scores disagree: Taylor says the first half of each layer's heads matters, |m| the second half
    with torch.no_grad():
        for index, mask in enumerate(pruning.masks.heads):
            mask.copy_(torch.linspace(0.5, 1.5, len(mask)))
            pruning.masks._taylor[index] = torch.linspace(2.0, 1.0, len(mask))
    taylor = pruning.make_plan()
    pruning.score = "magnitude"
    magnitude = pruning.make_plan()
    assert taylor.heads and all(kept == [0, 1, 2] for kept in taylor.heads.values())
    assert all(kept == [3, 4, 5] for kept in magnitude.heads.values())
    del trainer


def test_magnitude_ranking_warns_when_masks_have_not_separated(tmp_path):
    pruning = EarlyPruning(estimation_steps=2, score="magnitude", max_loss_increase=None)
    with pytest.warns(UserWarning, match=r"masks have barely separated.*HINT: use `score='taylor'`"):
        pl.Trainer(callbacks=[pruning], max_steps=3, **trainer_kwargs(tmp_path)).fit(PruneModule("bert", lr=1e-4))
    assert pruning.pruned


def test_the_search_lowers_only_the_kind_that_breaks_the_tolerance(tmp_path):
    """A loss that grows with the fraction of neurons cut (heads free): the neuron ratio halves until it holds."""
    torch.manual_seed(0)
    pruning = EarlyPruning(estimation_steps=4, max_loss_increase=0.5, peft_module_ratio=0, peft_rank_ratio=0)
    _estimate(tmp_path, PruneModule("bert", lora=False), pruning)

    def loss(module, batches):
        neurons = torch.cat([m.detach() for m in pruning.masks.neurons])
        return 1.0 + 10.0 * float((neurons == 0).float().mean())

    pruning._loss = loss
    decision = pruning.decide(pl.Trainer(**trainer_kwargs(tmp_path)), PruneModule("bert", lora=False), [None])
    check = decision["check"]
    # 1/3 of the neurons: +333 %; 1/6: +167 %; 1/12: +83 % (rounding: 16/192 neurons); 1/24: +42 % <= 50 %
    assert [round(t["ratios"]["neuron_ratio"], 4) for t in check["tries"]] == [0.3333, 0.1667, 0.0833, 0.0417]
    assert check["used"]["head_ratio"] == pytest.approx(1 / 3)  # cutting heads costs nothing here: kept
    assert check["used"]["neuron_ratio"] == pytest.approx(1 / 24)
    assert check["loss_before"] == 1.0 and check["increase"] <= 0.5
    assert len(check["spared"]) == 3 and all(line.startswith("neurons: neuron_ratio") for line in check["spared"])
    kept = sum(len(k) for k in decision["plan"]["neurons"].values())
    assert kept == 2 * 96 - round(2 * 96 / 24)


def test_a_kind_that_never_fits_is_spared_entirely(tmp_path):
    torch.manual_seed(0)
    pruning = EarlyPruning(estimation_steps=4, max_loss_increase=0.01, peft_module_ratio=0, peft_rank_ratio=0)
    _estimate(tmp_path, PruneModule("bert", lora=False), pruning)
    pruning._loss = lambda module, batches: (
        1.0 + float((torch.cat([m.detach() for m in pruning.masks.neurons]) == 0).any())
    )
    check = pruning.decide(pl.Trainer(**trainer_kwargs(tmp_path)), PruneModule("bert", lora=False), [None])["check"]
    assert check["used"]["neuron_ratio"] == 0.0 and check["used"]["head_ratio"] == pytest.approx(1 / 3)
    assert check["increase"] == 0.0 and len(check["spared"]) == 4  # three halvings, then 0


def _batches_of(module, indices):
    loader = module.train_dataloader()
    batches = list(loader)
    return [batches[i] for i in indices]


@pytest.mark.parametrize(
    ("family", "lora", "adapters"), [("bert", True, False), ("llama", True, False), ("timm", False, True)]
)
def test_the_check_measures_exactly_the_loss_of_the_pruned_model(tmp_path, family, lora, adapters):
    """The masked-out model the check measures is the model the surgery makes: same loss on the same batches."""
    torch.manual_seed(0)
    module = PruneModule(family, lora=lora)
    if adapters:
        from lightning_peft.adapters import AdapterConfig, add_adapters

        add_adapters(module.net, AdapterConfig(layout="houlsby", bottleneck_size=8, modules_to_save=["head"]))
    # a tolerance no cut can exceed: the check measures the full ratios and keeps them
    pruning = EarlyPruning(estimation_steps=4, max_loss_increase=1e6, head_ratio=0.5, neuron_ratio=0.5)
    measured = {}

    class Measure(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:  # right after the cut (EarlyPruning ran first in this hook)
                pl_module.eval()
                with torch.no_grad():
                    losses = [pl_module.training_step(b, 0) for b in _batches_of(pl_module, [1, 2, 3, 4])]
                pl_module.train()
                measured["loss"] = float(torch.stack(losses).mean())

    pl.Trainer(callbacks=[pruning, Measure()], max_steps=5, **trainer_kwargs(tmp_path)).fit(module)
    check = pruning.check
    assert check["enabled"] and check["batches"] == 4 and check["used"] == pruning.ratios()
    assert pruning.plan.heads and pruning.plan.neurons and (pruning.plan.lora_ranks or pruning.plan.adapter_units)
    assert check["loss_after_cut"] == pytest.approx(measured["loss"], rel=1e-4)
    assert check["loss_after_cut"] != pytest.approx(check["loss_before"], rel=1e-6)  # the cut changed something


def test_a_tight_tolerance_lowers_the_ratios_and_the_report_says_why(tmp_path, caplog):
    torch.manual_seed(0)
    module = PruneModule("bert", lora=True)
    pruning = EarlyPruning(estimation_steps=4, max_loss_increase=1e-9, l1=0.0)
    logger = CSVLogger(tmp_path, name="logs")
    with caplog.at_level(logging.INFO):
        trainer = pl.Trainer(callbacks=[pruning], max_steps=6, **trainer_kwargs(tmp_path, logger=logger))
        trainer.fit(module)
    check = pruning.check
    assert check["requested"] == pruning.ratios() and check["spared"] and check["increase"] <= 1e-9
    assert all(check["used"][k] <= v for k, v in check["requested"].items())
    assert any(check["used"][k] < v for k, v in check["requested"].items())
    # the plan is the one of the ratios used (6 heads per layer)
    heads_kept = 6 - round(check["used"]["head_ratio"] * 6)
    assert all(len(kept) == heads_kept for kept in pruning.plan.heads.values())
    assert len(check["tries"]) == len(check["spared"]) + 1
    text = caplog.text
    assert "loss check on 4 batch(es)" in text and "\n  spared " in text and "ratios used: head_ratio" in text
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    for key in ("early_pruning/loss_before", "early_pruning/loss_after_cut", "early_pruning/head_ratio"):
        assert key in metrics
    assert (tmp_path / "logs" / "version_0" / "early_pruning_masks.png").stat().st_size > 0


def test_check_off_keeps_the_fixed_ratios(tmp_path):
    torch.manual_seed(0)
    pruning = EarlyPruning(estimation_steps=4, max_loss_increase=None)
    module = PruneModule("bert", lora=False)
    pl.Trainer(callbacks=[pruning], max_steps=6, **trainer_kwargs(tmp_path)).fit(module)
    assert pruning.check == {"enabled": False, "reason": "off (`max_loss_increase=None`)"}
    assert all(len(kept) == 4 for kept in pruning.plan.heads.values())


def test_check_and_taylor_state_survive_a_checkpoint(tmp_path):
    path = tmp_path / "mid.ckpt"

    class SaveAndStop(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                trainer.save_checkpoint(path)
                trainer.should_stop = True

    kw = trainer_kwargs(tmp_path)
    pl.Trainer(callbacks=[EarlyPruning(estimation_steps=4), SaveAndStop()], max_steps=6, **kw).fit(PruneModule("bert"))
    state = torch.load(path, weights_only=False)["callbacks"]["EarlyPruning"]
    assert state["taylor"]["count"] == 1 and not state["check"]  # step 2 of 4 recorded; no cut yet
    pruning, seen = EarlyPruning(estimation_steps=4), {}

    class Peek(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if pruning.masks is not None:
                seen.setdefault("count", pruning.masks.taylor_count)

    trainer = pl.Trainer(callbacks=[pruning, Peek()], max_steps=6, **kw)
    trainer.fit(PruneModule("bert"), ckpt_path=str(path))
    assert seen["count"] == 1 and pruning.check["enabled"] and pruning.check["batches"] >= 1
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    after = torch.load(tmp_path / "after.ckpt", weights_only=False)["callbacks"]["EarlyPruning"]
    restored = EarlyPruning(estimation_steps=4)
    restored.load_state_dict(after)
    assert restored.check == pruning.check and restored.pruned


def _tiny_causal_lm() -> pl.LightningModule:
    """A tiny random Llama (grouped-query attention) + LoRA through ``CausalLM``, on a repeating token pattern."""
    from torch.utils.data import DataLoader

    from lightning_peft.modules import CausalLM

    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 96,
        "vocab_size": 32,
        "max_position_embeddings": 32,
    }
    lora = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    module = CausalLM(config=config, peft=lora, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    g = torch.Generator().manual_seed(0)
    ids = (torch.arange(16).repeat(12, 1) * torch.randint(1, 4, (12, 1), generator=g)) % 32
    batches = [{"input_ids": ids[i : i + 2], "labels": ids[i : i + 2]} for i in range(0, 12, 2)]
    module.train_dataloader = lambda: DataLoader(batches, batch_size=None)
    return module


@pytest.mark.parametrize("family", ["bert_classifier", "llama_causal_lm"])
def test_with_defaults_the_cut_stays_within_the_tolerance(tmp_path, family):
    """Encoder classifier and decoder LM: with the defaults the loss right after the cut is within 3 % of before."""
    torch.manual_seed(0)
    module = PruneModule("bert") if family == "bert_classifier" else _tiny_causal_lm()
    pruning = EarlyPruning(estimation_steps=4)
    pl.Trainer(callbacks=[pruning], max_steps=6, **trainer_kwargs(tmp_path)).fit(module)
    check = pruning.check
    assert pruning.pruned and check["enabled"] and check["tolerance"] == 0.03
    assert check["increase"] <= 0.03 and check["loss_after_cut"] <= 1.03 * check["loss_before"]
    assert all(check["used"][k] <= v for k, v in pruning.ratios().items())


def test_a_halving_that_cuts_the_same_units_is_skipped(tmp_path):
    """4 key/value groups: 1/3 and 1/6 both cut one group, so the search goes from 1/3 straight to 1/12 (none)."""
    torch.manual_seed(0)
    pruning = EarlyPruning(estimation_steps=4, max_loss_increase=0.01, neuron_ratio=0, peft_module_ratio=0)
    _estimate(tmp_path, PruneModule("llama", lora=False), pruning)
    pruning._loss = lambda module, batches: (
        1.0 + float((torch.cat([m.detach() for m in pruning.masks.heads]) == 0).any())
    )
    check = pruning.decide(pl.Trainer(**trainer_kwargs(tmp_path)), PruneModule("llama", lora=False), [None])["check"]
    assert [round(t["ratios"]["head_ratio"], 4) for t in check["tries"]] == [0.3333, 0.0833]
    reason = "(the whole cut +100.0% > 1.0%; heads alone cost most, +100.0%)"
    assert check["spared"] == [f"heads: head_ratio 0.333 -> 0.0833 {reason}"]


def test_taylor_ranking_finds_heads_that_do_nothing(tmp_path):
    """Heads whose output projection columns are zero have |m * dL/dm| = 0: the Taylor plan prunes exactly them."""
    torch.manual_seed(0)
    module = PruneModule("bert", lora=False)
    for layer in module.net.model.bert.encoder.layer:
        with torch.no_grad():
            layer.attention.output.dense.weight[:, 0:8] = 0  # head 0 (8 features per head)
            layer.attention.output.dense.weight[:, 24:32] = 0  # head 3
    for name, param in module.named_parameters():
        param.requires_grad = "classifier" in name  # the dead heads stay dead; the masks still train
    fixed = {"neuron_ratio": 0, "peft_module_ratio": 0, "peft_rank_ratio": 0, "l1": 0.0, "max_loss_increase": None}
    pruning = EarlyPruning(estimation_steps=4, head_ratio=1 / 3, score="taylor", **fixed)
    pl.Trainer(callbacks=[pruning], max_steps=5, **trainer_kwargs(tmp_path)).fit(module)
    assert pruning.plan.heads and all(kept == [1, 2, 4, 5] for kept in pruning.plan.heads.values())
