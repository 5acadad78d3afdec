import lightning.pytorch as pl
import peft
import pytest
import timm
import transformers as tf
from helpers import tiny_transformer
from torch import nn

from lightning_peft.layout import find_blocks

TINY = dict(layers=3, hidden=32, heads=4, intermediate=64)


def _bert():
    return tiny_transformer("bert", **TINY, vocab_size=128, num_labels=2)


def _llama_like(family):
    return tiny_transformer(family, **TINY, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


FAMILIES = {
    "timm_vit": (lambda: timm.create_model("vit_tiny_patch16_224", depth=3), "blocks", 3),
    "timm_deit": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", depth=3), "blocks", 3),
    "timm_swin": (
        lambda: timm.create_model(
            "swin_tiny_patch4_window7_224", depths=(1, 1, 2, 1), embed_dim=32, num_heads=(1, 2, 4, 8)
        ),
        [f"layers.{i}.blocks" for i in range(4)],
        5,
    ),
    "timm_convnext": (lambda: timm.create_model("convnext_atto"), [f"stages.{i}.blocks" for i in range(4)], 12),
    "hf_bert": (_bert, "bert.encoder.layer", 3),
    "hf_vit": (
        lambda: tiny_transformer("vit", **TINY, image_size=32, patch_size=8, num_labels=2),
        "vit.layers",
        3,
    ),
    "hf_ast": (
        lambda: tiny_transformer("ast", **TINY, num_mel_bins=32, max_length=64, num_labels=2),
        "audio_spectrogram_transformer.layers",
        3,
    ),
    "hf_llama": (lambda: _llama_like("llama"), "model.layers", 3),
    "hf_mistral": (lambda: _llama_like("mistral"), "model.layers", 3),
    "hf_qwen2": (lambda: _llama_like("qwen2"), "model.layers", 3),
    "hf_gpt2": (
        lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128)),
        "transformer.h",
        3,
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_finds_blocks_of_each_family(family):
    build, path, n_blocks = FAMILIES[family]
    model = build()
    stack = find_blocks(model)
    assert stack.paths == ([path] if isinstance(path, str) else path)
    assert len(stack) == n_blocks
    # every parameter is either in exactly one block or outside
    all_names = [n for n, _ in model.named_parameters()]
    in_blocks = [n for i in range(len(stack)) for n in stack.block_parameter_names(i)]
    assert sorted(in_blocks + stack.outside_parameter_names()) == sorted(all_names)
    assert stack.outside_parameter_names(), "embeddings / head must sit outside the blocks"
    assert all(stack.block_of(n) is None for n in stack.outside_parameter_names())


def test_stages_flatten_in_depth_order():
    model = timm.create_model("convnext_atto")
    stack = find_blocks(model)
    assert stack.names[:3] == ("stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0")
    # the downsample layers between stages train with the "outside" parameters
    assert any(n.startswith("stages.1.downsample") for n in stack.outside_parameter_names())


@pytest.mark.parametrize("family", ["timm_vit", "hf_llama", "hf_bert"])
def test_peft_wrapped_and_lightning_module(family):
    build, path, n_blocks = FAMILIES[family]
    target = {"timm_vit": ["qkv"], "hf_llama": ["q_proj", "v_proj"], "hf_bert": ["query", "value"]}[family]
    wrapped = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=target))
    stack = find_blocks(wrapped)
    assert len(stack) == n_blocks
    assert stack.path.startswith("base_model.model.")

    class Holder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = wrapped

    holder_stack = find_blocks(Holder())
    assert holder_stack.path == "net." + stack.path
    assert holder_stack.block_parameter_names(0)[0].startswith("net.base_model.model.")


def test_explicit_path_and_suffix_override():
    model = _bert()
    assert find_blocks(model, "bert.encoder.layer").path == "bert.encoder.layer"
    assert find_blocks(model, "encoder.layer").path == "bert.encoder.layer"


def test_explicit_path_errors_list_candidates():
    model = _bert()
    with pytest.raises(ValueError, match=r"`layers='decoder.layers'`.*no module has that name.*bert.encoder.layer"):
        find_blocks(model, "decoder.layers")
    with pytest.raises(ValueError, match=r"not a ModuleList/Sequential.*HINT"):
        find_blocks(model, "bert.embeddings")


def test_nothing_fits_lists_candidates():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Candidate container paths seen: \[''\].*HINT: pass `layers=`"):
        find_blocks(model)


def test_fallback_longest_same_class_list():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.towers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.trunk = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(5))

    stack = find_blocks(Odd())
    assert stack.path == "trunk" and len(stack) == 5


