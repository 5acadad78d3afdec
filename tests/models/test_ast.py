import pytest
import timm
import torch

from lightning_peft.layout import find_blocks
from lightning_peft.models.ast import (
    AudioSpectrogramTransformer,
    adapt_position_embedding,
    ast_patch_grid,
    build_hf_ast,
    build_timm_ast,
)

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}
HF_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def test_patch_grid_matches_the_paper():
    assert ast_patch_grid(128, 1024, 10, 10) == (12, 101)  # AudioSet: 1212 patches
    assert ast_patch_grid(128, 128, 10, 10) == (12, 12)  # speech commands
    assert ast_patch_grid(128, 1024, 16, 16) == (8, 64)  # no overlap


def test_position_embedding_crop_keeps_the_centre_of_a_224_grid():
    grid = torch.randn(1, 14, 14, 8)
    adapted = adapt_position_embedding(grid, (12, 12)).reshape(1, 12, 12, 8)
    # 14 -> 12 keeps rows/columns 1..12 (start = 14 // 2 - 12 // 2 = 1) on both axes
    torch.testing.assert_close(adapted, grid[:, 1:13, 1:13])
    adapted = adapt_position_embedding(grid, (12, 5)).reshape(1, 12, 5, 8)
    torch.testing.assert_close(adapted, grid[:, 1:13, 5:10])


def test_position_embedding_interpolates_a_longer_time_axis():
    grid = torch.randn(1, 14, 14, 8)
    adapted = adapt_position_embedding(grid, (12, 101)).reshape(1, 12, 101, 8)
    assert adapted.shape == (1, 12, 101, 8)
    # the frequency axis is still a crop of the interpolated time axis: a constant row stays constant
    constant = torch.ones(1, 14, 14, 8) * torch.arange(14.0).view(1, 14, 1, 1)
    rows = adapt_position_embedding(constant, (12, 101)).reshape(1, 12, 101, 8)
    torch.testing.assert_close(rows[0, :, :, 0], torch.arange(1.0, 13.0).view(12, 1).expand(12, 101))


