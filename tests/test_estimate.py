"""The memory estimate (fake tensors, no weights) against what a real Lightning step measures."""

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_peft.callbacks import LISA, ActivationQuantization, MemoryBreakdown, OptimizerInBackward
from lightning_peft.cli.estimate import estimate_from_config
from lightning_peft.estimate import (
    VARIANTS,
    MemoryEstimate,
    MemoryReport,
    estimate_memory,
    parse_bytes,
    with_batch_size,
)
from lightning_peft.methods import get_method


class TinyViT(pl.LightningModule):
    def __init__(self, optimizer: str = "adamw", checkpointing: bool = False) -> None:
        super().__init__()
        self.model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=10,
            img_size=32,
            patch_size=8,
            embed_dim=64,
            depth=4,
            num_heads=2,
        )
        self.model.set_grad_checkpointing(checkpointing)
        self.optimizer_name = optimizer

    def compute_loss(self, batch):
        images, labels = batch
        return F.cross_entropy(self.model(images), labels)

    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=256)
        return torch.optim.AdamW(params, lr=1e-3)


def _batch(size=4):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def _measure(tmp_path, callbacks, optimizer="adamw", checkpointing=False):
    torch.manual_seed(0)
    breakdown = MemoryBreakdown()
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[breakdown, *callbacks],
    )
    trainer.fit(TinyViT(optimizer, checkpointing), DataLoader(TensorDataset(*_batch()), batch_size=4))
    return breakdown.breakdown


@pytest.fixture(scope="module")
def report():
    return estimate_memory(
        TinyViT,
        _batch(),
        methods=["full", "lisa"],
        variants=[
            "",
            "int8_act",
            "int8_act+adamw8bit",
            "checkpointing",
            "int8_act+checkpointing",
            "in_backward",
            "int8_act+adamw8bit+checkpointing+in_backward",
        ],
        activations=get_method("activation_quantization").configure(min_numel=512),
        min_8bit_size=256,
    )


@pytest.mark.parametrize(
    ("method", "callbacks", "optimizer"),
    [
        ("full", [], "adamw"),
        ("lisa", [LISA(n_layers=2, interval=5, seed=0)], "adamw"),
        ("full+int8_act", [ActivationQuantization(min_numel=512)], "adamw"),
        ("lisa+int8_act+adamw8bit", [LISA(n_layers=2, interval=5), ActivationQuantization(min_numel=512)], "adamw8bit"),
        ("full+checkpointing", [], "adamw"),
        ("full+int8_act+checkpointing", [ActivationQuantization(min_numel=512)], "adamw"),
    ],
)
def test_estimate_matches_the_measured_first_step_within_5_percent(report, method, callbacks, optimizer, tmp_path):
    measured = _measure(tmp_path, callbacks, optimizer, checkpointing="checkpointing" in method)
    row = report.row(method)
    estimated = {
        "params": row.params,
        "grads": row.grads,
        "optimizer_state": row.optimizer_state,
        "saved_activations": row.saved_activations,
    }
    for key, value in estimated.items():
        assert value == pytest.approx(measured[key], rel=0.05), key
    # with checkpointing, one block is rebuilt in backward: part of the peak, not of what the forward leaves saved
    assert row.recomputed > 0 if "checkpointing" in method else row.recomputed == 0
    assert row.held - row.recomputed == pytest.approx(measured["total"], rel=0.05)


def test_variants_order_as_they_should(report):
    full = report.row("full")
    assert report.row("full+int8_act").saved_activations < 0.4 * full.saved_activations
    assert report.row("full+checkpointing").saved_activations < full.saved_activations
    assert report.row("lisa").grads < full.grads
    assert report.row("full+int8_act+adamw8bit").optimizer_state < 0.4 * full.optimizer_state
    assert full.activation_bytes_per_sample > 0


