"""DataModules of the user's own files: formats, splits, label names in checkpoints, errors naming file and row."""

import json

import numpy as np
import pytest
import torch
from own_data import tone, write_audio_folder, write_image_folder, write_text_csv, write_wav

from lightning_peft.data import AudioFolder, ImageFolder, TextClassificationFile, TextFiles, TweetSentiment
from lightning_peft.data.audio_features import FilterbankFeatures, resample_to_16k
from lightning_peft.data.audio_folder import read_audio

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_image_folder_uses_the_timm_data_config_and_a_val_folder(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=3)
    val = write_image_folder(tmp_path / "val", per_class=2)
    data = ImageFolder(str(train), model="vit_tiny_patch16_224", val_root=str(val), image_size=24, batch_size=2)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (6, 4)
    transform = repr(data.transform(training=False))
    assert "interpolation=bicubic" in transform and "mean=tensor([0.5000, 0.5000, 0.5000])" in transform
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 24, 24) and labels.tolist() == [0, 0]
    # the red "cat" images (channel 0) are normalised with mean/std 0.5: red well above zero, blue well below
    assert images[:, 0].mean() > 0.3 and images[:, 2].mean() < -0.5
    augmented = ImageFolder(str(train), model="vit_tiny_patch16_224", image_size=24, augment=True)
    assert "RandomResizedCrop" in repr(augmented.transform(training=True))
    assert "RandomResizedCrop" not in repr(augmented.transform(training=False))


def test_image_folder_errors_name_the_file_and_the_folder(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=2)
    (root / "cat" / "broken.png").write_bytes(b"not an image at all")
    data = ImageFolder(str(root), model="vit_tiny_patch16_224", image_size=16, val_fraction=0.5)
    data.setup("fit")
    dataset = data.train_set if any("broken" in p for p, _ in data.train_set.samples) else data.val_set
    broken = next(i for i, (path, _) in enumerate(dataset.samples) if "broken" in path)
    with pytest.raises(ValueError, match=r"broken.png' \(sample \d+, class index 0\) is not an image PIL can read"):
        dataset[broken]
    val = write_image_folder(tmp_path / "val", classes=("cat",), per_class=1)
    with pytest.raises(FileNotFoundError, match="has no folder for the class 'dog'"):
        ImageFolder(str(root), model="vit_tiny_patch16_224", val_root=str(val)).setup("fit")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFolder(str(tmp_path / "missing"), model="vit_tiny_patch16_224").setup("fit")
    with pytest.raises(ValueError, match="`model` must be a timm architecture"):
        ImageFolder(str(root), model="not_a_timm_model")


def test_image_folder_size_follows_the_models_img_size(tmp_path):
    import lightning as L

    from lightning_peft.modules import ImageClassifier

    root = write_image_folder(tmp_path / "images")
    vit = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    model = ImageClassifier("vit_tiny_patch16_224", num_classes=2, model_kwargs=vit)
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    data = ImageFolder(str(root), model="vit_tiny_patch16_224", batch_size=2, val_fraction=0.34)
    trainer.fit(model, datamodule=data)  # without `image_size` the images would be 224x224: timm refuses them
    assert data.data_config["input_size"] == (3, 32, 32) and trainer.global_step == 1
    mismatched = ImageFolder(str(root), model="vit_tiny_patch16_224", image_size=24, batch_size=2, val_fraction=0.34)
    with pytest.raises(ValueError, match=r"`image_size` is 24, but the model takes 32x32 images .*HINT: set"):
        L.Trainer(max_steps=1, logger=False, enable_checkpointing=False).fit(model, datamodule=mismatched)


def test_label_names_go_into_the_checkpoint_state(tmp_path):
    root = write_image_folder(tmp_path / "train", per_class=2)
    data = ImageFolder(str(root), model="vit_tiny_patch16_224", image_size=16, val_fraction=0.5)
    data.setup("fit")
    assert data.state_dict() == {"label_names": ["cat", "dog"]}
    data.load_state_dict({"label_names": ["cat", "dog"]})
    with pytest.raises(ValueError, match=r"trained on the classes \['dog', 'cow'\], the data now has"):
        data.load_state_dict({"label_names": ["dog", "cow"]})


def test_audio_folder_reads_flac_and_resamples_stereo_wav(tmp_path):
    root = write_audio_folder(tmp_path / "audio", per_class=3)
    data = AudioFolder(str(root), target_length=48, val_fraction=0.34, batch_size=2)
    data.setup("fit")
    assert data.label_names == ("high", "low") and (len(data.train_set), len(data.val_set)) == (4, 2)
    flac = read_audio(str(root / "high" / "0.flac"))  # 22.05 kHz -> 16 kHz
    assert flac.shape == (8000,) and np.abs(flac).max() == pytest.approx(0.5, abs=0.02)
    stereo = write_wav(tmp_path / "stereo.wav", tone(440, 0.5, 44100), 44100, channels=2)
    np.testing.assert_allclose(read_audio(str(stereo)), resample_to_16k(tone(440, 0.5, 44100), 44100), atol=1e-3)
    # the features are the AST filterbanks of the 16 kHz waveform
    expected = FilterbankFeatures(target_length=48)(read_audio(data.val_set.sources[0]))
    torch.testing.assert_close(data.val_set.features[0], torch.from_numpy(expected))
    features, labels = next(iter(data.train_dataloader()))
    assert features.shape == (2, 48, 128) and labels.dtype == torch.int64


