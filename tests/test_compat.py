"""Each private Lightning / torch API the package uses, through its one function in lightning_peft._compat.

When an upgrade moves one of them, the test of that function fails here, naming the versions.
"""

import lightning
import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyBlockModel, trainer_kwargs
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_peft import _compat


def _versions() -> str:
    return f"lightning {lightning.__version__}, torch {torch.__version__}"


def test_ddp_constructor_kwargs_are_the_strategys_own_dict():
    strategy = DDPStrategy(find_unused_parameters=False, static_graph=False)
    kwargs = _compat.ddp_constructor_kwargs(strategy)
    kwargs["find_unused_parameters"] = True
    assert _compat.ddp_constructor_kwargs(strategy)["find_unused_parameters"] is True, _versions()


def test_logger_writes_this_step_follows_log_every_n_steps(tmp_path):
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(_compat.logger_writes_this_step(trainer))

    trainer = pl.Trainer(callbacks=[Watch()], max_steps=4, log_every_n_steps=2, **trainer_kwargs(tmp_path))
    trainer.fit(TinyBlockModel())
    assert seen == [False, True, False, True], _versions()


def test_run_before_checkpoint_load_wraps_once(tmp_path):
    strategy = SingleDeviceStrategy("cpu")
    calls = []

    def before(path, *args, **kwargs):
        calls.append(path)

    _compat.run_before_checkpoint_load(strategy, before)
    _compat.run_before_checkpoint_load(strategy, before)  # a second request does not wrap again
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}}, path)
    assert strategy.load_checkpoint(path)["state_dict"] == {}
    assert calls == [path], _versions()


def test_spawning_launchers_are_recognised():
    assert _compat.is_spawning_launcher(DDPStrategy(start_method="spawn")), _versions()
    assert not _compat.is_spawning_launcher(DDPStrategy()), _versions()


def test_rewrap_ddp_needs_the_strategys_setup_and_hook_registration():
    strategy = DDPStrategy()
    assert callable(strategy._setup_model) and callable(strategy._register_ddp_hooks), _versions()


def test_own_parameter_skips_parametrizations():
    linear = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(linear, "weight", nn.Identity())
    assert _compat.own_parameter(linear, "weight") is None  # the original lives in the parametrization
    assert _compat.own_parameter(nn.Linear(3, 3), "weight").shape == (3, 3), _versions()


def test_muted_logging_restores_the_modules_log():
    module = TinyBlockModel()
    with _compat.muted_logging(module):
        module.log("x", 1.0)  # nothing happens: no trainer attached, no error
    assert module.log.__func__ is pl.LightningModule.log, _versions()


def test_a_missing_api_names_the_versions():
    with pytest.raises(_compat.CompatibilityError, match=rf"lightning {lightning.__version__} / torch.*HINT"):
        _compat.ddp_constructor_kwargs(object())


def test_attached_trainer_is_none_before_fit_and_the_trainer_during(tmp_path):
    module, seen = TinyBlockModel(), []
    assert _compat.attached_trainer(module) is None, _versions()

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(_compat.attached_trainer(pl_module) is trainer)

    pl.Trainer(callbacks=[Watch()], max_steps=1, **trainer_kwargs(tmp_path)).fit(module)
    assert seen == [True], _versions()


def test_tensor_version_view_base_and_storage_id():
    t = torch.zeros(6)
    view = t.view(2, 3)[1]
    before = _compat.tensor_version(t)
    view.add_(1)  # an in-place change through a view bumps the shared counter
    assert _compat.tensor_version(t) == before + 1 == _compat.tensor_version(view), _versions()
    assert _compat.view_base(view) is t and _compat.view_base(t) is t, _versions()
    assert _compat.storage_id(view) == _compat.storage_id(t) != _compat.storage_id(torch.zeros(6)), _versions()


def test_dropout_classes_cover_every_dropout_module():
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
        assert isinstance(cls(), _compat.dropout_classes()), (cls, _versions())
    assert not isinstance(nn.Linear(1, 1), _compat.dropout_classes())


