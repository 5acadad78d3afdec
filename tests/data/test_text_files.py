import pytest
import torch

from lightning_peft.data import TextFiles
from lightning_peft.data.text_files import resolve_text_files


def _corpus(tmp_path, n=6):
    for i in range(n):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i}: " + "abcdefghij" * (5 + i))
    return str(tmp_path / "*.txt")


def test_bytes_are_packed_into_blocks_split_by_document(tmp_path):
    data = TextFiles(_corpus(tmp_path), block_size=16, batch_size=2, val_fraction=0.2)
    data.setup("fit")
    assert data.vocab_size == 257
    documents = data.read_documents()
    order = torch.randperm(6, generator=torch.Generator().manual_seed(42)).tolist()
    val_ids = data.encode([documents[order[0]]])
    train_ids = data.encode([documents[i] for i in order[1:]])
    assert len(data.val_set) == len(val_ids) // 16 and len(data.train_set) == len(train_ids) // 16
    assert data.val_set.blocks.flatten().tolist() == val_ids[: len(data.val_set) * 16]
    assert bytes(train_ids[:11]).decode() == documents[order[1]][:11] and 256 in train_ids
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].all()


def test_csv_column_and_package_files(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("label,text\n" + "".join(f"{i},row number {i} with some text\n" for i in range(20)))
    data = TextFiles(str(path), text_column="text", block_size=8, val_fraction=0.25)
    assert len(data.read_documents()) == 20 and data.read_documents()[3] == "row number 3 with some text"
    data.setup("fit")
    assert len(data.train_set) > len(data.val_set) > 0
    with pytest.raises(ValueError, match=r"line 2 has neither `text_column`='body'.*fields are \['label', 'text'\]"):
        TextFiles(str(path), text_column="body").read_documents()
    assert any(p.endswith("json/__init__.py") for p in resolve_text_files(["package:json/*.py"]))


def test_hf_tokenizer_ends_documents_with_its_sep_or_eos(tmp_path):
    data = TextFiles(_corpus(tmp_path), tokenizer="sentence-transformers/all-MiniLM-L6-v2", block_size=8)
    ids = data.encode(["hello world", "again"])
    assert ids.count(102) == 2 and data.vocab_size == 30522  # BERT's [SEP]


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        TextFiles(str(tmp_path / "none*.txt"))
    with pytest.raises(FileNotFoundError, match="package 'not_a_package_xyz'"):
        TextFiles("package:not_a_package_xyz/*.txt")
    with pytest.raises(ValueError, match="`block_size` must be an integer >= 1"):
        TextFiles(_corpus(tmp_path), block_size=0)
    data = TextFiles(_corpus(tmp_path), block_size=100000)
    with pytest.raises(ValueError, match="fewer than one block"):
        data.setup("fit")
