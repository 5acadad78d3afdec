import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import changed, snapshot, trainer_kwargs
from torch.utils.data import DataLoader

from lightning_peft.callbacks import LISA
from lightning_peft.data import TextFiles
from lightning_peft.layout import find_blocks
from lightning_peft.modules import CausalLM

LLAMA = {
    "model_type": "llama",
    "vocab_size": 257,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _loader(n: int = 8) -> DataLoader:
    ids = torch.randint(0, 257, (n, 32), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids], 4)


def test_lisa_trains_only_the_sampled_layers_of_a_llama(tmp_path):
    pl.seed_everything(0)
    module = CausalLM(config=LLAMA)
    stack = find_blocks(module)
    assert stack.path == "model.model.layers" and len(stack) == 4
    before = snapshot(module)
    lisa = LISA(n_layers=2, interval=100)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=3, callbacks=[lisa]))
    trainer.fit(module, train_dataloaders=_loader())
    updated = changed(before, module)
    assert {stack.block_of(name) for name in updated} - {None} == set(lisa.sampled)
    assert {"model.model.embed_tokens.weight", "model.lm_head.weight", "model.model.norm.weight"} <= updated


def test_validation_logs_perplexity_of_the_token_weighted_loss(tmp_path):
    module = CausalLM(config=LLAMA)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, limit_train_batches=1))
    loader = _loader()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    module.eval()
    with torch.no_grad():
        losses = [module.compute_loss(batch) for batch in loader]
    expected = math.exp(sum(float(loss) for loss in losses) / len(losses))  # equal-sized batches
    assert float(trainer.callback_metrics["val/ppl"]) == pytest.approx(expected, rel=1e-4)
    assert 100 < expected < 1000  # near-uniform over 257 tokens at the start


def test_loss_falls_on_packed_text(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("the cat sat on the mat. " * 40)
    data = TextFiles(str(tmp_path / "*.txt"), block_size=32, batch_size=8, val_fraction=0.25)
    module = CausalLM(config=LLAMA, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=3, limit_val_batches=2))
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["val/ppl"]) < 20  # from ~257: the repeated sentence is learned


def test_from_a_saved_folder_and_with_lora(tmp_path):
    CausalLM(config=LLAMA).model.save_pretrained(tmp_path / "llama")
    module = CausalLM(str(tmp_path / "llama"), peft={"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]})
    assert module.model.training
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert module(torch.randint(0, 257, (1, 8))).shape == (1, 8, 257)


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="exactly one of `model`"):
        CausalLM()
    with pytest.raises(ValueError, match="`config` does not describe"):
        CausalLM(config={"model_type": "not-a-model"})
    with pytest.raises(FileNotFoundError, match=r"looks like a local folder, but .*missing' does not exist"):
        CausalLM(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- the chunked loss

GPT2 = {"model_type": "gpt2", "vocab_size": 257, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}


def _pair(config, chunk, **kwargs):
    """The same network twice: with the model's own loss and with the chunked one."""
    torch.manual_seed(0)
    plain = CausalLM(config=config, **kwargs).eval()  # eval: no dropout, both paths see the same numbers
    chunked = CausalLM(config=config, loss_chunk_size=chunk, **kwargs).eval()
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def _padded_batch(n=2, t=16):
    ids = torch.randint(0, 257, (n, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding of the second row
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt without targets
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("config", "chunk"), [(LLAMA, 7), (GPT2, 5), (LLAMA, 1000)], ids=["llama", "gpt2-tied", "one"])
def test_chunked_loss_gives_the_same_loss_and_gradients(config, chunk):
    plain, chunked = _pair(config, chunk)
    if config is GPT2:
        assert chunked.model.lm_head.weight is chunked.model.transformer.wte.weight  # tied
    batch = _padded_batch()
    loss, grads = _loss_and_grads(plain, batch)
    chunked_loss, chunked_grads = _loss_and_grads(chunked, batch)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == chunked_grads.keys() and len(grads) == len(list(plain.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_with_lora_on_the_head_and_under_bf16_autocast():
    peft = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "lm_head"], "init_lora_weights": False}
    plain, chunked = _pair(LLAMA, 6, peft=peft)
    batch = _padded_batch()
    loss, grads = _loss_and_grads(plain, batch)
    chunked_loss, chunked_grads = _loss_and_grads(chunked, batch)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=1e-6)
    assert any("lm_head.lora_A" in n for n in grads) and grads.keys() == chunked_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(plain, batch)
        chunked_loss, chunked_grads = _loss_and_grads(chunked, batch)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-2, atol=1e-2)  # bf16 matmuls in both, float32 softmax
    for name, grad in grads.items():
        cosine = torch.nn.functional.cosine_similarity(chunked_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def _saved_bytes(module, batch):
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module.compute_loss(batch)
    loss.backward()
    return sum(sizes)


def test_chunked_loss_saves_no_full_logits():
    plain, chunked = _pair(LLAMA, 8)
    batch = {"input_ids": torch.randint(0, 257, (4, 32)), "labels": torch.randint(0, 257, (4, 32))}
    logits_bytes = 4 * 32 * 257 * 4  # float32 (tokens x vocab)
    saved, chunked_saved = _saved_bytes(plain, batch), _saved_bytes(chunked, batch)
    # the model's own loss keeps the logits (their float32 copy and log-softmax); the chunked one none of them
    assert saved - chunked_saved >= logits_bytes


class _Grads(pl.Callback):
    def __init__(self):
        self.grads, self.losses = [], []

    def on_after_backward(self, trainer, pl_module):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_chunked_loss_under_activation_quantization(tmp_path):
    from lightning_peft.callbacks import ActivationQuantization

    runs = []
    for chunk in (None, 8):
        pl.seed_everything(0)
        module = CausalLM(config={**LLAMA, "hidden_dropout": 0.0}, loss_chunk_size=chunk)
        quantization, grads = ActivationQuantization(min_numel=256), _Grads()
        trainer = pl.Trainer(**trainer_kwargs(tmp_path / str(chunk), max_steps=2, callbacks=[quantization, grads]))
        trainer.fit(module, train_dataloaders=_loader())
        assert quantization.last_stats.num_quantized > 0
        runs.append(grads)
    plain, chunked = runs
    assert chunked.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)  # quantization changes backward only
    for name, grad in plain.grads[0].items():
        got = chunked.grads[0][name]
        assert torch.isfinite(got).all(), name
        assert torch.nn.functional.cosine_similarity(got.flatten(), grad.flatten(), dim=0) > 0.98, name


def test_loss_chunk_size_is_checked():
    with pytest.raises(ValueError, match=r"`loss_chunk_size` must be None or an integer >= 0.*got -1.*HINT"):
        CausalLM(config=LLAMA, loss_chunk_size=-1)
    assert CausalLM(config=LLAMA, loss_chunk_size=0).loss_chunk_size is None  # 0 means off
    gemma2 = {
        "model_type": "gemma2",
        "vocab_size": 257,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM transforms its logits.*final_logit_softcapping.*HINT"):
        CausalLM(config=gemma2, loss_chunk_size=16)
    prompt = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}
    with pytest.raises(ValueError, match=r"prompt-learning peft adapter.*HINT: set `loss_chunk_size: null`"):
        CausalLM(config=LLAMA, peft=prompt, loss_chunk_size=16)