def test_fake_tensors_have_shapes_devices_and_storage_ids_but_no_data():
    mode = _compat.fake_tensor_mode(allow_non_fake_inputs=True)
    fake = _compat.fake_tensor(mode, torch.empty(1 << 20, 1 << 20, device="meta"), torch.device("cpu"))
    assert fake.shape == (1 << 20, 1 << 20) and fake.device.type == "cpu", _versions()
    with mode:
        out = fake[:2] * 2
    assert out.shape == (2, 1 << 20) and _compat.storage_id(fake[:2]) == _compat.storage_id(fake), _versions()


def test_attention_kernels_match_scaled_dot_product_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.zeros(5, 5).masked_fill_(torch.rand(5, 5) > 0.7, float("-inf")).fill_diagonal_(0.0)
    for causal, attn_mask in ((False, None), (True, None), (False, mask)):
        reference = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        out = _compat.flash_attention_cpu(q, k, v, causal, attn_mask, None)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4, msg=_versions)
    # the CUDA kernel exists as an operator even where it cannot run
    assert callable(getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)), _versions()


def test_hf_auto_models_from_config_builds_without_weights_and_restores(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50
    )
    config.save_pretrained(tmp_path)  # a folder with a config and no weights
    original = transformers.AutoModel.from_pretrained
    with _compat.hf_auto_models_from_config():
        model = transformers.AutoModel.from_pretrained(tmp_path)
        model_and_info = transformers.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model).__name__ == "BertModel" and model.config.hidden_size == 16, _versions()
    assert type(model_and_info[0]).__name__ == "BertModel" and model_and_info[1]["missing_keys"] == []
    assert transformers.AutoModel.from_pretrained.__func__ is original.__func__
    with pytest.raises(OSError):  # outside, the weights are required again
        transformers.AutoModel.from_pretrained(tmp_path)


def test_hf_masks_as_in_a_real_run_skips_the_causal_mask_on_fake_tensors():
    transformers = pytest.importorskip("transformers")
    from transformers import masking_utils

    saved = {}
    config = transformers.LlamaConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=50,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 50, (2, 7))

    def run():
        def hook(query, key, value, attn_mask=None, **kwargs):
            saved["mask"] = attn_mask
            return original(query, key, value, attn_mask=attn_mask, **kwargs)

        original = nn.functional.scaled_dot_product_attention
        nn.functional.scaled_dot_product_attention = hook
        try:
            mode = _compat.fake_tensor_mode(allow_non_fake_inputs=True)
            with mode:
                model(input_ids=mode.from_tensor(ids), attention_mask=mode.from_tensor(torch.ones_like(ids)))
        finally:
            nn.functional.scaled_dot_product_attention = original
        return saved.pop("mask", "not called")

    functions = (masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices)
    built = run()
    with _compat.hf_masks_as_in_a_real_run(padded=False):
        skipped = run()
    with _compat.hf_masks_as_in_a_real_run(padded=True):
        padded = run()
    assert built is not None and skipped is None and padded is not None, _versions()
    assert (masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices) == functions


def _own_private_names() -> set[str]:
    """Private attribute names the package defines itself: methods, classes and attributes it assigns."""
    import ast
    from pathlib import Path

    names = set()
    for path in Path(_compat.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names.add(node.name)
                names.update(f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)))
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if n.startswith("_")}


# Lightning's private attributes of the classes ours subclass (reached as `self._name` there)
_INHERITED = {
    n for cls in (pl.LightningModule, pl.Callback, pl.LightningDataModule) for n in dir(cls) if n.startswith("_")
} | {"_trainer", "_device_mesh", "_fabric", "_current_fx_name", "_metric_attributes"}


