"""Run every config in configs/ as a user would and record wall time, peak memory and the final metrics.

    python -m benchmarks.configs                 # all configs
    python -m benchmarks.configs quickstart      # the configs whose file name contains "quickstart"

Each config runs as ``lightning-peft fit --config FILE`` in a fresh process (in a temporary folder, so logs do not
land in the repository). Peak memory is the child's maximum resident set size; the final metrics are the line the
CLI prints after fit. Results: ``benchmarks/results/configs_cpu.json`` and ``.md`` (the table of configs/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FINAL = re.compile(r"Final validation metrics after (\d+) steps: (.*)")


def run_config(config: Path) -> dict:
    exe = shutil.which("lightning-peft")
    if exe is None:
        sys.exit("`lightning-peft` is not on PATH. HINT: pip install -e '.[dev]'")
    command = [exe, "fit", "--config", str(config), "--trainer.enable_progress_bar=false"]
    with tempfile.TemporaryDirectory() as workdir:
        rss_file = Path(workdir) / "maxrss"
        gnu_time = shutil.which("time", path="/usr/bin")
        if gnu_time:  # the child's own peak RSS (KiB), not the largest child of this process so far
            command = [gnu_time, "-f", "%M", "-o", str(rss_file), *command]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak_kib = int(rss_file.read_text().split()[-1]) if rss_file.exists() else None
    if result.returncode != 0:
        raise RuntimeError(f"{config.name} failed:\n{result.stderr[-4000:]}")
    found = FINAL.search(result.stdout)
    metrics = {}
    if found:
        metrics = {k: float(v) for k, v in (item.split("=") for item in found.group(2).split(", "))}
    return {
        "config": config.name,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1) if peak_kib else None,
        "steps": int(found.group(1)) if found else None,
        "metrics": metrics,
    }


def to_markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"Measured on {env['machine']} ({env['cpus']} CPU threads), torch {env['torch']}, {env['date']}.",
        "",
        "| config | steps | wall time | peak memory (RSS) | final validation |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["metrics"].items()))
        rss = f"{row['peak_rss_mib'] / 1024:.2f} GiB" if row["peak_rss_mib"] else "n/a"
        lines.append(f"| `{row['config']}` | {row['steps']} | {row['seconds']:.0f} s | {rss} | {metrics} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("filter", nargs="?", default="", help="only configs whose file name contains this")
    args = parser.parse_args()
    # The own-data configs read the user's folders / files, which a benchmark machine does not have.
    own_data = {"image_folder_vit_lisa.yaml", "audio_folder_ast_lisa.yaml", "csv_text_classifier_lisa.yaml"}
    configs = sorted(p for p in (ROOT / "configs").glob("*.yaml") if args.filter in p.name and p.name not in own_data)
    rows = []
    for config in configs:
        print(f"running {config.name} ...", flush=True)
        rows.append(run_config(config))
        print(json.dumps(rows[-1]), flush=True)
    env = {
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "configs_cpu.json"
    previous = json.loads(out.read_text())["runs"] if out.exists() else []
    merged = {r["config"]: r for r in previous}
    merged.update({r["config"]: r for r in rows})
    runs = [merged[k] for k in sorted(merged)]
    out.write_text(json.dumps({"env": env, "runs": runs}, indent=2) + "\n")
    (RESULTS / "configs_cpu.md").write_text(to_markdown(runs, env))
    print(to_markdown(runs, env))


if __name__ == "__main__":
    main()
