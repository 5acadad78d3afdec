import pytest
import torch
from pruning_helpers import build, sample_input
from torch import nn

from lightning_peft.pruning import (
    PruningMasks,
    PruningPlan,
    apply_pruning_plan,
    choose_heads,
    choose_lora,
    choose_neurons,
    find_lora_layers,
    find_sites,
    prune_linear,
    replace_in_optimizer,
)
from lightning_peft.pruning.surgery import ParameterReplacements

FAMILIES = ["timm", "timm_ast", "bert", "hf_vit", "hf_ast", "llama"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_masks(masks, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (*masks.heads, *masks.neurons):
            m.copy_(torch.rand(m.shape, generator=g) + 0.1)


def _plan_from(masks, head_ratio=1 / 3, neuron_ratio=1 / 3):
    attention = zip(masks.attention_sites, masks.heads, strict=True)
    heads = choose_heads({s.path: (m, s.group_size) for s, m in attention}, head_ratio)
    neurons = choose_neurons({s.path: m for s, m in zip(masks.mlp_sites, masks.neurons, strict=True)}, neuron_ratio)
    return PruningPlan(heads=heads, neurons=neurons)


def _binarise(masks, plan):
    """Masks 1 on what the plan keeps, 0 on what it prunes."""
    with torch.no_grad():
        for sites, values, kept in (
            (masks.attention_sites, masks.heads, plan.heads),
            (masks.mlp_sites, masks.neurons, plan.neurons),
        ):
            for site, mask in zip(sites, values, strict=True):
                keep = torch.zeros(mask.shape, dtype=torch.bool)
                keep[kept[site.path]] = True
                mask.copy_(keep.float())


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_masks_at_one_are_exact_and_surgery_equals_masking(family, lora):
    net = build(family, lora=lora)
    x = sample_input(family)
    sites = find_sites(net)
    assert len(sites.attention) == 2 and len(sites.mlp) == 2
    with torch.no_grad():
        reference = net(x)
        masks = PruningMasks(sites)
        masks.install()
        assert all(torch.equal(m, torch.ones_like(m)) for m in (*masks.heads, *masks.neurons))
        torch.testing.assert_close(net(x), reference, rtol=0, atol=0)

        _random_masks(masks)
        plan = _plan_from(masks)
        _binarise(masks, plan)
        masked = net(x)
        assert not torch.allclose(masked, reference)  # the pruned heads/neurons did matter
        masks.remove()
        before = sum(p.numel() for p in net.parameters())
        apply_pruning_plan(net, plan)
        pruned = net(x)
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in net.parameters()) < before
    # the plan recreates the same shapes on a fresh copy, and loading the weights gives the same outputs
    fresh = build(family, lora=lora, seed=1)
    apply_pruning_plan(fresh, plan.to_dict())
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pruned, rtol=0, atol=0)


def test_parameter_counts_follow_the_ratios():
    net = build("timm")
    sites = find_sites(net)
    masks = PruningMasks(sites)
    _random_masks(masks)
    plan = _plan_from(masks)
    apply_pruning_plan(net, plan)
    for block in net.blocks:
        assert block.attn.num_heads == 4  # 6 heads, 1/3 pruned per layer
        assert block.attn.qkv.weight.shape == (3 * 4 * 8, 48)
        assert block.attn.proj.weight.shape == (48, 4 * 8)
        assert block.mlp.fc1.out_features == block.mlp.fc2.in_features
    hidden = sum(b.mlp.fc2.in_features for b in net.blocks)
    assert hidden == 2 * 192 - round(2 * 192 / 3)  # global quantile: 1/3 of all neurons
    assert net(sample_input("timm")).shape == (2, 3)


def test_grouped_query_attention_prunes_whole_groups():
    net = build("llama")
    sites = find_sites(net)
    assert [(s.num_heads, s.num_kv_heads, s.group_size) for s in sites.attention] == [(8, 4, 2)] * 2
    masks = PruningMasks(sites)
    with torch.no_grad():  # group 1 of layer 0 is weak in one head only, group 3 in both
        masks.heads[0].copy_(torch.tensor([1.0, 1.0, 0.9, 0.1, 1.0, 1.0, 0.2, 0.2]))
    plan = _plan_from(masks)
    assert plan.heads["model.layers.0.self_attn"] == [0, 1, 2, 3, 4, 5]  # round(4/3) = 1 group pruned: the 4th
    apply_pruning_plan(net, plan)
    attn = net.model.layers[0].self_attn
    assert attn.q_proj.out_features == 6 * 8 and attn.k_proj.out_features == 3 * 8 and attn.o_proj.in_features == 48
    assert attn.num_key_value_groups == 2
    config = net.model.config  # every layer has 6 query heads in 3 groups now: the config says so
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6, 3, 8)
    assert net(sample_input("llama")).shape == (2, 3)


