"""The methods registry: one entry per method, which the estimate, the support check and the benchmarks iterate."""

import json

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft.callbacks import LISA, HalfFineTuning
from lightning_peft.estimate import estimate_memory, estimated_methods
from lightning_peft.methods import Method, get_method, method_of, methods, register_method, unregister_method
from lightning_peft.support import check_support, supported_methods
from lightning_peft.trainable import TrainableSetCallback

pytestmark = pytest.mark.usefixtures("one_thread")


class Blocks(nn.Module):
    """Embedding layer, four residual blocks, head: a stack ``find_blocks`` resolves."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(4))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().mean()


class FreezeBiases(TrainableSetCallback):
    """A toy user method in one class: every parameter but the biases trains."""

    def __init__(self, keep_head_bias: bool = False) -> None:
        super().__init__()
        self.keep_head_bias = keep_head_bias

    def preview(self, module: nn.Module) -> frozenset[str]:
        keep = {"head.bias"} if self.keep_head_bias else set()
        return frozenset(n for n, _ in module.named_parameters() if not n.endswith("bias") or n in keep)

    def trainable_parameters(self, trainer, pl_module, step):
        if not hasattr(self, "_allowed"):
            self._allowed = self.preview(pl_module)
        return self._allowed


@pytest.fixture
def toy_method():
    """The toy method, registered as a user's file would register it (and removed after the test)."""
    method = register_method(Method(name="freeze_biases", label="Biases frozen", callback=FreezeBiases))
    yield method
    unregister_method("freeze_biases")


def test_built_in_methods_describe_themselves_once():
    names = [m.name for m in methods()]
    assert names[:7] == ["full", "lora", "lisa", "hft", "ist", "early_pruning", "activation_quantization"]
    assert all(m.builtin for m in methods()[:7])
    assert estimated_methods()[:4] == ("full", "lora", "lisa", "hft")
    assert supported_methods()[:5] == ("lisa", "hft", "ist", "early_pruning", "activation_quantization")
    assert get_method("lisa").callback is LISA and get_method("hft").callback is HalfFineTuning
    assert method_of(HalfFineTuning()).name == "hft" and method_of(pl.Callback()) is None
    assert get_method("activation_quantization").estimate == "activations"


def test_preview_asks_the_callback():
    net = Blocks()
    lisa = get_method("lisa").configure(n_layers=1, seed=3)
    plan = LISA(n_layers=1, seed=3).preview(net)
    assert lisa.preview(net) == plan.trainable
    outside = {"embed.weight", "embed.bias", "head.weight", "head.bias"}
    (sampled,) = plan.sampled
    assert plan.trainable == outside | {n for n, _ in net.named_parameters() if n.startswith(f"blocks.{sampled}.")}
    assert get_method("hft").preview(net) == HalfFineTuning().preview(net).trainable
    assert get_method("full").preview(net) == {n for n, _ in net.named_parameters()}


