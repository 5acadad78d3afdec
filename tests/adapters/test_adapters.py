import copy
import pickle

import pytest
import torch
from helpers import TinyBlockModel, tiny_transformer
from torch import nn

from lightning_peft.adapters import (
    Adapter,
    AdapterConfig,
    BottleneckAdapter,
    ConformerAdapter,
    adapter_modules,
    adapter_parameter_names,
    adapters_per_block,
    add_adapters,
    mark_only_adapters_as_trainable,
)
from lightning_peft.modules._peft import apply_peft, build_peft_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_vit():
    return tiny_transformer("timm_vit", layers=2, intermediate=128)


def _bert():
    return tiny_transformer("bert", layers=2, vocab_size=50)


def _hf_vit():
    return tiny_transformer("vit", layers=2)


def _hf_ast():
    return tiny_transformer("ast", layers=2)


# family: (builder, inputs, head module name)
FAMILIES = {
    "timm_vit": (_timm_vit, lambda: {"x": torch.randn(2, 3, 16, 16)}, "head"),
    "hf_bert": (_bert, lambda: {"input_ids": torch.randint(0, 50, (2, 7))}, "classifier"),
    "hf_vit": (_hf_vit, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, "classifier"),
    "hf_ast": (_hf_ast, lambda: {"input_values": torch.randn(2, 24, 16)}, "classifier"),
}


def _run(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def _config(peft_type, layout, placement, **kw):
    return AdapterConfig(
        peft_type=peft_type,
        layout=layout,
        placement=placement,
        reduction_factor=4,
        activation="gelu",
        kernel_size=3,
        **kw,
    )


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("peft_type", ["BOTTLENECK", "CONFORMER"])
@pytest.mark.parametrize("layout", ["pfeiffer", "houlsby"])
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_adapters_start_as_the_identity(family, peft_type, layout, placement):
    build, inputs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    before = _run(model, x)
    add_adapters(model, _config(peft_type, layout, placement))
    per_block = adapters_per_block(model)
    assert [len(block) for block in per_block] == [len(_config(peft_type, layout, placement).locations)] * 2
    assert torch.equal(_run(model, x), before)  # bit-identical, not just close


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("peft_type", ["BOTTLENECK", "CONFORMER"])
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_every_adapter_parameter_receives_gradients(family, peft_type, placement):
    build, inputs, head = FAMILIES[family]
    torch.manual_seed(0)
    model, x = build(), inputs()
    add_adapters(model, _config(peft_type, "houlsby", placement, modules_to_save=[head]))
    names = adapter_parameter_names(model)
    assert names and all(p.requires_grad == (n in names or f".{head}." in f".{n}") for n, p in model.named_parameters())
    params = dict(model.named_parameters())
    _run(model, x).square().sum().backward()
    assert all(params[n].grad is not None for n in names)  # the zero output projection passes gradients on
    assert all(params[n].grad.abs().sum() > 0 for n in names if ".up." in n)
    optimizer = torch.optim.SGD([params[n] for n in names], lr=0.5)
    optimizer.step()
    optimizer.zero_grad()
    _run(model, x).square().sum().backward()
    zero = [n for n in names if params[n].grad.abs().sum() == 0]
    assert not zero, f"adapter parameters without gradient after one update: {zero}"


def _tiny_block(width=8):
    return TinyBlockModel(n_blocks=2, width=width).blocks[0]


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_placement_reads_the_sublayer_output_or_input(placement):
    torch.manual_seed(0)
    vit = _timm_vit()
    add_adapters(vit, AdapterConfig(layout="houlsby", placement=placement, bottleneck_size=4))
    block = vit.blocks[0]
    adapter = block.adapters["mlp"]
    nn.init.normal_(adapter.up.weight)
    h = torch.randn(2, 5, 32)
    adapter.scale = 0.0
    plain = block.mlp(h)
    adapter.scale = 1.0
    source = plain if placement == "sequential" else h
    torch.testing.assert_close(block.mlp(h), plain + adapter(source))


def test_scale_multiplies_the_correction():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(dim=8, bottleneck=2)
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(3, 8)
    full = adapter(x)
    adapter.scale = 0.25
    torch.testing.assert_close(adapter(x), 0.25 * full)
    assert isinstance(adapter, Adapter) and isinstance(adapter.down, nn.Linear) and isinstance(adapter.up, nn.Linear)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_conformer_adapter_is_pointwise_glu_depthwise_norm_act_pointwise(norm):
    torch.manual_seed(0)
    adapter = ConformerAdapter(dim=8, bottleneck=3, kernel_size=5, norm=norm).eval()
    nn.init.normal_(adapter.up.weight)
    x = torch.randn(2, 7, 8)
    h = nn.functional.glu(adapter.down(x), dim=-1).transpose(1, 2)
    h = adapter.depthwise(h)
    h = adapter.norm(h).transpose(1, 2) if norm == "batch" else adapter.norm(h.transpose(1, 2))
    expected = adapter.up(nn.functional.silu(h))
    torch.testing.assert_close(adapter(x), expected)
    assert adapter.depthwise.groups == 3 and adapter.down.out_features == 6
    # the depthwise convolution mixes neighbouring tokens: changing the last token changes the one before it
    y = x.clone()
    y[:, -1] += 1.0
    assert not torch.allclose(adapter(y)[:, -2], adapter(x)[:, -2])


def test_only_adapters_and_modules_to_save_train():
    vit = add_adapters(_timm_vit(), AdapterConfig(modules_to_save=["head"]))
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameter_names(vit)) | {"head.weight", "head.bias"}
    everything = add_adapters(_timm_vit(), freeze_base=False)
    assert all(p.requires_grad for p in everything.parameters())
    mark_only_adapters_as_trainable(everything)
    assert {n for n, p in everything.named_parameters() if p.requires_grad} == set(adapter_parameter_names(everything))


