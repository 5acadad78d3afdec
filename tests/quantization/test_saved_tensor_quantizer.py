import gc
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lightning_peft.quantization.saved_tensors as saved_tensors
from lightning_peft.quantization import ActivationQuantizer, dequantize, quantize, skip_quantization


class MLPBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, width=64, depth=4, checkpointed=False):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)
        self.checkpointed = checkpointed

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(x)


class SharedInput(nn.Module):
    """q, k and v projections of one input, as in attention: the input is saved three times."""

    def __init__(self, width=64):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def _recording(quantizer, monkeypatch):
    """Record (saved tensor, what the pack hook returned) for every save."""
    records = []
    pack = quantizer.pack

    def recording_pack(tensor):
        packed = pack(tensor)
        records.append((tensor, packed))
        return packed

    monkeypatch.setattr(quantizer, "pack", recording_pack)
    return records


def _is_kept(tensor, packed):
    restored = saved_tensors._unpack(packed)
    return isinstance(packed, saved_tensors._Kept) and restored.data_ptr() == tensor.data_ptr()


def _round_trip(quantizer, tensor):
    return saved_tensors._unpack(quantizer.pack(tensor))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_parameters_and_autocast_copies_are_kept_and_activations_quantized(autocast, frozen, recompute, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 8))
    # a frozen layer in the middle: its weight (or autocast's copy, without grad_fn) is saved for the input grad
    model[2].requires_grad_(not frozen)
    quantizer = ActivationQuantizer("int8", min_numel=0, recompute_weight_copies=recompute)
    quantizer.attach(model)
    records = _recording(quantizer, monkeypatch)
    x = torch.randn(32, 64)
    with quantizer.step(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(x).sum().backward()
    weight_shapes = {(128, 64), (64, 128), (8, 64), (64, 8)}
    quantized = [(t, p) for t, p in records if isinstance(p, saved_tensors._SavedView)]
    # the weights saved (layers 2 and 4; layer 0 needs none): the Parameter, or autocast's bf16 copy
    weights = [(t, p) for t, p in records if tuple(t.shape) in weight_shapes and t.dim() == 2 and t.shape[0] != 32]
    assert len(weights) == 2
    if autocast and recompute:
        # really the copies, cast again from the parameters in backward (bit for bit), and not held meanwhile
        assert all(t.dtype == torch.bfloat16 and isinstance(p, saved_tensors._Recast) for t, p in weights)
        assert all(torch.equal(saved_tensors._unpack(p), t) for t, p in weights)
        assert quantizer.stats.num_recomputed == 2 and quantizer.stats.bytes_weight_copies == 0
    elif autocast:
        assert all(t.dtype == torch.bfloat16 and _is_kept(t, p) for t, p in weights)
        # counted once each, in bf16: (128 x 64 + 8 x 64) x 2 bytes
        assert quantizer.stats.bytes_weight_copies == (128 * 64 + 8 * 64) * 2
    else:
        assert all(_is_kept(t, p) for t, p in weights)
        assert quantizer.stats.bytes_weight_copies == 0  # the Parameters themselves are not counted at all
        assert quantizer.stats.num_recomputed == 0
    # every activation (batch dimension 32) was quantized
    activations = [t for t, _ in records if t.shape[0] == 32]
    assert activations and all(any(t is a for a, _ in quantized) for t in activations)


def _weight_copy_model(frozen_middle: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 8))
    model[2].requires_grad_(not frozen_middle)
    return model


def _grads(model, x, quantizer=None):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if quantizer is None:
            loss = model(x).square().mean()
        else:
            with quantizer.step():
                loss = model(x).square().mean()
    loss.backward()
    return [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]