def test_timm_ast_adapts_a_224_vit():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY)
    model = AudioSpectrogramTransformer(vit, num_classes=5, num_mel_bins=128, target_length=128)
    assert model.grid == (12, 12)
    assert model.patch_embed.in_channels == 1 and model.patch_embed.stride == (10, 10)
    torch.testing.assert_close(model.patch_embed.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    pos = vit.pos_embed.detach()
    assert model.pos_embed.shape == (1, 1 + 144, 32)
    torch.testing.assert_close(model.pos_embed[:, :1], pos[:, :1])  # the cls token's embedding is kept
    patches = pos[:, 1:].reshape(1, 14, 14, 32)[:, 1:13, 1:13].reshape(1, 144, 32)
    torch.testing.assert_close(model.pos_embed[:, 1:], patches)
    assert model(torch.randn(3, 128, 128)).shape == (3, 5)


def test_timm_ast_deit_pools_cls_and_distillation_tokens():
    model = build_timm_ast("deit_tiny_distilled_patch16_224", num_classes=3, target_length=64, backbone_kwargs=TINY)
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape[1] == 2 + 12 * 5
    tokens = model.forward_features(torch.randn(2, 64, 128))
    expected = model.head(tokens[:, :2].mean(1))
    torch.testing.assert_close(model(torch.randn(2, 64, 128) * 0 + 0), model(torch.zeros(2, 64, 128)))
    assert expected.shape == (2, 3)
    assert isinstance(model.head[0], torch.nn.LayerNorm) and isinstance(model.head[1], torch.nn.Linear)


def test_timm_ast_loads_a_saved_vit_checkpoint(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=1000, **TINY)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    model = build_timm_ast(
        "vit_tiny_patch16_224", num_classes=4, target_length=128, checkpoint_path=str(path), backbone_kwargs=TINY
    )
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(model.cls_token, vit.cls_token)
    torch.testing.assert_close(model.patch_embed.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.pos_embed[:, 1:2], vit.pos_embed[:, 1 + 14 + 1 : 1 + 14 + 2])


def test_timm_ast_loads_its_own_state_dict(tmp_path):
    model = build_timm_ast("vit_tiny_patch16_224", num_classes=4, target_length=64, backbone_kwargs=TINY)
    path = tmp_path / "ast.pth"
    torch.save(model.state_dict(), path)
    again = build_timm_ast(
        "vit_tiny_patch16_224", num_classes=4, target_length=64, checkpoint_path=str(path), backbone_kwargs=TINY
    )
    x = torch.randn(2, 64, 128)
    torch.testing.assert_close(model.eval()(x), again.eval()(x))
    with pytest.raises(ValueError, match="AST state dict of other sizes"):
        build_timm_ast(
            "vit_tiny_patch16_224", num_classes=7, target_length=64, checkpoint_path=str(path), backbone_kwargs=TINY
        )


def test_timm_ast_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`backbone` must be a timm"):
        build_timm_ast("not_a_model")
    with pytest.raises(FileNotFoundError, match="`checkpoint_path`"):
        build_timm_ast("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="exclude each other"):
        build_timm_ast("vit_tiny_patch16_224", pretrained=True, checkpoint_path="x.pth")
    other = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="no weight named and shaped"):
        build_timm_ast("vit_tiny_patch16_224", checkpoint_path=str(other), backbone_kwargs=TINY)
    model = build_timm_ast("vit_tiny_patch16_224", num_classes=2, target_length=64, backbone_kwargs=TINY)
    with pytest.raises(ValueError, match=r"\(batch, 64, 128\)"):
        model(torch.randn(1, 128, 64))


def test_hf_ast_from_config_and_from_a_saved_folder(tmp_path):
    model = build_hf_ast(config=HF_TINY, num_labels=3, max_length=128)
    assert model.training
    assert model(torch.randn(2, 128, 128)).logits.shape == (2, 3)
    model.save_pretrained(tmp_path / "ast")
    loaded = build_hf_ast(str(tmp_path / "ast"), num_labels=5)
    assert loaded.classifier.dense.out_features == 5
    torch.testing.assert_close(
        loaded.audio_spectrogram_transformer.layers[1].mlp.fc1.weight,
        model.audio_spectrogram_transformer.layers[1].mlp.fc1.weight,
    )
    # a shorter input: the positional embedding's time axis is cropped (12 x 12 grid -> 12 x 5)
    short = build_hf_ast(str(tmp_path / "ast"), num_labels=5, max_length=64)
    pos = model.audio_spectrogram_transformer.embeddings.position_embeddings.detach()
    new = short.audio_spectrogram_transformer.embeddings.position_embeddings.detach()
    assert new.shape == (1, 2 + 60, 32)
    torch.testing.assert_close(new[:, 2:].reshape(12, 5, 32), pos[:, 2:].reshape(12, 12, 32)[:, 1:6])
    assert short(torch.randn(1, 64, 128)).logits.shape == (1, 5)


def test_hf_ast_errors():
    with pytest.raises(ValueError, match="exactly one of `model`"):
        build_hf_ast()
    with pytest.raises(ValueError, match="ASTConfig does not know"):
        build_hf_ast(config={"hidden_sizes": 3})
    with pytest.raises(FileNotFoundError, match="'/nonexistent/folder/ast' does not exist"):
        build_hf_ast("/nonexistent/folder/ast")


@pytest.mark.parametrize("builder", ["timm", "hf"])
def test_layer_finder_finds_both_ast_forms_without_configuration(builder):
    if builder == "timm":
        model = build_timm_ast("vit_tiny_patch16_224", num_classes=2, target_length=64, backbone_kwargs=TINY)
        expected, names = "blocks", ["blocks.0", "blocks.1"]
    else:
        model = build_hf_ast(config=HF_TINY, num_labels=2, max_length=64)
        expected = "audio_spectrogram_transformer.layers"
        names = [f"{expected}.0", f"{expected}.1"]
    stack = find_blocks(model)
    assert stack.path == expected and list(stack.names) == names
    outside = stack.outside_parameter_names()
    assert any("pos" in n or "position" in n for n in outside) and any(
        n.startswith(("head", "classifier")) for n in outside
    )
    roles = {unit.role for unit in stack.units(0)}
    assert roles >= {"o", "up", "down", "norm"} and (roles & {"qkv", "q"})