def _private_uses(source: str, own: set[str], where: str = "") -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if node.attr not in own and (not on_self or node.attr in _INHERITED):
                found.append(f"{line} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith(("lightning_peft", "__")):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or any(part.startswith("_") for part in (node.module or "").split(".")):
                found.append(f"{line} from {node.module} import {private or '...'}")
    return found


def test_the_private_api_check_finds_what_it_is_for():
    sample = (
        "from torch._subclasses.fake_tensor import FakeTensor\n"
        "from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher\n"
        "base = tensor._base\nweight = module._parameters['weight']\nversion = t._version\n"
        "class M:\n    def f(self):\n        return self._trainer, self._mine, other._also_mine\n"
        "    def _also_mine(self):\n        self._mine = 1\n"
    )
    found = _private_uses(sample, _own_private_names() | {"_mine", "_also_mine"})
    assert sorted(f.split(" ", 1)[1] for f in found) == sorted(
        [
            "from torch._subclasses.fake_tensor import ...",
            "from lightning.pytorch.strategies.launchers.multiprocessing import ['_MultiProcessingLauncher']",
            "._base",
            "._parameters",
            "._version",
            "._trainer",
        ]
    ), found


def test_private_lightning_and_torch_api_only_in_the_compatibility_module():
    """No `x._name` of a name the package does not define, and no private import, outside _compat.py."""
    from pathlib import Path

    own = _own_private_names()
    found = []
    for path in sorted(Path(_compat.__file__).parent.rglob("*.py")):
        if path.name != "_compat.py":
            found += _private_uses(path.read_text(), own, path.name)
    assert not found, f"private API outside lightning_peft/_compat.py: {found}"


def test_installed_lightning_and_torch_are_in_the_declared_range():
    """pyproject.toml bounds both from above; what runs the tests must be inside, and _compat says the same range."""
    import re
    from pathlib import Path

    from packaging.version import Version

    pyproject = (Path(_compat.__file__).parents[1] / "pyproject.toml").read_text()
    for package, installed in (("lightning", lightning.__version__), ("torch", torch.__version__)):
        spec = re.search(rf'^    "({package}[^"]*)",$', pyproject, re.MULTILINE).group(1)
        low, high = re.fullmatch(rf"{package}>=([\d.]+),<([\d.]+)", spec).groups()
        assert Version(low) <= Version(Version(installed).base_version) < Version(high), (spec, installed)
        assert low.startswith(_compat.TESTED[package]), (spec, _compat.TESTED)


def test_compile_wrappers_lifted_gives_the_plain_names_and_puts_the_wrappers_back():
    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model = nn.Sequential(torch.compile(inner), nn.Linear(2, 2))
    assert [n for n, _ in model.named_modules()][:3] == ["", "0", "0._orig_mod"], _versions()
    assert len(_compat.compiled_modules(model)) == 1, _versions()
    with _compat.compile_wrappers_lifted(model) as plain:
        assert plain is model and model[0] is inner
        assert [n for n, _ in model.named_modules()] == ["", "0", "0.0", "0.1", "1"]
        assert not _compat.compiled_modules(model)
    assert type(model[0]).__name__ == "OptimizedModule" and model[0]._orig_mod is inner, _versions()
    with _compat.compile_wrappers_lifted(torch.compile(inner)) as plain:  # a compiled root yields what it compiles
        assert plain is inner


def test_restart_weight_averaging_copies_the_changed_module_and_restarts_the_count(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging

    module = TinyBlockModel()
    swa, ema = StochasticWeightAveraging(swa_lrs=0.1), EMAWeightAveraging()
    trainer = SimpleNamespace(callbacks=[swa, ema], strategy=None)
    swa.setup(trainer, module, "fit")
    ema.setup(trainer, module, "fit")
    swa.n_averaged = torch.tensor(3)
    ema._average_model.update_parameters(module)
    module.head = nn.Linear(8, 2)  # the architecture changes (pruning)
    assert _compat.restart_weight_averaging(trainer, module) == ["StochasticWeightAveraging", "EMAWeightAveraging"]
    for average in (swa._average_model, ema._average_model.module):
        assert average is not module and average.head.out_features == 2, _versions()
        torch.testing.assert_close(average.head.weight, module.head.weight)
    assert int(swa.n_averaged) == 0 and int(ema._average_model.n_averaged) == 0, _versions()
    assert _compat.restart_weight_averaging(SimpleNamespace(callbacks=[StochasticWeightAveraging(0.1)]), module) == []
