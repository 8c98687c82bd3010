#!/usr/bin/env bash
# One GPU session on a CUDA machine (the H200 of the device tool): the GPU tests (default: the model
# tests), then the FB15k-237 benchmark.  Run from the repository root:  bash scripts/gpu_session.sh
#
# It reads everything from .gpu/ (ignored by git, see .gitignore); prepare it on the CPU machine,
# from the repository root (nvcc is needed there, no GPU):
#
#   mkdir -p .gpu/datasets
#   cp -r "$PIGEON_DATA/fb15k-237" .gpu/datasets/       # the benchmark's graph (docs/datasets.md says
#                                                       # what the folder holds); ~3.4 MB
#   PIGEON_CACHE_DIR=.gpu/cache python scripts/prebuild_kernels.py --jobs 8 --dims 64 \
#       --dtypes float32,bfloat16 --arch sm_90           # cubins of the GPU tests' and benchmark's layers
#                                                       # (270 kernels, ~13 MB, ~5 min with 8 jobs)
#   rm -rf .gpu/artifact_rgat && pigeon compile rgat --in-dim 8 --set heads=2 --set out_dim=3 \
#       --out .gpu/artifact_rgat --arch sm_90          # AOT artifact for test_aot_artifact_built_on_cpu_machine_runs
#   git rev-parse --short HEAD > .gpu/COMMIT            # recorded in env.txt and the benchmark JSON
#   PIGEON_CACHE_DIR=.gpu/cache python scripts/pack_cutlass_headers.py --out .gpu/cutlass_include \
#       --match "pigeon attention"                      # the CuTe headers the attention kernels include
#                                                       # (the CUTLASS GEMM libraries come prebuilt)
# Add --prune to the prebuild to drop cache entries no kernel uses any more: everything under .gpu/
# must stay under the device tool's 64 MiB carry limit (the cache is ~59 MB with the 12 CUTLASS
# libraries; leave .gpu/datasets out of carry when the dataset tests are not needed).
#
# Rebuild the artifact whenever pigeon changes: artifacts are format 2 now and load() refuses any
# other format ("rebuild it with `pigeon compile --out`").  Cache entries are keyed by source, arch,
# the full `nvcc --version` text, flags and pigeon's version, so cubins built with another nvcc, or
# before a change to the kernels, are simply not hit: the prebuild step below builds what is
# missing on the GPU machine within PREBUILD_S.  Everything under .gpu/ travels with the run
# (64 MiB in all for the device tool): call the device tool with carry [".gpu"] and the command
#   bash scripts/gpu_session.sh
# or, e.g.,  TESTS=tests/gpu BENCH=0 PYTEST_ARGS="-n 8" bash scripts/gpu_session.sh
#
# Environment (all optional):
#   OUT          where env.txt, gpu_tests.log, bench.log and the benchmark's rgnn.{json,md} go
#                (the device tool sets it; default /tmp/pigeon_out)
#   TESTS        pytest targets (default tests/gpu/test_models_gpu.py; tests/gpu runs all GPU tests)
#   PYTEST_ARGS  extra pytest arguments (e.g. "-n 8" for pytest-xdist, which the H200 image has)
#   BENCH=0      skip the benchmark;  PREBUILD_S, TESTS_S, BENCH_S: time limits of the three steps
# Set here: PIGEON_CACHE_DIR=.gpu/cache, PIGEON_DATA=.gpu/datasets, PIGEON_TEST_ARTIFACT=.gpu/artifact_rgat,
# PIGEON_COMMIT from .gpu/COMMIT, PYTHONPATH=. (the repository is not pip-installed there; the H200
# image has torch, jinja2, networkx, pytest, hypothesis and torch_geometric; TVM is not needed).
# A missing piece costs only its own step: without .gpu/datasets the benchmark fails (the GPU tests
# need no dataset), without .gpu/artifact_rgat the artifact test fails, without .gpu/cache the
# kernels are built on the GPU machine (slow: minutes of nvcc).
set -uo pipefail
OUT=${OUT:-/tmp/pigeon_out}; mkdir -p "$OUT"
# a compressed cache (cubins shrink ~10x: the 68 MB cache travels as ~6 MB, under the carry limit):
#   tar -cf - -C .gpu cache | xz -T2 -6 > .gpu/cache.tar.xz      # then carry .gpu/cache.tar.xz
[ -f .gpu/cache.tar.xz ] && [ ! -d .gpu/cache ] && python -c "import tarfile; tarfile.open('.gpu/cache.tar.xz').extractall('.gpu')"
export PIGEON_CACHE_DIR=$PWD/.gpu/cache PIGEON_DATA=$PWD/.gpu/datasets PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# the H200 image has no nvidia-cutlass wheel: kernels that include CuTe/CUTLASS build against the
# pruned copy scripts/pack_cutlass_headers.py made (or come prebuilt from the cache)
[ -d .gpu/cutlass_include ] && export PIGEON_CUTLASS_INCLUDE=$PWD/.gpu/cutlass_include
export PIGEON_COMMIT=$(cat .gpu/COMMIT 2>/dev/null || echo unknown) PIGEON_TEST_ARTIFACT=$PWD/.gpu/artifact_rgat
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1;
  python -c "import torch; print('torch', torch.__version__)"; echo "commit $PIGEON_COMMIT"; date -u; } | tee "$OUT/env.txt"
timeout ${PREBUILD_S:-120} python scripts/prebuild_kernels.py --jobs 16 --dims 64 2>&1 | tail -3
# the whole log goes to a file first: a pipe that closes early (head) would kill pytest with SIGPIPE
timeout ${TESTS_S:-300} python -m pytest -m gpu ${TESTS:-tests/gpu/test_models_gpu.py} -q -rfEs -p no:cacheprovider \
  ${PYTEST_ARGS:-} > "$OUT/gpu_tests.log" 2>&1
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.log" | tail -40
[ "${BENCH:-1}" = 1 ] && timeout ${BENCH_S:-240} python benchmarks/bench_rgnn.py --graph fb15k-237 --reverse --dim 64 \
  --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
exit 0