@pytest.mark.parametrize("frozen_middle", [False, True])
def test_recomputed_weight_copies_give_the_exact_gradients_and_are_not_held(frozen_middle, monkeypatch):
    model, x = _weight_copy_model(frozen_middle), torch.randn(16, 64)
    reference = _grads(model, x)
    # nothing quantized (min_numel above every tensor): only the weight copies are treated, so exact equality
    quantizer = ActivationQuantizer(min_numel=1 << 62)
    quantizer.attach(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, _grads(model, x, quantizer), strict=True))
    # every Linear's weight is saved (x requires grad), and so is the first layer's copy of x, a leaf as well
    assert quantizer.stats.num_recomputed == 4
    assert quantizer.stats.bytes_weight_copies == 0
    copies = 2 * (256 * 64 + 256 * 256 + 8 * 256 + 16 * 64)
    assert quantizer.stats.bytes_after == quantizer.stats.bytes_before - copies

    # the copies die when autocast leaves (its cache holds the trainable ones until then): nothing else holds them
    copies = []
    pack = quantizer.pack

    def recording_pack(tensor):
        if tensor.dtype == torch.bfloat16 and tensor.dim() == 2 and tensor.shape[0] != 16:
            copies.append(weakref.ref(tensor._base if tensor._base is not None else tensor))
        return pack(tensor)

    monkeypatch.setattr(quantizer, "pack", recording_pack)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with quantizer.step():
            loss = model(x.clone().requires_grad_()).square().mean()
    gc.collect()
    assert len(copies) == 3 and all(ref() is None for ref in copies)  # the weights' (x's is 16 x 64)
    loss.backward()


def test_an_inplace_change_of_a_weight_before_backward_is_detected():
    model = _weight_copy_model(frozen_middle=True)
    quantizer = ActivationQuantizer(min_numel=1 << 62)
    quantizer.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), quantizer.step():
        loss = model(torch.randn(16, 64, requires_grad=True)).square().mean()
    with torch.no_grad():
        model[2].weight.mul_(2)  # frozen: autograd itself would not notice
    with pytest.raises(RuntimeError, match="recompute_weight_copies=False"):
        loss.backward()


def test_copies_that_cannot_be_proven_are_kept():
    class ScaledLinear(nn.Linear):  # its own forward: a frozen-shaped leaf inside it could be anything
        def forward(self, x):
            return super().forward(x) * 0.5

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), ScaledLinear(256, 256), nn.GELU(), nn.Linear(256, 8))
    model[2].requires_grad_(False)
    quantizer = ActivationQuantizer(min_numel=1 << 62)
    quantizer.attach(model)
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), quantizer.step():
        model(x).sum().backward()
    # the trainable weights (and x's copy) through their AccumulateGrad; the frozen one in a subclass stays kept
    assert quantizer.stats.num_recomputed == 3
    assert quantizer.stats.bytes_weight_copies == 256 * 256 * 2
    # switched off, every copy is kept
    off = ActivationQuantizer(min_numel=1 << 62, recompute_weight_copies=False)
    off.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), off.step():
        model(x).sum().backward()
    assert off.stats.num_recomputed == 0
    assert off.stats.bytes_weight_copies == 2 * (256 * 64 + 256 * 256 + 8 * 256 + 16 * 64)


def test_parameters_integer_and_small_tensors_pass_through_untouched():
    param = nn.Parameter(torch.randn(300, 300))
    frozen = nn.Parameter(torch.randn(300, 300), requires_grad=False)
    module = nn.Module()
    module.a, module.b = param, frozen
    quantizer = ActivationQuantizer("int8", min_numel=1000)
    quantizer.attach(module)
    quantizer.start_step()
    # identity of the object and of the storage
    assert _round_trip(quantizer, param) is param
    assert _round_trip(quantizer, frozen) is frozen
    assert _round_trip(quantizer, param.t()).untyped_storage().data_ptr() == param.data_ptr()
    indices = torch.randint(0, 10, (100_000,))
    mask = torch.rand(100_000) > 0.5
    assert _round_trip(quantizer, indices) is indices
    assert _round_trip(quantizer, mask) is mask
    small = torch.randn(999)
    assert _round_trip(quantizer, small) is small
    large = torch.randn(1000)
    assert isinstance(quantizer.pack(large), saved_tensors._SavedView)
    assert quantizer.stats.num_quantized == 1


