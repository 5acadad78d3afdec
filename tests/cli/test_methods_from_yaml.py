"""Every layer-wise method from a LightningCLI YAML file on the audio module (the configs cover vision and text).

A user names the callbacks in YAML exactly as in ``configs/``; these runs use a tiny AST and a tiny spoken-keyword
set so each takes seconds.
"""

import re
import textwrap

import pytest
import torch

from lightning_peft.callbacks import IST, EarlyPruning, HalfFineTuning
from lightning_peft.cli import PeftCLI

# The keyword set is synthesised by espeak-ng (skipped without it, required under CI: see conftest.py at the root).
pytestmark = pytest.mark.espeak

AUDIO = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 6
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  callbacks:
{callbacks}
model:
  class_path: AudioClassifier
  init_args:
    num_classes: 2
    model: vit_tiny_patch16_224
    builder: timm
    model_kwargs: {{embed_dim: 32, depth: 4, num_heads: 2}}
    num_mel_bins: 128
    target_length: 64
    fstride: 16
    tstride: 16
{peft}
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {{lr: 1.0e-3}}
data:
  class_path: SpokenKeywords
  init_args:
    words: ["yes", "no"]  # quoted: YAML reads bare yes / no as booleans
    voices: [en-us, en-gb+f2, en-029+m3, en-gb-scotland+m2]
    speeds: [140, 180]
    pitches: [50]
    val_voices: 1
    test_voices: 1
    target_length: 64
    batch_size: 4
    cache_dir: {cache}
"""

METHODS = {
    "ist_adapters": (
        """
    - class_path: IST
      init_args: {update_ratio: 0.5, interval: 2, plot: false}""",
        "    peft: {peft_type: BOTTLENECK, layout: houlsby, reduction_factor: 4}",
    ),
    "half_finetuning": (
        """
    - class_path: HalfFineTuning
      init_args: {ratio: 0.5, granularity: category}""",
        "",
    ),
    "early_pruning_lora": (
        """
    - class_path: EarlyPruning
      init_args: {estimation_steps: 2, head_ratio: 0.5, neuron_ratio: 0.25, max_loss_increase: null, plot: false}""",
        "    peft: {peft_type: LORA, r: 4, target_modules: [qkv, proj, fc1, fc2]}",
    ),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("keywords")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_the_audio_module_from_yaml(method, cache, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    callbacks, peft = METHODS[method]
    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(AUDIO).format(callbacks=callbacks.strip("\n"), peft=peft, cache=cache))
    torch.manual_seed(0)
    cli = PeftCLI(args=["fit", "--config", str(config)])
    assert cli.trainer.global_step == 6
    assert re.search(r"Final validation metrics after 6 steps: .*val/acc=", capsys.readouterr().out)
    callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, (IST, HalfFineTuning, EarlyPruning)))
    model = cli.model.model
    if isinstance(callback, IST):
        assert [step for step, _ in callback.history] == [0, 2, 4]  # importance updates every 2 steps
        assert any(name.endswith("adapters.mlp.up.weight") for name, _ in model.named_parameters())
    elif isinstance(callback, HalfFineTuning):
        blocks = [n for n, _ in cli.model.named_parameters() if ".blocks." in n]  # names as the callback sees them
        assert callback.selected is not None and 0 < len(set(callback.selected) & set(blocks)) < len(blocks)
    else:
        assert callback.plan is not None
        qkv = [
            m
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (n.endswith("attn.qkv") or n.endswith("attn.qkv.base_layer"))
        ]
        assert len(qkv) == 4 and all(m.out_features == 3 * 16 for m in qkv)  # one of the two 16-wide heads left