def test_largest_batch_size_solves_the_peak_model():
    row = MemoryEstimate("full", 100, 100, 200, 50, 0, 1, 1, 25.0, 2, working=10)
    report = MemoryReport("M", 2, "32-true", [row])
    # start of backward at batch b: activations 50 + 25 (b - 2) plus working 10 b / 2 = 30 b; end: grads 100
    # total(b) = params 100 + optimizer 200 + max(30 b, 100)
    assert row.total == 300 + 100 and row.held == 100 + 100 + 200 + 50
    assert row.total_at(7) == 300 + 30 * 7
    assert report.largest_batch_size("full", 300 + 30 * 7) == 7
    assert report.largest_batch_size("full", 300 + 30 * 7 - 1) == 6
    assert report.largest_batch_size("full", 300 + 100 - 1) == 0  # the gradients alone do not fit
    assert "Largest batch" in report.to_text(budget=1000)
    assert with_batch_size(report, 4).rows[0].working == 20


def test_misconfiguration():
    with pytest.raises(ValueError, match=r"`memory` must be a size such as '24GiB'.*HINT"):
        parse_bytes("24 parsecs")
    with pytest.raises(
        ValueError, match=r"`methods` must be among full, lora, lisa, hft, gradual_unfreezing, got 'dora'.*HINT"
    ):
        estimate_memory(TinyViT, _batch(), methods=["dora"])
    with pytest.raises(ValueError, match=r"`precision` must be one of.*got 'fp8'.*HINT"):
        estimate_memory(TinyViT, _batch(), precision="fp8")


def test_no_weights_are_allocated(monkeypatch):
    # the factory runs on the meta device: a model far larger than this machine's memory is estimated in seconds
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=8, num_attention_heads=64, vocab_size=32000
    )
    report = estimate_memory(
        lambda: LlamaForCausalLM(config),
        {"input_ids": torch.zeros(1, 512, dtype=torch.long)},
        precision="bf16-mixed",
        methods=["full"],
        variants=[""],
        loss_fn=lambda model, batch: model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss,
    )
    row = report.row("full")
    assert row.params == 4 * row.total_params > 4 * 7e9
    assert row.weight_copies > 0  # bf16 copies of the Linear weights made by autocast, saved for backward


def test_cli_estimates_a_shipped_config(capsys, monkeypatch):
    from pathlib import Path

    from lightning_peft.cli import cli_main

    monkeypatch.chdir(Path(__file__).parents[1])
    cli_main(["estimate", "--config", "configs/llama_text_lisa.yaml", "--memory", "24MiB", "--methods", "full", "lisa"])
    out = capsys.readouterr().out
    assert "Estimated training memory of CausalLM, batch size 8, precision 32-true" in out
    assert "LISA + 8-bit activations + AdamW8bit" in out and "Largest batch" in out
    assert "Fits in 24.0MiB:" in out


class LiveGradientPeak(pl.Callback):
    """The most bytes of live ``.grad`` tensors at any moment of training (hooks registered before the callback's)."""

    def __init__(self):
        self.peak = 0

    def setup(self, trainer, pl_module, stage):
        params = [p for p in pl_module.parameters() if p.requires_grad]

        def count(_):
            self.peak = max(self.peak, sum(p.grad.nbytes for p in params if p.grad is not None))

        self.handles = [p.register_post_accumulate_grad_hook(count) for p in params]

    def teardown(self, trainer, pl_module, stage):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("callbacks", [[], [LISA(n_layers=2, interval=5, seed=0)]], ids=["full", "lisa"])
def test_in_backward_gradients_are_the_largest_trainable_parameter_as_measured(report, callbacks, tmp_path):
    peak = LiveGradientPeak()
    _measure(tmp_path, [peak, OptimizerInBackward(), *callbacks])
    method = "lisa" if callbacks else "full"
    row, plain = report.row(f"{method}+in_backward"), report.row(method)
    assert row.grads == peak.peak > 0
    assert row.grads < plain.grads / 4
    # only the gradients change: the step in backward keeps every other component
    for field in ("params", "optimizer_state", "saved_activations", "recomputed", "trainable_params"):
        assert getattr(row, field) == getattr(plain, field), field
    combined = report.row(f"{method}+int8_act+adamw8bit+checkpointing+in_backward")
    assert combined.grads == row.grads
    assert combined.optimizer_state == report.row(f"{method}+int8_act+adamw8bit").optimizer_state
    assert combined.saved_activations == report.row(f"{method}+int8_act+checkpointing").saved_activations