def test_a_storage_saved_several_times_is_stored_once():
    torch.manual_seed(0)
    model = SharedInput()
    quantizer = ActivationQuantizer("int8", min_numel=0)
    quantizer.attach(model)
    x = torch.randn(16, 8, 64, requires_grad=True)
    with quantizer.step() as stats:
        h = x * 2  # an activation saved by q, k and v (as 2-D views of one storage)
        out = model(h)
    assert stats.num_deduplicated == 2
    # bytes: the input once (int8 + scales), plus q(h) and k(h) saved by the product
    one_copy = 16 * 8 * 64 * (1 + 4 / 128)
    assert stats.bytes_after == pytest.approx(3 * one_copy)
    assert stats.bytes_before == 3 * 16 * 8 * 64 * 4
    out.sum().backward()
    reference = x.detach().clone().requires_grad_()
    model(reference * 2).sum().backward()
    cos = torch.nn.functional.cosine_similarity(x.grad.flatten(), reference.grad.flatten(), dim=0)
    assert cos > 0.999


def test_an_inplace_change_between_saves_is_not_deduplicated():
    lin1, lin2 = nn.Linear(64, 64), nn.Linear(64, 64)
    quantizer = ActivationQuantizer("int8", min_numel=0)
    quantizer.attach(nn.ModuleList([lin1, lin2]))
    x = torch.randn(32, 64)
    with quantizer.step() as stats:
        h = x * 1
        a = lin1(h)
        h.add_(10.0)
        b = lin2(h)
    assert stats.num_deduplicated == 0
    (a.sum() + b.sum()).backward()
    # lin2's weight gradient is computed from the changed tensor: column sums of h + 10
    torch.testing.assert_close(lin2.weight.grad[0], (x + 10).sum(0), rtol=0.02, atol=0.5)
    torch.testing.assert_close(lin1.weight.grad[0], x.sum(0), rtol=0.02, atol=0.5)


def test_an_inplace_change_of_a_kept_tensor_is_still_detected():
    quantizer = ActivationQuantizer("int8", min_numel=10**9)
    x = torch.randn(100, requires_grad=True)
    with quantizer.step():
        y = x.exp()  # saves its output, kept (below min_numel)
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*expected version 0"):
        y.sum().backward()


def _live_outputs_after_discarded_step(quantizer, model):
    refs = []
    handles = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o))) for m in model.modules()]
    x = torch.randn(64, 64, requires_grad=True)
    with quantizer.step():
        loss = torch.softmax(torch.sigmoid(model(x)), dim=-1).exp().sum()
    del loss
    gc.collect()
    for handle in handles:
        handle.remove()
    return sum(ref() is not None for ref in refs), len(refs)


@pytest.mark.parametrize("min_numel", [0, 10**9])
def test_memory_returns_to_baseline_when_a_loss_is_discarded(min_numel, monkeypatch):
    # min_numel=10**9 keeps every tensor (the pack hook returns them); 0 quantizes them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Sigmoid())
    quantizer = ActivationQuantizer("int8", min_numel=min_numel)
    quantizer.attach(model)
    _live_outputs_after_discarded_step(quantizer, model)  # warm-up: lazy allocations
    gc.collect()
    baseline = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    live, total = _live_outputs_after_discarded_step(quantizer, model)
    assert total == 5
    assert live == 0
    gc.collect()
    assert sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()) == baseline

    # the test detects the leak: a pack hook returning kept outputs unchanged forms an uncollectable cycle
    if min_numel:
        monkeypatch.setattr(saved_tensors, "_keep", lambda tensor: tensor)
        live, _ = _live_outputs_after_discarded_step(quantizer, model)
        assert live > 0


