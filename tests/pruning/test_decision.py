import copy

import torch
from pruning_helpers import build, sample_input

from lightning_peft.adapters import AdapterConfig, adapter_modules, add_adapters
from lightning_peft.layout.peft_layers import lora_ranks
from lightning_peft.pruning import PruningPlan, apply_pruning_plan, find_lora_layers
from lightning_peft.pruning.decision import simulated_cut


def _outputs_under_cut_and_after(net, plan, x):
    pruned = copy.deepcopy(net)
    apply_pruning_plan(pruned, plan)
    with torch.no_grad():
        expected = pruned(x)
        with simulated_cut(net, plan, None):
            got = net(x)
    return got, expected


def test_the_simulated_peft_cut_is_the_cut_and_is_undone():
    """LoRA ranks cut on copies, a removed LoRA layer off: the pruned model's output; afterwards the model as it was."""
    net = build("bert", lora=True)
    paths = list(find_lora_layers(net))
    plan = PruningPlan(lora_removed=[paths[0]], lora_ranks={paths[1]: {"default": [0, 2]}, paths[2]: {"default": [3]}})
    x = sample_input("bert")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    ranks = {p: lora_ranks(layer) for p, layer in find_lora_layers(net).items()}
    with torch.no_grad():
        reference = net(x)
    got, expected = _outputs_under_cut_and_after(net, plan, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, reference)
    assert {p: lora_ranks(layer) for p, layer in find_lora_layers(net).items()} == ranks
    assert net.state_dict().keys() == state.keys() and all(
        torch.equal(v, state[k]) for k, v in net.state_dict().items()
    )
    with torch.no_grad():
        assert torch.equal(net(x), reference)


def test_the_simulated_adapter_cut_is_the_cut_and_is_undone():
    net = build("timm")
    add_adapters(net, AdapterConfig(layout="houlsby", bottleneck_size=8))
    for _, adapter in adapter_modules(net):  # a non-zero output projection, so every cut changes the output
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    paths = [p for p, _ in adapter_modules(net)]
    plan = PruningPlan(adapters_removed=[paths[0]], adapter_units={paths[1]: [1, 4, 5]})
    x = sample_input("timm")
    with torch.no_grad():
        reference = net(x)
    got, expected = _outputs_under_cut_and_after(net, plan, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, reference)
    adapters = dict(adapter_modules(net))
    assert adapters[paths[0]].scale == 1.0 and adapters[paths[1]].down.out_features == 8
    with torch.no_grad():
        assert torch.equal(net(x), reference)
