"""Export round trips: the folder loads with plain transformers / timm and gives the module's outputs."""

import lightning.pytorch as pl
import pytest
import timm
import torch
import transformers
from helpers import tiny_transformer, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft.cli import cli_main
from lightning_peft.data import Digits
from lightning_peft.export import ExportError, export_model
from lightning_peft.modules import AudioClassifier, CausalLM, ImageClassifier, TextClassifier
from lightning_peft.pruning import apply_pruning_plan, find_sites

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 4}
LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}  # fmt: skip
AST = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
LORA = {
    "bert": ["query", "value", "dense"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "ast": ["q_proj", "v_proj", "fc2"],
    "vit": ["qkv", "fc2"],
}


def _module(family, tmp_path, lora):
    torch.manual_seed(0)
    peft = {"peft_type": "LORA", "r": 4, "target_modules": LORA[family]} if lora else None
    if family == "bert":
        folder = tmp_path / "bert_base"
        tiny_transformer("bert", heads=4, seed=0).save_pretrained(folder)
        module = TextClassifier(str(folder), num_labels=3, peft=peft)
    elif family == "llama":
        module = CausalLM(config=LLAMA, peft=peft)
    elif family == "ast":
        module = AudioClassifier(3, model=None, builder="hf", model_kwargs=AST, num_mel_bins=16, target_length=24,
                                 fstride=8, tstride=8, peft=peft)  # fmt: skip
    else:
        module = ImageClassifier("vit_tiny_patch16_224", num_classes=3, model_kwargs=VIT, peft=peft)
    with torch.no_grad():  # LoRA starts as a zero update: make it count
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return module.eval()


def _inputs(family):
    generator = torch.Generator().manual_seed(1)
    if family in ("bert", "llama"):
        return {"input_ids": torch.randint(0, 64, (2, 7), generator=generator)}
    if family == "ast":
        return {"input_values": torch.randn(2, 24, 16, generator=generator)}
    return {"x": torch.randn(2, 3, 16, 16, generator=generator)}


def _module_outputs(module, family, inputs):
    with torch.no_grad():
        if family == "vit":
            return module(inputs["x"])
        if family == "ast":
            return module(inputs["input_values"])
        return module(**inputs)


def _loaded_outputs(folder, family, inputs):
    with torch.no_grad():
        if family == "vit":
            return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(inputs["x"])
        auto = {
            "bert": transformers.AutoModelForSequenceClassification,
            "llama": transformers.AutoModelForCausalLM,
            "ast": transformers.AutoModelForAudioClassification,
        }[family]
        return auto.from_pretrained(folder).eval()(**inputs).logits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["bert", "llama", "vit", "ast"])
def test_round_trip_with_plain_transformers_and_timm(family, lora, tmp_path):
    module = _module(family, tmp_path, lora)
    inputs = _inputs(family)
    out = export_model(module, tmp_path / "export")
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    torch.testing.assert_close(_loaded_outputs(out, family, inputs), _module_outputs(module, family, inputs))


def _prune(module, heads=True, uniform_neurons=True):
    sites = find_sites(module)
    plan = {"heads": {}, "neurons": {}}
    if heads:
        for site in sites.attention:
            group = site.num_heads // site.num_kv_heads
            plan["heads"][site.path] = list(range(site.num_heads - group))  # drop the last key/value group
    for i, site in enumerate(sites.mlp):
        plan["neurons"][site.path] = list(range(0, site.hidden, 2 if uniform_neurons or i else 4))
    apply_pruning_plan(module, plan)
    return module


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_pruned_llama_states_its_sizes_in_the_config(lora, tmp_path):
    module = _prune(_module("llama", tmp_path, lora))
    inputs = _inputs("llama")
    out = export_model(module, tmp_path / "export")
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 32)
    torch.testing.assert_close(_loaded_outputs(out, "llama", inputs), _module_outputs(module, "llama", inputs))