def test_in_backward_with_gradient_accumulation_holds_every_gradient():
    report = estimate_memory(
        TinyViT, _batch(), methods=["full"], variants=["", "in_backward"], accumulate_grad_batches=2
    )
    assert report.row("full+in_backward").grads == report.row("full").grads
    assert any("accumulate_grad_batches=2" in note for note in report.notes)


def test_variants_combine_every_part_and_refuse_what_cannot_run():
    assert len(VARIANTS) == 16 and len(set(VARIANTS)) == 16
    assert "int8_act+adamw8bit+checkpointing+in_backward" in VARIANTS
    with pytest.raises(ValueError, match=r"`variants` must be among.*got 'in_backward\+int8_act'.*HINT.*order"):
        estimate_memory(TinyViT, _batch(), methods=["full"], variants=["in_backward+int8_act"])
    # the gradient scaler of 16-mixed on CUDA needs every gradient before the step: not offered, refused if asked
    with pytest.raises(ValueError, match=r"`variants` has 'in_backward'.*'16-mixed'.*HINT"):
        estimate_memory(TinyViT, _batch(), "16-mixed", methods=["full"], variants=["in_backward"], device="cuda")
    with pytest.raises(ValueError, match=r"`accumulate_grad_batches` must be an integer of at least 1, got 0.*HINT"):
        estimate_memory(TinyViT, _batch(), methods=["full"], accumulate_grad_batches=0)


def test_smallest_combination_per_method():
    rows = [  # totals: 80, 60, 48, 23, 23
        MemoryEstimate("full", 10, 50, 20, 30, 0, 1, 1, 1.0, 1),
        MemoryEstimate("full+in_backward", 10, 2, 20, 30, 0, 1, 1, 1.0, 1),
        MemoryEstimate("lisa", 10, 4, 8, 30, 0, 1, 1, 1.0, 1),
        MemoryEstimate("lisa+checkpointing", 10, 4, 8, 5, 0, 1, 1, 1.0, 1),
        MemoryEstimate("lisa+checkpointing+in_backward", 10, 4, 8, 5, 0, 1, 1, 1.0, 1),  # a tie: the first stays
    ]
    report = MemoryReport("M", 1, "32-true", rows)
    assert report.smallest == {"full": "full+in_backward", "lisa": "lisa+checkpointing"}
    assert report.row("lisa+checkpointing+in_backward").label == "LISA + checkpointing + optimizer in backward"
    text = report.to_text(budget=100)
    assert "Smallest for Full FT: Full FT + optimizer in backward (" in text
    assert "Smallest for LISA: LISA + checkpointing (" in text and "largest batch in" in text


def _config(tmp_path, extra_callbacks="", trainer=""):
    from pathlib import Path

    source = (Path(__file__).parents[1] / "configs" / "llama_text_lisa.yaml").read_text()
    text = source.replace("  callbacks:\n", f"{trainer}  callbacks:\n{extra_callbacks}", 1)
    assert text != source
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_config_with_the_step_in_backward_puts_every_row_on_it(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])
    config = _config(tmp_path, "    - class_path: OptimizerInBackward\n", "  accumulate_grad_batches: 2\n")
    report = estimate_from_config(config, methods=["full"])
    assert report.rows and all(row.method.endswith("+in_backward") for row in report.rows)
    # accumulation holds every gradient between micro-batches
    assert report.row("full+in_backward").grads == report.row("full+in_backward").params
    assert any("accumulate_grad_batches=2" in note for note in report.notes)