def test_lora_rank_slicing_and_removal_are_exact():
    net = build("bert", lora=True)
    x = sample_input("bert")
    layers = find_lora_layers(net)
    path = next(p for p in layers if p.endswith("attention.self.query"))
    gone = next(p for p in layers if p.endswith("attention.self.value"))
    scores = {p: 1.0 for p in layers} | {gone: 0.0}
    ranks = {p: {"default": torch.tensor([0.0, 3.0, 1.0, 2.0])} for p in layers}
    removed, kept = choose_lora(scores, ranks, module_ratio=1 / len(layers), rank_ratio=0.5)
    assert removed == [gone] and kept[path] == {"default": [1, 3]}
    with torch.no_grad():
        for p, layer in layers.items():  # the equivalent masked model: zero rows of A
            a = layer.lora_A["default"].weight
            a[[0, 2]] = 0
            if p == gone:
                a.zero_()
        expected = net(x)
    before = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    apply_pruning_plan(net, PruningPlan(lora_removed=removed, lora_ranks=kept))
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    after = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    assert after < 0.5 * before
    assert type(net.get_submodule(gone)) is nn.Linear
    assert net.get_submodule(path).r["default"] == 2


def test_optimizer_state_follows_the_kept_slices():
    linear = nn.Linear(4, 6)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=0.1)
    linear(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    old_weight = linear.weight
    exp_avg = optimizer.state[old_weight]["exp_avg"].clone()
    record = ParameterReplacements()
    prune_linear(linear, torch.tensor([1, 4]), "out", record)
    prune_linear(linear, torch.tensor([0, 3]), "in", record)
    replace_in_optimizer(optimizer, record)
    assert optimizer.param_groups[0]["params"][0] is linear.weight
    torch.testing.assert_close(optimizer.state[linear.weight]["exp_avg"], exp_avg[[1, 4]][:, [0, 3]])
    assert optimizer.state[linear.bias]["exp_avg"].shape == (2,)
    assert old_weight not in optimizer.state
    linear(torch.randn(3, 2)).sum().backward()
    optimizer.step()  # the optimizer works on the new parameters


def test_plan_must_fit_the_model():
    with pytest.raises(ValueError, match="sites that this model does not have"):
        apply_pruning_plan(build("timm"), {"heads": {"blocks.7.attn": [0]}})
    with pytest.raises(ValueError, match="LoRA layers that this model does not have"):
        apply_pruning_plan(build("timm"), {"lora_removed": ["blocks.0.attn.qkv"]})
    site = find_sites(build("llama")).attention[0]
    from lightning_peft.pruning import prune_attention

    with pytest.raises(ValueError, match="whole key/value groups"):
        prune_attention(site, [0, 2, 3, 4])


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_adapter_units_and_removal_are_exact(placement):
    from lightning_peft.adapters import AdapterConfig, adapter_modules, add_adapters
    from lightning_peft.pruning import AdapterImportance

    net = add_adapters(build("timm"), AdapterConfig(layout="houlsby", placement=placement, bottleneck_size=6))
    x = sample_input("timm")
    adapters = dict(adapter_modules(net))
    assert len(adapters) == 4
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=g))
    importance = AdapterImportance(net)
    importance.install()
    importance.recording = True
    net(x).sum().backward()
    importance.record_ranks()
    importance.remove()
    scores = importance.module_scores()
    assert set(scores) == set(adapters) and all(s > 0 for s in scores.values())
    removed, units = choose_lora(scores, importance.rank_scores(), module_ratio=0.25, rank_ratio=0.5)
    plan = PruningPlan(adapters_removed=removed, adapter_units={p: k["adapter"] for p, k in units.items()})
    assert len(removed) == 1 and all(len(k) == 3 for k in plan.adapter_units.values())
    with torch.no_grad():  # the masked equivalent: removed adapters scaled to 0, pruned units' down rows zeroed
        for path, adapter in adapters.items():
            if path in removed:
                adapter.scale = 0.0
            else:
                pruned = sorted(set(range(6)) - set(plan.adapter_units[path]))
                adapter.down.weight[pruned] = 0
                adapter.down.bias[pruned] = 0
        expected = net(x)
        apply_pruning_plan(net, plan)
        torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
    left = dict(adapter_modules(net))
    assert removed[0] not in left and all(a.down.out_features == 3 and a.up.in_features == 3 for a in left.values())