def test_checkpointing_still_frees_memory():
    torch.manual_seed(0)
    x = torch.randn(32, 16, 64)
    plain, checkpointed = Stack(), Stack(checkpointed=True)
    checkpointed.load_state_dict(plain.state_dict())
    calls = []
    for block in checkpointed.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))

    def run(model, hooks_inside_checkpoint=False):
        quantizer = ActivationQuantizer("int8", min_numel=0)
        quantizer.attach(model)
        model.zero_grad()
        if hooks_inside_checkpoint:
            # the pitfall: hooks pushed inside a checkpointed region shadow checkpoint's own hooks
            for block in model.blocks:
                block.register_forward_pre_hook(lambda *_: quantizer.enable_hooks())
                block.register_forward_hook(lambda *_: quantizer.disable_hooks())
        with quantizer.step() as stats:
            loss = model(x).square().mean()
        loss.backward()
        return stats, {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_stats, plain_grads = run(plain)
    calls.clear()
    ckpt_stats, ckpt_grads = run(checkpointed)
    # the tensors kept for backward: with checkpointing only each block's input (and the head's) stay
    assert ckpt_stats.num_saved <= len(checkpointed.blocks) + 3
    assert ckpt_stats.bytes_after < 0.25 * plain_stats.bytes_after
    # the blocks really were recomputed in backward, and the gradients are right
    assert len(calls) == 2 * len(checkpointed.blocks)
    for name, grad in plain_grads.items():
        assert torch.nn.functional.cosine_similarity(grad.flatten(), ckpt_grads[name].flatten(), dim=0) > 0.99
    # control: hooks entered inside the checkpointed regions disable checkpointing (everything is kept)
    inside_stats, _ = run(Stack(checkpointed=True), hooks_inside_checkpoint=True)
    assert inside_stats.bytes_after > 0.8 * plain_stats.bytes_after


def test_exclusions_keep_tensors_and_do_not_shadow_checkpoint_hooks():
    torch.manual_seed(0)
    model = Stack(checkpointed=False)
    quantizer = ActivationQuantizer("int8", min_numel=0, exclude_modules=["blocks.1", "head"])
    quantizer.attach(model)
    x = torch.randn(8, 64)
    with quantizer.step() as excluded:
        model(x).sum()
    with quantizer.step() as skipped, skip_quantization():
        model(x).sum()
    quantizer.detach()
    with quantizer.step() as everything:
        model(x).sum()
    assert skipped.num_quantized == 0
    assert 0 < excluded.num_quantized < everything.num_quantized
    with pytest.raises(ValueError, match=r"`exclude_modules` pattern 'blocks\.9' matches no module.*HINT"):
        ActivationQuantizer(exclude_modules=["blocks.9"]).attach(model)


def test_stochastic_rounding_leaves_the_global_rng_alone():
    model = Stack()
    quantizer = ActivationQuantizer("int8", min_numel=0, stochastic_rounding=True)
    quantizer.attach(model)
    x = torch.randn(8, 64)
    torch.manual_seed(123)
    with quantizer.step() as stats:
        model(x).sum()
    after = torch.rand(3)
    torch.manual_seed(123)
    assert stats.num_quantized > 0
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "int4"}, r"`format` must be one of 'int8', 'fp8_e4m3', 'fp8_e5m2', got 'int4'.*HINT"),
        ({"group_size": 0}, r"`group_size` must be an integer >= 1, got 0.*HINT"),
        ({"min_numel": -1}, r"`min_numel` must be an integer >= 0, got -1.*HINT"),
        ({"exclude_modules": "head"}, r"`exclude_modules` must be a list of module-name patterns.*HINT"),
        ({"recompute_weight_copies": "yes"}, r"`recompute_weight_copies` must be True or False, got 'yes'.*HINT"),
    ],
)
def test_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationQuantizer(**kwargs)


def test_pickles_and_copies_without_its_runtime_links():
    import copy
    import pickle

    model = Stack()
    quantizer = ActivationQuantizer("fp8_e4m3", min_numel=0, stochastic_rounding=True, exclude_modules=["head"])
    quantizer.attach(model)
    with quantizer.step():
        model(torch.randn(4, 64)).sum()
    for clone in (pickle.loads(pickle.dumps(quantizer)), copy.deepcopy(quantizer)):
        assert clone._module_ref is None and clone._hooks is None and not clone._hook_handles
        assert (clone.format, clone.exclude_modules, clone.stochastic_rounding) == ("fp8_e4m3", ["head"], True)
        clone.attach(model)
        with clone.step() as stats:
            model(torch.randn(4, 64)).sum()
        assert stats.num_quantized > 0
        clone.detach()