def test_audio_folder_spec_augment_and_bad_files(tmp_path):
    root = write_audio_folder(tmp_path / "audio", per_class=2, flac=False)
    data = AudioFolder(str(root), target_length=48, val_fraction=0.5, augment=True, freq_mask=20, time_mask=20)
    data.setup("fit")
    torch.manual_seed(0)
    assert not torch.equal(data.train_set[0][0], data.train_set.features[0])
    assert torch.equal(data.val_set[0][0], data.val_set.features[0])
    (root / "low" / "bad.wav").write_bytes(b"RIFF....garbage")
    with pytest.raises(ValueError, match=r"bad.wav' could not be decoded as audio.*HINT"):
        AudioFolder(str(root), target_length=48).setup("fit")


def test_text_classification_file_csv_and_jsonl(tmp_path):
    csv = write_text_csv(tmp_path / "reviews.csv", per_class=4)
    data = TextClassificationFile(
        str(csv), text_column="review", label_column="verdict", tokenizer=MINILM, max_length=12, val_fraction=0.25
    )
    data.setup("fit")
    assert data.label_names == ("bad", "good") and (len(data.train_set), len(data.val_set)) == (6, 2)
    assert sorted(data.val_set.labels.tolist()) == [0, 1] and "dull, boring" in " ".join(data.train_set.texts)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (6, 12) and batch["labels"].dtype == torch.int64
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"t": f"text {i}", "y": i % 3}) + "\n" for i in range(9)))
    val.write_text(json.dumps({"t": "x", "y": 1}) + "\n" + json.dumps({"t": "y", "y": 7}) + "\n")
    named = TextClassificationFile(
        str(train),
        text_column="t",
        label_column="y",
        label_names=["2", "1", "0"],
        tokenizer=MINILM,
        max_length=8,
        val_file=str(train),
    )
    named.setup("fit")
    assert named.train_set.labels[:3].tolist() == [2, 1, 0]  # labels 0, 1, 2 in the order of label_names
    with pytest.raises(ValueError, match=r"val.jsonl', line 2 has the label '7', which is not one of the classes"):
        TextClassificationFile(
            str(train), val_file=str(val), text_column="t", label_column="y", tokenizer=MINILM
        ).setup("fit")


def test_text_classification_file_errors_name_file_row_and_columns(tmp_path):
    csv = write_text_csv(tmp_path / "reviews.csv", per_class=2)
    with pytest.raises(
        ValueError,
        match=r"reviews.csv', line 2 has no column `text_column`='text'; its columns are"
        r" \['review', 'verdict'\].*--data.init_args.text_column=",
    ):
        TextClassificationFile(str(csv), tokenizer=MINILM).setup("fit")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\ngood film,pos\nbad, film,neg\n")
    with pytest.raises(ValueError, match=r"ragged.csv', line 3 has 3 fields, the header 2"):
        TextClassificationFile(str(ragged), tokenizer=MINILM).setup("fit")
    binary = tmp_path / "weights.csv"
    binary.write_bytes(b"text,label\n\x00\x01\x02\xff")
    with pytest.raises(ValueError, match=r"weights.csv' is a binary file, not text \(a NUL byte at offset 11, line 2"):
        TextClassificationFile(str(binary), tokenizer=MINILM).setup("fit")
    bad_json = tmp_path / "rows.jsonl"
    bad_json.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": }\n')
    with pytest.raises(ValueError, match=r"rows.jsonl', line 2 is not valid JSON"):
        TextClassificationFile(str(bad_json), tokenizer=MINILM).setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextClassificationFile(str(tmp_path / "none.csv")).setup("fit")
    with pytest.raises(ValueError, match="`text_column` must be a column name"):
        TextClassificationFile(str(csv), text_column=False)


def test_text_files_read_jsonl_csv_and_chats(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"text": "plain document"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
        + "\n"
    )
    data = TextFiles(str(rows), block_size=4)
    assert data.read_documents() == ["plain document", "user: Hi\nassistant: Hello\n"]
    data = TextFiles(str(rows), tokenizer=MINILM, block_size=4)
    data._load_tokenizer().chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    assert data.read_documents()[1] == "<|user|>Hi<|assistant|>Hello"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"messages": [{"content": "no role"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl', line 1 has neither `text_column`='text' nor"):
        TextFiles(str(bad)).read_documents()
    with pytest.raises(ValueError, match=r"bad.jsonl', line 2: every turn of `messages` must be an object"):
        TextFiles(str(bad), text_column="body").read_documents()


def test_text_files_refuse_binary_files(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 20)
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"model.bin' is a binary file, not text.*HINT: give text files only"):
        TextFiles(str(tmp_path / "*")).read_documents()
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt' is not utf-8 text.*set `encoding`"):
        TextFiles(str(tmp_path / "latin.txt")).read_documents()
    assert TextFiles(str(tmp_path / "latin.txt"), encoding="latin-1").read_documents() == ["café"]


def test_tweet_sentiment_names_the_columns_it_found(tmp_path):
    csv = write_text_csv(tmp_path / "reviews.csv", per_class=2)
    data = TweetSentiment(csv_path=str(csv), val_size=1)
    with pytest.raises(
        ValueError,
        match=r"no column\(s\) \['text', 'sentiment'\].*columns are \['review', 'verdict'\]"
        r".*HINT: .*TextClassificationFile",
    ):
        data.read_tweets()