def test_adapter_names_and_listing():
    vit = add_adapters(_timm_vit(), AdapterConfig(layout="houlsby"))
    assert [n for n, _ in adapter_modules(vit)] == [
        "blocks.0.adapters.attention",
        "blocks.0.adapters.mlp",
        "blocks.1.adapters.attention",
        "blocks.1.adapters.mlp",
    ]
    assert "blocks.0.adapters.mlp.down.weight" in adapter_parameter_names(vit)
    assert [[n for n, _ in block] for block in adapters_per_block(vit)][1] == [
        "blocks.1.adapters.attention",
        "blocks.1.adapters.mlp",
    ]


def test_copies_and_pickles_keep_their_own_adapters():
    torch.manual_seed(0)
    vit = add_adapters(_timm_vit(), AdapterConfig(placement="parallel")).eval()
    for _, adapter in adapter_modules(vit):
        nn.init.normal_(adapter.up.weight)
    x = torch.randn(1, 3, 16, 16)
    out = vit(x)
    for clone in (copy.deepcopy(vit), pickle.loads(pickle.dumps(vit))):
        torch.testing.assert_close(clone(x), out)
        for _, adapter in adapter_modules(clone):
            adapter.scale = 0.0
        assert not torch.allclose(clone(x), out)  # the copy's hooks use the copy's adapters...
        torch.testing.assert_close(vit(x), out)  # ...and leave the original's alone


def test_custom_sites_for_an_unknown_block_layout():
    model = TinyBlockModel(n_blocks=3)
    with pytest.raises(ValueError, match=r"Cannot find the mlp sublayer of block 'blocks.0'.*HINT: pass `sites="):
        add_adapters(model)
    add_adapters(model, AdapterConfig(sites={"mlp": ["fc1", "fc2"]}, bottleneck_size=2))
    assert len(adapter_modules(model)) == 3


def test_adding_twice_is_refused():
    vit = add_adapters(_timm_vit())
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(vit)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"peft_type": "LORA"}, r"`peft_type` must be one of \['BOTTLENECK', 'CONFORMER'\], got 'LORA'"),
        ({"layout": "both"}, r"`layout` must be one of \['houlsby', 'pfeiffer'\], got 'both'.*HINT"),
        ({"placement": "beside"}, r"`placement` must be one of \['sequential', 'parallel'\]"),
        ({"reduction_factor": 0}, r"`reduction_factor` must be an integer >= 1"),
        ({"activation": "softmax"}, r"`activation` must be one of .*got 'softmax'.*HINT: None picks"),
        ({"norm": "group"}, r"`norm` must be one of \['batch', 'layer'\]"),
        ({"reduction_factor": True}, r"`reduction_factor` must be an integer >= 1, got True"),
        ({"dropout": "0.1"}, r"`dropout` must be a number in \[0, 1\), got '0.1'"),
        ({"scale": None}, r"`scale` must be a number, got None"),
        ({"sites": {"ffn": ["a", "b"]}}, r"`sites` must map 'attention' / 'mlp'"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**kwargs)


def test_bottleneck_wider_than_the_model_is_refused():
    with pytest.raises(ValueError, match=r"bottleneck must be between 1 and the hidden width 32, got 64"):
        add_adapters(_timm_vit(), AdapterConfig(bottleneck_size=64))


def test_paper_default_activations():
    assert AdapterConfig(layout="pfeiffer").resolved_activation == "relu"
    assert AdapterConfig(layout="houlsby").resolved_activation == "silu"
    assert AdapterConfig(peft_type="conformer").resolved_activation == "silu"
    assert AdapterConfig().bottleneck_for(768) == 48  # reduction factor 16


def test_yaml_dict_through_the_modules_peft_argument():
    config = build_peft_config(
        {"peft_type": "bottleneck", "layout": "houlsby", "reduction_factor": 8}, default_task_type="SEQ_CLS"
    )
    assert isinstance(config, AdapterConfig) and config.task_type == "SEQ_CLS"
    bert = apply_peft(_bert(), config)
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameter_names(bert)) | {"classifier.weight", "classifier.bias"}
    assert bert.bert.encoder.layer[0].adapters["mlp"].down.out_features == 4
    with pytest.raises(ValueError, match=r"`peft` is not a valid AdapterConfig"):
        build_peft_config({"peft_type": "CONFORMER", "rank": 4})


def test_image_classifier_with_adapters_from_a_dict():
    from lightning_peft.modules import ImageClassifier

    module = ImageClassifier(
        "vit_tiny_patch16_224",
        num_classes=3,
        model_kwargs={"img_size": 16, "patch_size": 8, "depth": 2},
        peft={"peft_type": "CONFORMER", "layout": "pfeiffer", "kernel_size": 3},
    )
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{n}" for n in adapter_parameter_names(module.model)} | {
        "model.head.weight",
        "model.head.bias",
    }
    assert module(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_removing_an_adapter_removes_exactly_its_hooks_also_on_a_deep_copy():
    import copy

    import timm

    from lightning_peft.adapters import AdapterConfig, adapter_modules, add_adapters
    from lightning_peft.pruning import remove_adapter

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    add_adapters(vit, AdapterConfig(layout="houlsby", placement="parallel"))
    for _, adapter in adapter_modules(vit):  # non-zero adapters, so removing one changes the output
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    before = vit(x)
    twin = copy.deepcopy(vit)
    remove_adapter(twin, "blocks.0.adapters.mlp")
    assert torch.equal(vit(x), before)  # the original keeps all its adapters and hooks
    assert not torch.allclose(twin(x), before)
    assert "blocks.0.adapters.mlp" not in dict(adapter_modules(twin))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in twin.modules())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit.modules()) - 2