def test_memory_of_a_freed_parameter_is_not_mistaken_for_a_parameter():
    """FSDP2 frees the unsharded parameters of a block after its forward, and activations then reuse the memory.

    Simulated deterministically: two storages over one buffer have the same address but are different storages.
    """
    buffer = bytearray(64 * 64 * 4)
    module = nn.Linear(64, 64)
    module.weight = nn.Parameter(torch.frombuffer(buffer, dtype=torch.float32).view(64, 64))
    quantizer = ActivationQuantizer("int8", min_numel=0)
    quantizer.attach(module)
    quantizer.start_step()
    quantizer.refresh_parameters()
    activation = torch.frombuffer(buffer, dtype=torch.float32).view(64, 64)
    assert activation.untyped_storage().data_ptr() == module.weight.untyped_storage().data_ptr()
    assert isinstance(quantizer.pack(activation), saved_tensors._SavedView)
    assert isinstance(quantizer.pack(module.weight), saved_tensors._Kept)


def test_peft_lora_base_weights_are_recast_too():
    """peft's LoRA layer runs its frozen base nn.Linear inside its own forward: the base weight's copy is proven
    by that inner layer, the adapters' through the autograd graph."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 8))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0", "2"]))
    x = torch.randn(16, 64)
    reference = _grads(model, x)
    quantizer = ActivationQuantizer(min_numel=1 << 62)
    quantizer.attach(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, _grads(model, x, quantizer), strict=True))
    assert quantizer.stats.bytes_weight_copies == 0
    # the two base weights (frozen), the four adapter matrices and x's copy
    assert quantizer.stats.num_recomputed == 2 + 4 + 1


def test_a_copy_of_a_rearranged_weight_is_not_recast_from_the_weight():
    """A copy of ``weight.t().contiguous()`` has the weight's size but another element order: casting the weight
    again would restore wrong values. Only a direct cast of the whole weight is recast."""

    class TransposedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 256) / 16)  # used as (in, out)

        def forward(self, x):
            return nn.functional.linear(x, self.weight.t().contiguous())

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), TransposedLinear(), nn.GELU(), nn.Linear(256, 8))
    x = torch.randn(16, 64)
    reference = _grads(model, x)
    quantizer = ActivationQuantizer(min_numel=1 << 62)
    quantizer.attach(model)
    assert all(torch.equal(a, b) for a, b in zip(reference, _grads(model, x, quantizer), strict=True))
    assert quantizer.stats.bytes_weight_copies == 256 * 64 * 2  # the rearranged copy, kept


@pytest.mark.parametrize("format", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(32, 128), (3, 50), (4, 8, 64)])
def test_the_hook_restores_what_quantize_and_dequantize_give_and_counts_their_bytes(format, dtype, shape):
    # the pack hook's own path for whole storages must match the public functions bit for bit, byte for byte
    torch.manual_seed(0)
    quantizer = ActivationQuantizer(format, group_size=32, min_numel=0)
    x = torch.randn(shape, requires_grad=True)
    activation = (x * 3).to(dtype)
    views = [activation, activation.transpose(-1, -2)]
    reference = quantize(activation.detach(), format, group_size=32)
    quantizer.start_step()
    restored = [saved_tensors._unpack(quantizer.pack(v)) for v in views]
    quantizer.end_step()
    expected = dequantize(reference)
    assert restored[0].dtype == dtype and restored[0].shape == activation.shape
    assert torch.equal(restored[0], expected)
    assert torch.equal(restored[1], expected.transpose(-1, -2))
    assert quantizer.stats.bytes_after == reference.nbytes
    assert quantizer.stats.bytes_before == activation.numel() * activation.element_size()
    assert quantizer.stats.num_deduplicated == 1


def test_relu_outputs_keep_their_zeros_so_the_backward_mask_is_exact():
    # a ReLU output with many small positives next to a large one: int8 round-to-nearest would make them 0 and
    # ReLU's backward (which reads `output > 0`) would drop their gradient
    torch.manual_seed(0)
    x = torch.cat([torch.full((64,), 1e-3), torch.full((63,), -1.0), torch.tensor([10.0])]).repeat(4, 1)
    x.requires_grad_(True)
    quantizer = ActivationQuantizer("int8", min_numel=0)
    with quantizer.step():
        y = torch.relu(x * 1.0)
    y.sum().backward()
    assert torch.equal(x.grad, (x > 0).float())  # exactly the plain ReLU gradient
    assert quantizer.stats.num_quantized >= 1


def test_keep_nonzero_only_moves_values_below_half_a_step():
    from lightning_peft.quantization.formats import dequantize, quantize

    x = torch.tensor([[0.0, 1e-4, -1e-4, 0.3, 12.7] + [0.0] * 123])
    plain, kept = dequantize(quantize(x, "int8")), dequantize(quantize(x, "int8", keep_nonzero=True))
    step = 12.7 / 127
    assert torch.equal(kept.ne(0), x.ne(0)) and not torch.equal(plain.ne(0), x.ne(0))
    assert (kept - x).abs().max() <= step + 1e-6  # still within one step


def test_a_partial_view_is_restored_with_the_strides_it_was_saved_with():
    # the q of a fused qkv output (timm's attention): a view with gaps, quantized alone. A torch.compile-d backward
    # asserts the strides its forward saw ("expected size 4==4, stride 816==2448"), so they must come back
    torch.manual_seed(0)
    quantizer = ActivationQuantizer("int8", group_size=8, min_numel=0)
    x = torch.randn(4, 17, 3 * 6 * 8, requires_grad=True)
    qkv = (x * 2).reshape(4, 17, 3, 6, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    expanded = (x[:, :1] * 2).expand(4, 17, 144)  # overlapping strides cannot be written to: restored contiguous
    quantizer.start_step()
    packed = [quantizer.pack(t) for t in (q, k.transpose(-1, -2), expanded)]
    quantizer.end_step()
    restored = [saved_tensors._unpack(p) for p in packed]
    assert all(isinstance(p, saved_tensors._SavedView) for p in packed)
    for original, back in zip((q, k.transpose(-1, -2)), restored[:2], strict=True):
        assert back.shape == original.shape and back.stride() == original.stride()
        torch.testing.assert_close(back, original.detach(), atol=original.abs().max().item() / 100, rtol=0)
    assert restored[2].shape == expanded.shape
    torch.testing.assert_close(restored[2], expanded.detach(), atol=expanded.abs().max().item() / 100, rtol=0)


def test_weights_masked_by_torch_prune_are_kept_like_parameters(monkeypatch):
    # Lightning's ModelPruning: `weight` becomes `weight_orig * weight_mask`, recomputed in a forward pre-hook
    torch.manual_seed(0)
    counts = []
    for pruned in (False, True):
        model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
        if pruned:
            torch.nn.utils.prune.l1_unstructured(model[2], "weight", amount=0.5)
        quantizer = ActivationQuantizer("int8", min_numel=1024)
        quantizer.attach(model)
        records = _recording(quantizer, monkeypatch)
        with quantizer.step():
            model(torch.randn(8, 256)).sum().backward()
        counts.append(quantizer.stats.num_quantized)
        if pruned:
            masked = [packed for tensor, packed in records if tensor.shape == (256, 256)]
            assert masked and all(isinstance(packed, saved_tensors._Kept) for packed in masked)
    assert counts[0] == counts[1] > 0
    # a product with an input that needs a gradient is an activation, quantized as before
    quantizer = ActivationQuantizer("int8", min_numel=0)
    x = torch.randn(64, 64, requires_grad=True)
    quantizer.start_step()
    assert isinstance(quantizer.pack(x * 3), saved_tensors._SavedView)


def test_excluded_modules_inside_a_compiled_region_are_reported():
    model = nn.Sequential(torch.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU())), nn.Linear(8, 8))
    outside = ActivationQuantizer(exclude_modules=["1"])
    outside.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outside.start_step()
    inside = ActivationQuantizer(exclude_modules=["0._orig_mod.0"])
    inside.attach(model)
    with pytest.warns(
        UserWarning, match=r"`exclude_modules=\['0._orig_mod.0'\]` cannot apply inside the torch.compile"
    ):
        inside.start_step()