def test_lisa_preview_is_the_first_sampling_of_a_fit(tmp_path):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Blocks()

        def training_step(self, batch, batch_idx):
            return _loss(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for seed in (0, 5, 11):
        module = Module()
        lisa = LISA(n_layers=2, interval=100, seed=seed, plot=False)
        preview = lisa.preview(module)
        trainer = pl.Trainer(
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[lisa],
        )
        trainer.fit(module, DataLoader(torch.randn(4, 8), batch_size=2))
        assert list(preview.sampled) == lisa.history[0][1], seed
        assert preview.n_blocks == 4


def test_lisa_preview_refuses_as_setup_does():
    with pytest.raises(ValueError, match=r"`n_layers` must be between 1 and 4 .* got 5\. HINT"):
        LISA(n_layers=5).preview(Blocks())


def test_misconfiguration():
    with pytest.raises(ValueError, match=r"`name` must be lower case.*got 'Freeze Biases'.*HINT"):
        Method("Freeze Biases", "x")
    with pytest.raises(
        ValueError, match=r"`estimate` must be 'trainable', 'activations', 'in_backward' or None, got 'rows'.*HINT"
    ):
        Method("toy", "Toy", estimate="rows")
    with pytest.raises(ValueError, match=r"`method` 'lisa' is already registered \(LISA\).*HINT"):
        register_method(Method("lisa", "Another LISA"))
    with pytest.raises(KeyError, match=r"`method` must be one of full, lora, lisa.*got 'dora'.*HINT"):
        get_method("dora")
    with pytest.raises(ValueError, match=r"`n_layer` is not a setting of the method 'lisa'.*n_layers.*HINT"):
        get_method("lisa").configure(n_layer=2)
    with pytest.raises(TypeError, match=r"`method` must be a lightning_peft.methods.Method, got str.*HINT"):
        register_method("lisa")
    with pytest.raises(TypeError, match=r"cannot tell what it trains.*HINT"):
        Method("toy", "Toy", callback=pl.Callback).preview(Blocks())


def test_configure_leaves_the_registry_entry_as_it_is():
    lisa = get_method("lisa").configure(n_layers=3)
    assert lisa.settings["n_layers"] == 3 and get_method("lisa").settings["n_layers"] == 2
    assert lisa.build_callback().n_layers == 3
    assert get_method("lisa").from_callback(LISA(n_layers=4, interval=7)).settings["interval"] == 7
    assert get_method("full").build_callback() is None


def test_estimate_asks_the_method_object_for_its_settings():
    report = estimate_memory(
        Blocks,
        torch.randn(4, 8),
        methods=["full", get_method("lisa").configure(n_layers=1), get_method("lora").configure(r=2)],
        variants=[""],
        loss_fn=_loss,
    )
    full, lisa, lora = report.row("full"), report.row("lisa"), report.row("lora")
    block = 2 * (16 * 16 + 16) * 4  # bytes of one block's parameters
    assert full.grads - lisa.grads == 3 * block  # one block of four trains
    assert lora.trainable_params == 2 * 4 * 2 * (16 + 16) + 16 * 2 + 2  # rank-2 A and B of 8 Linears, and the head


def test_a_method_added_in_one_file_appears_in_estimate_support_and_benchmarks(toy_method, tmp_path):
    from benchmarks import continual_audio, estimate_check, fidelity, memory, support_matrix

    # estimate: a row of its own, with its label, from what its callback previews
    assert "freeze_biases" in estimated_methods()
    report = estimate_memory(Blocks, torch.randn(4, 8), methods=["full", "freeze_biases"], variants=[""], loss_fn=_loss)
    full, toy = report.row("full"), report.row("freeze_biases")
    biases = (16 + 4 * 2 * 16 + 2) * 4
    assert full.grads - toy.grads == biases and toy.label == "Biases frozen"
    assert "Biases frozen" in report.to_text()
    configured = toy_method.configure(keep_head_bias=True)
    assert (
        estimate_memory(Blocks, torch.randn(4, 8), methods=[configured], variants=[""], loss_fn=_loss)
        .row("freeze_biases")
        .grads
        == toy.grads + 2 * 4
    )

    # support: checked by the generic probe (one step, gradients only where the preview says)
    assert "freeze_biases" in supported_methods()
    (cell,) = check_support(Blocks, {"x": torch.randn(2, 8)}, methods=("freeze_biases",))
    assert (cell.method, cell.status) == ("freeze_biases", "ok"), cell.detail
    assert support_matrix.label("freeze_biases") == "Biases frozen"

    # benchmarks: a run in each table, its callback from the registry, its estimate row its name
    for table in (memory.recipes(), fidelity.language_recipes(), continual_audio.recipes()):
        assert table["freeze_biases"].label == "Biases frozen"
    assert "freeze_biases" not in memory.RECIPES  # the built-in table is unchanged
    (callback,) = memory.recipes()["freeze_biases"].callbacks()
    assert isinstance(callback, FreezeBiases)
    assert isinstance(fidelity.language_callbacks("freeze_biases")[1][1], FreezeBiases)
    assert memory.recipes()["freeze_biases"].estimator_row() == "freeze_biases"
    memory.run(mode="cpu", sizes="tiny", out_dir=tmp_path, models=["vit_tiny"], methods=["freeze_biases"])
    results = json.loads((tmp_path / "memory_cpu.json").read_text())
    runs = results["models"]["vit_tiny"]["methods"]
    assert set(runs) == {"full", "freeze_biases"}
    assert runs["freeze_biases"]["components"]["grad_bytes"] < runs["full"]["components"]["grad_bytes"]
    assert "Biases frozen" in (tmp_path / "memory_cpu.md").read_text()
    assert estimate_check.memory is memory


def test_a_method_that_freezes_through_trains_runs_in_the_benchmarks(tmp_path):
    from benchmarks import memory

    def trains(model, settings):
        return {n for n, _ in model.named_parameters() if "head" in n}

    heads = register_method(Method("head_only", "Head only", trains=trains))
    try:
        spec = next(s for s in memory.SIZES["tiny"] if s.key == "vit_tiny")
        model = memory.build_model(spec, "head_only")
        assert {n for n, p in model.named_parameters() if p.requires_grad} == heads.preview(model)
        assert memory.recipes()["head_only"].callbacks() == []
    finally:
        unregister_method("head_only")


def test_estimate_trains_the_blocks_lisa_samples():
    class Uneven(Blocks):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(16, w), nn.GELU(), nn.Linear(w, 16)) for w in (8, 16, 32, 64)
            )

    net = Uneven()
    for seed in (0, 1, 2):
        lisa = get_method("lisa").configure(n_layers=1, seed=seed)
        report = estimate_memory(Uneven, torch.randn(4, 8), methods=[lisa], variants=[""], loss_fn=_loss)
        trained = lisa.preview(net)
        assert report.row("lisa").grads == 4 * sum(p.numel() for n, p in net.named_parameters() if n in trained)