def test_config_that_the_step_in_backward_refuses_gets_no_such_row(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])
    config = _config(tmp_path, trainer="  gradient_clip_val: 1.0\n")
    report = estimate_from_config(config, methods=["full"])
    assert "full" in {row.method for row in report.rows}
    assert not any("in_backward" in row.method for row in report.rows)
    assert any("optimizer step in backward not offered" in note and "global norm" in note for note in report.notes)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_in_backward_holds_both_partial_gradients_of_a_tied_embedding(tied):
    report = estimate_memory(
        _tiny_llama(tied, layers=2),
        {"input_ids": torch.zeros(1, 16, dtype=torch.long)},
        methods=["full"],
        variants=["", "in_backward"],
        loss_fn=_llama_loss,
    )
    embedding = 512 * 32 * 4
    # the head's part of a tied weight's gradient is held from the start of backward until the embedding's arrives;
    # then both are summed into a third tensor (measured: 3 copies at that moment)
    assert report.row("full+in_backward").grads == (3 if tied else 1) * embedding
    full = report.row("full")
    assert full.grads == full.params + (2 * embedding if tied else 0)
    # the head's gradient (a tied weight's first part) is made first, beside every activation
    assert full.first_grads == embedding
    # the gradients of the largest activation (the fp32 log-softmax of 16 x 512 logits): two of them
    assert full.working == 2 * 16 * 512 * 4
    for row in (full, report.row("full+in_backward")):
        assert row.total == row.params + row.optimizer_state + max(row.activations + row.working + embedding, row.grads)


def _tiny_llama(tied: bool = False, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        vocab_size=512,
        tie_word_embeddings=tied,
    )
    return lambda: LlamaForCausalLM(config)


def _llama_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def test_lisa_choices_get_rows_of_their_own_and_sampled_counts_at_its_peak():
    batch = {"input_ids": torch.zeros(1, 16, dtype=torch.long)}
    report = estimate_memory(_tiny_llama(), batch, methods=["lisa"], variants=[""], loss_fn=_llama_loss)
    paper = report.row("lisa")
    frozen = report.row("lisa_embeddings_frozen")
    lightest = report.row("lisa_embeddings_head_frozen")
    assert frozen.label == "LISA, embeddings frozen" and lightest.label == "LISA, embeddings and head frozen"
    table = 512 * 32 * 4
    assert paper.trainable_params - frozen.trainable_params == 512 * 32  # the token table
    assert frozen.trainable_params - lightest.trainable_params == 512 * 32  # the untied head
    assert paper.optimizer_state > frozen.optimizer_state > lightest.optimizer_state
    assert paper.first_grads == table and lightest.first_grads < table  # the head's gradient comes first
    assert "Smallest for LISA, embeddings frozen:" in report.to_text()
    # `sampled` needs in the periods that draw them what `always` needs: the estimate is for that peak
    sampled = get_method("lisa").configure(embeddings="sampled", head="sampled")
    peak = estimate_memory(
        _tiny_llama(), batch, methods=[sampled], variants=[""], loss_fn=_llama_loss, choices=False
    ).row("lisa")
    assert peak.trainable_params == paper.trainable_params and peak.total == paper.total
    # a LISA configured with frozen embeddings gets only the choice it is not already
    configured = get_method("lisa").configure(embeddings="frozen")
    names = [m.name for m in configured.alternatives()]
    assert names == ["lisa_embeddings_head_frozen"]


def test_chunked_loss_counts_one_chunk_rebuilt_in_backward():
    from lightning_peft.modules import CausalLM

    config = dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=4096,
    )
    batch = {"input_ids": torch.zeros(2, 64, dtype=torch.long), "labels": torch.zeros(2, 64, dtype=torch.long)}

    def row(chunk):
        report = estimate_memory(
            lambda: CausalLM(config=config, loss_chunk_size=chunk),
            batch,
            methods=["lora"],
            variants=[""],
            choices=False,
        )
        return report.row("lora")

    whole, chunked = row(None), row(32)
    logits = 2 * 64 * 4096 * 4  # tokens x vocab, float32
    # the whole logits' log-softmax is saved without chunks, and two gradients of its size work in backward
    assert whole.saved_activations >= logits and whole.working == 2 * logits and whole.recomputed == 0
    # with chunks of 32 tokens: only the backbone's saves stay; one chunk's are rebuilt at the start of backward
    assert chunked.saved_activations < whole.saved_activations - logits + logits // 8
    assert logits // 4 <= chunked.recomputed < logits // 2  # 32 of 128 tokens: a quarter of the float32 logits
    assert chunked.working == 2 * (32 * 4096 * 4)
    assert chunked.total < whole.total
