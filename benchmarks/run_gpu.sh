#!/usr/bin/env bash
# Every GPU measurement of the benchmarks in one command, for a machine with one CUDA GPU:
#
#   bash benchmarks/run_gpu.sh [OUT_DIR] [PART...]   # default OUT_DIR: benchmarks/results; PART: memory,
#                                                    # activation_quantization, pruning (default: all three),
#                                                    # peers, estimate, estimate_8b (not in the default: run
#                                                    # them apart)
#
# Runs from the repository root without installing the package (PYTHONPATH=.). Needs torch with CUDA, lightning,
# timm, transformers, peft and bitsandbytes (for the LISA + int8 + AdamW8bit row). Each benchmark has its own time
# limit (330 s, 240 s, 120 s), so one that overruns still leaves the others' results. All three together can take
# up to 11.5 minutes: where one command may run at most 10 minutes, run `memory activation_quantization` in one
# call and `pruning` in another. `estimate_8b` (about 5 minutes, limit 540 s) measures the peak CUDA memory of 8 rows
# of the 8B estimate (benchmarks/estimate/llama3_8b.yaml's shape: LoRA, LISA, Half FT and full fine-tuning with and
# without the optimizer step in backward) against the estimate: estimate_rss_llama3_8b_gpu.{json,md}.
set -u
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
shift $(( $# > 0 ? 1 : 0 ))
parts=" ${*:-memory activation_quantization pruning} "
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_info.csv"
python -c "import torch, lightning, timm, transformers, peft; print(torch.__version__, lightning.__version__, \
timm.__version__, transformers.__version__, peft.__version__)" | tee -a "$out/gpu_info.csv"
python -c "import bitsandbytes" 2>/dev/null || echo "bitsandbytes missing: the AdamW8bit row will fail" >&2

want() { [[ $parts == *" $1 "* ]]; }
if want memory; then
  timeout 330 python -m benchmarks.memory --mode gpu --out-dir "$out" 2>&1 | tee "$out/memory_gpu.log"
fi
if want activation_quantization; then
  timeout 240 python -m benchmarks.activation_quantization --mode gpu --compile --output "$out" 2>&1 \
    | tee "$out/activation_quantization_gpu.log"
fi
if want peers; then  # checkpointing, save_on_cpu, BAdam, GaLore next to ours (pip install badam galore-torch)
  timeout 540 python -m benchmarks.memory --mode gpu --tag peers --out-dir "$out" --methods full lisa lora \
    full_int8 lisa_int8_adamw8bit full_checkpointing full_offload badam galore lisa_checkpointing \
    full_int8_checkpointing 2>&1 | tee "$out/memory_gpu_peers.log"
  python -m benchmarks.quantizer_overhead --rounds 5 --out-dir "$out" 2>&1 | tail -20  # host time, same machine
fi
if want estimate; then  # the estimate against the allocator peaks of memory_gpu*.json (run memory / peers first)
  for results in memory_gpu memory_gpu_peers; do
    [[ -f "$out/$results.json" ]] && cp "$out/$results.json" benchmarks/results/ 2>/dev/null
    [[ -f "benchmarks/results/$results.json" ]] && timeout 300 python -m benchmarks.estimate_check \
      --results "$results" --device cuda --out-dir "$out" 2>&1 | tail -5
  done
  timeout 120 python -c "from lightning_peft.cli import cli_main; cli_main(['estimate', '--config', \
'benchmarks/estimate/llama2_7b_lisa.yaml', '--memory', '80GiB', '--device', 'cuda'])" | tee "$out/estimate_7b.txt"
fi
if want estimate_8b; then  # every row in a fresh process: weights built on the GPU, 2 steps, max_memory_allocated
  if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    timeout 540 python -m benchmarks.estimate_rss --mode gpu --out-dir "$out" 2>&1 | tee "$out/estimate_8b_gpu.log"
  else
    echo "estimate_8b: no CUDA device visible, skipped" >&2
  fi
fi
if want pruning; then
  timeout 120 python -m benchmarks.pruning --mode gpu --out-dir "$out" 2>&1 | tee "$out/pruning_gpu.log"
fi