def test_a_bert_with_uniformly_pruned_neurons_exports(tmp_path):
    module = _prune(_module("bert", tmp_path, True), heads=False)
    out = export_model(module, tmp_path / "export")
    assert transformers.AutoConfig.from_pretrained(out).intermediate_size == 32
    inputs = _inputs("bert")
    torch.testing.assert_close(_loaded_outputs(out, "bert", inputs), _module_outputs(module, "bert", inputs))


@pytest.mark.parametrize(
    ("family", "heads", "uniform"),
    [("bert", True, True), ("ast", True, True), ("vit", True, True), ("llama", False, False)],
)
def test_what_the_format_cannot_state_is_refused_and_nothing_is_written(family, heads, uniform, tmp_path):
    module = _prune(_module(family, tmp_path, True), heads=heads, uniform_neurons=uniform)
    with pytest.raises(ExportError, match=r"cannot state this model's sizes.*HINT: load it with `\w+.load_from_check"):
        export_model(module, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_refusals_before_writing(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="HINT"):
        export_model(_module("vit", tmp_path, False), tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
    timm_ast = AudioClassifier(3, model="vit_tiny_patch16_224", num_mel_bins=16, target_length=24, fstride=8,
                               tstride=8, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    with pytest.raises(ExportError, match="AST recipe.*AudioClassifier.load_from_checkpoint"):
        export_model(timm_ast, tmp_path / "ast")


def test_unmerged_lora_is_a_peft_adapter_folder(tmp_path):
    from peft import PeftModel

    module = _module("bert", tmp_path, True)
    out = export_model(module, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_model.safetensors").is_file()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert_base", num_labels=3)
    inputs = _inputs("bert")
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(base, out).eval()(**inputs).logits
    torch.testing.assert_close(loaded, _module_outputs(module, "bert", inputs))


def test_cli_export_of_a_checkpoint(tmp_path):
    pl.seed_everything(0)
    module = ImageClassifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=VIT,
                             peft={"peft_type": "LORA", "r": 4, "target_modules": ["qkv"]})  # fmt: skip
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, enable_checkpointing=True, max_steps=2, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(module, Digits(image_size=16, batch_size=8))
    cli_main(["export", "--ckpt_path", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / "out")])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = module.eval()(images)
        torch.testing.assert_close(
            timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()(images), expected
        )
    with pytest.raises(SystemExit, match="must be a new or empty folder"):
        cli_main(["export", "--ckpt_path", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / "out")])


def test_exported_configs_name_the_classes(tmp_path):
    import json

    from own_data import write_image_folder

    from lightning_peft.data import ImageFolder

    bert = _module("bert", tmp_path, lora=True)
    export_model(bert, tmp_path / "bert_out", label_names=("negative", "neutral", "positive"))
    config = json.loads((tmp_path / "bert_out" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "bert_out")
    assert loaded.id2label[2] == "positive"
    with pytest.raises(ValueError, match=r"`label_names` must name each of the model's 3 outputs, got 2"):
        export_model(bert, tmp_path / "two", label_names=["a", "b"])

    pl.seed_everything(0)
    root = write_image_folder(tmp_path / "images")  # classes cat, dog
    module = ImageClassifier("vit_tiny_patch16_224", num_classes=2, model_kwargs=VIT)
    trainer = pl.Trainer(
        **trainer_kwargs(tmp_path, enable_checkpointing=True, max_steps=1, limit_val_batches=0),
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(module, ImageFolder(str(root), model="vit_tiny_patch16_224", image_size=16, batch_size=2))
    cli_main(["export", "--ckpt_path", str(tmp_path / "last.ckpt"), "--output", str(tmp_path / "vit_out")])
    config = json.loads((tmp_path / "vit_out" / "config.json").read_text())
    assert config["pretrained_cfg"]["label_names"] == ["cat", "dog"], config
    assert timm.create_model(f"local-dir:{tmp_path / 'vit_out'}", pretrained=True).pretrained_cfg["label_names"] == [
        "cat",
        "dog",
    ]