ROLES = {
    "hf_llama": ["q", "k", "v", "o", "gate", "up", "down", "norm", "norm"],
    "hf_bert": ["q", "k", "v", "o", "norm", "up", "down", "norm"],
    "hf_vit": ["q", "k", "v", "o", "norm", "norm", "up", "down"],
    "timm_vit": ["norm", "qkv", "o", "norm", "up", "down"],
    "hf_gpt2": ["norm", "qkv", "o", "norm", "up", "down"],
}


@pytest.mark.parametrize("family", sorted(ROLES))
def test_unit_roles(family):
    stack = find_blocks(FAMILIES[family][0]())
    assert [u.role for u in stack.units(1)] == ROLES[family]
    categories = {u.category for u in stack.units(1)}
    assert categories == {"attention", "mlp", "norm"}


def test_units_fold_lora_into_wrapped_module():
    wrapped = peft.get_peft_model(FAMILIES["hf_llama"][0](), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    units = find_blocks(wrapped).units(0)
    q = next(u for u in units if u.role == "q")
    assert q.name == "self_attn.q_proj"
    assert len(q.parameters) == 3  # base weight + lora_A + lora_B
    assert [u.role for u in units] == ROLES["hf_llama"]


def test_multihead_attention_in_proj_is_fused_qkv():
    layer = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2)
    stack = find_blocks(layer)
    roles = {u.name: u.role for u in stack.units(0)}
    assert roles["self_attn.in_proj"] == "qkv"
    assert roles["self_attn.out_proj"] == "o"
    assert roles["norm1"] == "norm"


# ------------------------------------------------------------------------------------------- several stacks


def _t5():
    config = tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=32)
    return tf.T5ForConditionalGeneration(config)


def _bart():
    config = tf.BartConfig(
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        vocab_size=32,
        max_position_embeddings=16,
    )
    return tf.BartForConditionalGeneration(config)


@pytest.mark.parametrize(
    ("build", "paths", "source"),
    [
        (lambda: timm.create_model("resnet18"), ["layer1", "layer2", "layer3", "layer4"], "timm group_matcher"),
        (_t5, ["encoder.block", "decoder.block"], "transformers _no_split_modules"),
        (_bart, ["model.encoder.layers", "model.decoder.layers"], "transformers _no_split_modules"),
        (
            lambda: nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=32),
            ["encoder.layers", "decoder.layers"],
            "nn.Transformer",
        ),
    ],
)
def test_every_stack_in_forward_order(build, paths, source):
    stack = find_blocks(build())
    assert stack.paths == paths and stack.source == source
    for s in stack.stacks:  # blocks in order, each knowing its stack
        assert all(stack.names[i].startswith(s.path + ".") and stack.stack_of(i) == s for i in s.indices)
    assert sum(len(s) for s in stack.stacks) == len(stack)


def test_t5_stacks_hold_every_block_and_the_shared_embedding_sits_outside():
    stack = find_blocks(_t5())
    assert [len(s) for s in stack.stacks] == [2, 3]
    assert "shared.weight" in stack.outside_parameter_names()
    cross = [u.name for u in stack.units(2) if u.role == "q"]
    assert cross == ["layer.0.SelfAttention.q", "layer.1.EncDecAttention.q"]  # self- and cross-attention


def test_explicit_list_of_paths():
    model = _bart()
    stack = find_blocks(model, ["decoder.layers", "encoder.layers"])  # forward order, whatever the given order
    assert stack.paths == ["model.encoder.layers", "model.decoder.layers"] and stack.source == "explicit"
    with pytest.raises(ValueError, match=r"`layers='decoder.nope'` must name one block container"):
        find_blocks(model, ["encoder.layers", "decoder.nope"])


def test_hf_resnet_blocks_are_the_residual_layers_not_their_conv_layers():
    config = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic")
    stack = find_blocks(tf.ResNetModel(config))
    assert stack.names[0] == "encoder.stages.0.layers.0" and len(stack) == 4
    assert stack.paths == ["encoder.stages.0.layers", "encoder.stages.1.layers"]


def test_shared_blocks_are_flagged_and_refused_with_a_hint_that_does_not_loop():
    albert = tf.AlbertModel(
        tf.AlbertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=4, vocab_size=32)
    )
    stack = find_blocks(albert)
    assert len(stack) == 1 and stack.shared is not None and "4 times per forward" in stack.shared
    with pytest.raises(ValueError, match=r"`LISA` works on distinct blocks.*HINT: .*HalfFineTuning") as error:
        stack.refuse_shared("LISA", "use HalfFineTuning.")
    assert "`layers=`" not in str(error.value)  # the hint points elsewhere than the path that found the blocks


def test_stage_classes_are_refined_into_their_blocks():
    config = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=2)
    stack = find_blocks(tf.SwinModel(config))
    assert stack.names == ("encoder.layers.0.blocks.0", "encoder.layers.0.blocks.1", "encoder.layers.1.blocks.0")
