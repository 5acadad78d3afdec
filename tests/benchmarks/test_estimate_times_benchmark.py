import json

from benchmarks import estimate_times
from lightning_peft.estimate import VARIANTS


def test_times_one_config_and_writes_the_tables(tmp_path):
    estimate_times.main(["--filter", "vit_digits_lisa.yaml", "--out-dir", str(tmp_path)])
    results = json.loads((tmp_path / "estimate_times_cpu.json").read_text())
    (row,) = results["rows"]
    rows = 6 * len(VARIANTS)  # full, LoRA, LISA and its two lighter choices, Half FT, each with every variant
    assert row["config"] == "configs/vit_digits_lisa.yaml" and row["rows"] == rows
    assert 0 < row["estimate_seconds"] < row["wall_seconds"]
    table = (tmp_path / "estimate_times_cpu.md").read_text()
    assert f"| `configs/vit_digits_lisa.yaml` | {rows} |" in table and "Target: under 60 s" in table


def test_own_data_configs_find_their_files(tmp_path):
    estimate_times._write_own_data(tmp_path / "data")
    assert len(list((tmp_path / "data" / "images").rglob("*.png"))) == 8
    assert len(list((tmp_path / "data" / "audio").rglob("*.wav"))) == 8
    assert (tmp_path / "data" / "texts.csv").read_text().startswith("text,label\n")
