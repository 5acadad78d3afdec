"""`lightning-peft estimate` on every shipped config and on the 7B Llama config: each prints its table.

The own-data configs read `data/...` relative to the working directory: the test writes small files of those kinds
there first, as a user's folder would hold them.
"""

from pathlib import Path

import pytest
from own_data import write_audio_folder, write_image_folder

from lightning_peft.cli.estimate import estimate_main as main

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "benchmarks" / "estimate" / "llama2_7b_lisa.yaml"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_estimate_runs_on_the_config(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "data" / "images")
    write_audio_folder(tmp_path / "data" / "audio")
    rows = [f"a {'wonderful' if i % 2 else 'dull'} film number {i},{'good' if i % 2 else 'bad'}" for i in range(20)]
    (tmp_path / "data" / "texts.csv").write_text("text,label\n" + "\n".join(rows) + "\n")  # the config's columns
    main(["--config", str(config), "--memory", "80GiB"])
    out = capsys.readouterr().out
    assert "Full FT" in out and "LISA" in out and "Fits in 80.0GiB:" in out, out
    assert "(estimated in " in out
