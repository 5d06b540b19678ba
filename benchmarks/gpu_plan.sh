#!/usr/bin/env bash
# The GPU plan, run on a lent multi-GPU H100 host (see README "Benchmarks"): correctness first,
# then the benchmarks. Usage: bash benchmarks/gpu_plan.sh OUTDIR [STEP ...]
# Steps: env gputests doctor attention sp2 sp4 dit   (default: these; more below: sp4usp, sp4full, step4, fp8,
# caching, gen, gen4fast, ...). Each step logs to OUTDIR/<step>.log
# and a failing step does not stop the others. Expects the wheelhouse installed in /tmp/site, and
# .commit (carried; written by the sender: git rev-parse HEAD, -dirty if needed) since the copy has no .git.
set -u
out=${1:?usage: gpu_plan.sh OUTDIR [STEP ...]}; shift
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# the copy's .git (if any) may be stale: git must not answer, so the benches record the .commit stamp
export GIT_DIR=/nonexistent-ditfleet-git
steps=${*:-env gputests doctor attention sp2 sp4 dit}
ngpu=$(nvidia-smi -L | wc -l)
SP_FAST=(--no-diagnostics --yunchang-attn-types torch_cudnn --iters 20 --rounds 3 --transports nccl copy_engine)
step() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS
  ( timeout "${STEP_TIMEOUT:-900}" "$@" ) >"$out/$name.log" 2>&1; local rc=$?; echo "=== $name rc=$rc $((SECONDS - t0))s"; tail -n 25 "$out/$name.log"; }
for s in $steps; do case $s in
  env) step env bash -c 'nvidia-smi; python3 -c "import torch,sys;print(sys.version, torch.__version__, torch.version.cuda, torch.cuda.device_count())"; python3 -m pip list 2>/dev/null | grep -iE "flash|cutlass|yunchang|ray|triton|quack|tvm"';;
  gputests) step gputests python3 -m pytest -q -x tests/gpu -p no:cacheprovider;;
  doctor) step doctor python3 -m ditfleet doctor --device cuda;;
  attention) step attention python3 -m ditfleet bench attention --kernels sdpa_cudnn sdpa_flash sdpa_efficient fa4 sage_triton --out "$out/attention_h100.json";;
  # every mode on both transports, 20 calls per entry, 3 interleaved rounds (sp4full adds the diagnostics)
  sp2) [ "$ngpu" -ge 2 ] && step sp2 torchrun --nproc-per-node 2 -m ditfleet bench sp-attention --modes ulysses ring \
         --kernels sdpa_cudnn "${SP_FAST[@]}" --out "$out/sp_attention_h100_2gpu.json";;
  sp4) [ "$ngpu" -ge 4 ] && step sp4 torchrun --nproc-per-node 4 -m ditfleet bench sp-attention --modes ulysses ring \
         "${SP_FAST[@]}" --out "$out/sp_attention_h100_4gpu.json";;
  sp4usp) [ "$ngpu" -ge 4 ] && step sp4usp torchrun --nproc-per-node 4 -m ditfleet bench sp-attention --modes usp \
         --kernels sdpa_cudnn "${SP_FAST[@]}" --out "$out/sp_attention_h100_4gpu_usp.json";;
  sp4full) [ "$ngpu" -ge 4 ] && step sp4full torchrun --nproc-per-node 4 -m ditfleet bench sp-attention --out "$out/sp_attention_h100_4gpu_full.json";;
  wangpu) step wangpu python3 -m pytest -q -x tests/gpu/test_wan_gpu.py -p no:cacheprovider;;
  radialtests) step radialtests python3 -m pytest -q -x tests/gpu/test_radial_gpu.py tests/gpu/test_wan_gpu.py -p no:cacheprovider;;
  radial) step radial python3 -m ditfleet bench radial --out "$out/radial_h100.json";;
  radial4) [ "$ngpu" -ge 4 ] && step radial4 torchrun --nproc-per-node 4 -m ditfleet bench radial --sp ring usp --out "$out/radial_sp_h100_4gpu.json";;
  engine) step engine env DITFLEET_GPU_WORLDS=2,4 DITFLEET_MODEL_13B=/tmp/wan13b DITFLEET_RESULTS_DIR="$out" python3 -m pytest -q -x tests/gpu/test_engine_gpu.py -p no:cacheprovider;;
  sparge) step sparge python3 -m ditfleet bench sparge --out "$out/sparge_h100.json";;
  sptests) [ "$ngpu" -ge 2 ] && step sptests python3 -m pytest -q -x tests/gpu/test_sp_gpu.py -p no:cacheprovider;;
  spargetests) step spargetests python3 -m pytest -q -x tests/gpu/test_sparge_gpu.py -p no:cacheprovider;;
  sparge4) [ "$ngpu" -ge 4 ] && step sparge4 torchrun --nproc-per-node 4 -m ditfleet bench sparge --sp ulysses ring usp --out "$out/sparge_sp_h100_4gpu.json";;
  step4) [ "$ngpu" -ge 4 ] && step step4 torchrun --nproc-per-node 4 -m ditfleet bench step --model t2v-14b --video 720p81 \
         --attn-types flash_attn4 radial_attn --out "$out/step_h100_4gpu_t2v-14b_720p81.json";;
  dit) step dit python3 -m ditfleet bench dit --diffusers --out "$out/dit_h100.json";;
  # issue 19 / 20 runs (one GPU): FP8 vs bf16 forward, Tea vs none on a random 1.3B, whole requests
  fp8) step fp8 python3 -m ditfleet bench dit --attn-types flash_attn4 sage_attn2 --quant none,fp8 --iters 2 \
         --warmup 1 --block-warmup 1 --block-iters 3 --out "$out/dit_fp8.json";;
  caching) step caching env ATTN=flash_attn4 WORK=/dev/shm/ditfleet-caching bash benchmarks/gpu_caching.sh "$out/caching";;
  gen) step gen python3 benchmarks/gen_runs.py "$out" a14b;;
  gen4fast) step gen4fast python3 benchmarks/gen_runs.py "$out" lora4 --self-attn sage_attn2 --set dit_quantized=true \
         --requests 2;;
  *) echo "unknown step $s";;
esac; done
