#!/usr/bin/env bash
# Compile-check, with nvcc, the CUDA files that the patch series changes or adds (patches/0004:
# NF4; patches/0005: the fused latent attention, ggml_ops/ggml-cuda/lowrank-attn.cu).
#
#   bash scripts/check_cuda.sh PATCHED_LLAMA_SRC
#
# PATCHED_LLAMA_SRC is a llama.cpp tree with patches/series applied and ggml_ops/ added, e.g.
#   python -c 'from asvd2gguf import llamacpp; print(llamacpp.patched_source())'
# Each changed .cu file below is compiled alone to an object (-c), as the CUDA build would compile
# it (-arch=sm_${CUDA_ARCH:-90} -std=c++17 -use_fast_math -extended-lambda, the build's defines),
# without building the rest of the CUDA backend (about an hour on 2 cores) and without linking:
# no GPU and no cuBLAS library are needed. The headers the files include (common.cuh,
# dequantize.cuh, vecdotq.cuh, ggml-common.h) are compiled with them. Then the objects are
# checked for the NF4 kernels (their names appear in the host symbols).
#
# nvcc: $NVCC, else nvcc on PATH, else /usr/local/cuda*/bin/nvcc, else the PyPI wheels
# nvidia-cuda-nvcc + -runtime + -cccl (CUDA 13, about 330 MB) installed into the cache with
# pip --target (CHECK_CUDA_WHEELS_ONLY=1 forces this path, to test it where nvcc exists).
# cuBLAS headers: the real cublas_v2.h when the toolkit or $CUBLAS_INCLUDE has it, else a
# minimal stub with only the declarations ggml-cuda uses (compiling needs no more).
# Only when no nvcc can be had at all it prints "SKIP: ..." and exits 0.
# A passing check is remembered (keyed by the sources, flags and nvcc version) under
# ~/.cache/asvd2gguf/cuda-check, so a rerun with nothing changed takes no time.
set -euo pipefail

FILES=(
  ggml/src/ggml-cuda/convert.cu      # NF4 -> f16/f32/bf16 (contiguous and not), for cuBLAS
  ggml/src/ggml-cuda/getrows.cu      # GET_ROWS
  ggml/src/ggml-cuda/mmvq.cu         # mat-vec with q8_1 activations (vec_dot_nf4_q8_1)
  ggml/src/ggml-cuda/ggml-cuda.cu    # supports_op, GGML_OP_LOWRANK_ATTN dispatch
  ggml/src/ggml-cuda/lowrank-attn.cu # GGML_OP_LOWRANK_ATTN (from ggml_ops/ggml-cuda)
)
# file: a string that must appear in `nm -C` of its object ("" = no symbol check)
declare -A SYMBOL=(
  [ggml/src/ggml-cuda/convert.cu]="dequantize_nf4"
  [ggml/src/ggml-cuda/getrows.cu]="dequantize_nf4"
  [ggml/src/ggml-cuda/mmvq.cu]="(ggml_type)NF4_ID"  # NF4_ID: GGML_TYPE_NF4 as the tree's ggml.h numbers it
  [ggml/src/ggml-cuda/ggml-cuda.cu]="ggml_cuda_op_lowrank_attn"
  [ggml/src/ggml-cuda/lowrank-attn.cu]="lowrank_attn_partial"
)

SRC=${1:?usage: check_cuda.sh PATCHED_LLAMA_SRC}
SRC=$(cd "$SRC" && pwd)
NF4_ID=$(sed -n 's/^ *GGML_TYPE_NF4 *= *\([0-9]*\),.*/\1/p' "$SRC/ggml/include/ggml.h")
[ -n "$NF4_ID" ] || { echo "FAIL: no GGML_TYPE_NF4 in $SRC/ggml/include/ggml.h (patch 0004 not applied?)"; exit 1; }
SYMBOL[ggml/src/ggml-cuda/mmvq.cu]="(ggml_type)$NF4_ID"
ARCH=${CUDA_ARCH:-90}
CACHE=${ASVD2GGUF_CACHE:-$HOME/.cache/asvd2gguf}
for f in "${FILES[@]}"; do
  [ -f "$SRC/$f" ] || { echo "FAIL: $SRC/$f does not exist (not a llama.cpp tree?)"; exit 1; }
done

WHEELS="$CACHE/cuda-wheels"

find_nvcc() {
  local c
  if [ -z "${CHECK_CUDA_WHEELS_ONLY:-}" ]; then  # set it to test the wheel fallback on a machine with nvcc
    if [ -n "${NVCC:-}" ] && [ -x "${NVCC}" ]; then echo "$NVCC"; return 0; fi
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return 0; fi
    for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
      if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
  fi
  if [ -f "$WHEELS/.asvd2gguf-complete" ]; then
    for c in "$WHEELS"/nvidia/cu*/bin/nvcc; do
      if [ -x "$c" ]; then echo "$c"; return 0; fi
    done
  fi
  return 1
}

NVCC_BIN=$(find_nvcc || true)
if [ -z "$NVCC_BIN" ]; then
  # the CUDA 13 wheels hold a toolkit tree (nvidia/cu13/{bin/nvcc,nvvm,include}); the
  # nvidia-cuda-nvcc-cu12 wheel has only ptxas. CCCL (nv/target, cuda/std) is its own wheel.
  echo "nvcc not found; trying the nvidia-cuda-nvcc / -runtime / -cccl wheels from PyPI"
  PY=${PYTHON:-python3}
  if "$PY" -m pip install -q --disable-pip-version-check --upgrade --target "$WHEELS" \
      nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl >/dev/null 2>&1; then
    touch "$WHEELS/.asvd2gguf-complete"
    NVCC_BIN=$(find_nvcc || true)
  fi
fi
if [ -z "$NVCC_BIN" ]; then
  echo "SKIP: no nvcc (none on PATH or in /usr/local/cuda*, and the PyPI nvcc wheels could not be installed)"
  exit 0
fi

# include folders of a wheel-installed toolkit
EXTRA_INC=()
case "$NVCC_BIN" in
  "$WHEELS"/*)
    for d in "$WHEELS"/nvidia/*/include "$WHEELS"/nvidia/*/include/cccl; do
      if [ -d "$d" ]; then EXTRA_INC+=(-I "$d"); fi
    done ;;
esac

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# cuBLAS: real headers when there are some, else the stub
CUBLAS_INC=""
for d in "${CUBLAS_INCLUDE:-}" "$(dirname "$NVCC_BIN")/../include" "$WHEELS"/nvidia/cu*/include; do
  if [ -n "$d" ] && [ -f "$d/cublas_v2.h" ]; then CUBLAS_INC=$d; break; fi
done
if [ -z "$CUBLAS_INC" ]; then
  CUBLAS_INC="$TMP/cublas-stub"
  mkdir -p "$CUBLAS_INC"
  cat > "$CUBLAS_INC/cublas_v2.h" <<'EOF'
// Minimal cuBLAS declarations for compile-only checks of ggml-cuda (no library, never linked).
#pragma once
#include <cuda_runtime.h>
#include <library_types.h>
#define CUBLAS_VER_MAJOR 12
#define CUBLAS_VER_MINOR 0
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1, CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_ARCH_MISMATCH = 8, CUBLAS_STATUS_MAPPING_ERROR = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13, CUBLAS_STATUS_INTERNAL_ERROR = 14, CUBLAS_STATUS_NOT_SUPPORTED = 15,
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_SIDE_LEFT = 0, CUBLAS_SIDE_RIGHT = 1 } cublasSideMode_t;
typedef enum { CUBLAS_FILL_MODE_LOWER = 0, CUBLAS_FILL_MODE_UPPER = 1 } cublasFillMode_t;
typedef enum { CUBLAS_DIAG_NON_UNIT = 0, CUBLAS_DIAG_UNIT = 1 } cublasDiagType_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TENSOR_OP_MATH = 1, CUBLAS_TF32_TENSOR_OP_MATH = 3 } cublasMath_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 } cublasGemmAlgo_t;
typedef enum { CUBLAS_COMPUTE_16F = 64, CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 } cublasComputeType_t;
struct cublasContext;
typedef struct cublasContext * cublasHandle_t;
#ifdef __cplusplus
extern "C" {
#endif
cublasStatus_t cublasCreate(cublasHandle_t * handle);
cublasStatus_t cublasDestroy(cublasHandle_t handle);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void * workspace, size_t size);
cublasStatus_t cublasLoggerConfigure(int logIsOn, int logToStdOut, int logToStdErr, const char * logFileName);
const char * cublasGetStatusString(cublasStatus_t status);
cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
    int m, int n, int k, const void * alpha, const void * A, cudaDataType Atype, int lda,
    const void * B, cudaDataType Btype, int ldb, const void * beta, void * C, cudaDataType Ctype, int ldc,
    cublasComputeType_t computeType, cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
    int m, int n, int k, const void * alpha, const void * const Aarray[], cudaDataType Atype, int lda,
    const void * const Barray[], cudaDataType Btype, int ldb, const void * beta, void * const Carray[],
    cudaDataType Ctype, int ldc, int batchCount, cublasComputeType_t computeType, cublasGemmAlgo_t algo);
cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
    int m, int n, int k, const void * alpha, const void * A, cudaDataType Atype, int lda, long long int strideA,
    const void * B, cudaDataType Btype, int ldb, long long int strideB, const void * beta, void * C,
    cudaDataType Ctype, int ldc, long long int strideC, int batchCount, cublasComputeType_t computeType,
    cublasGemmAlgo_t algo);
cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
    int m, int n, int k, const float * alpha, const float * A, int lda, const float * B, int ldb,
    const float * beta, float * C, int ldc);
cublasStatus_t cublasSgemmBatched(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
    int m, int n, int k, const float * alpha, const float * const Aarray[], int lda,
    const float * const Barray[], int ldb, const float * beta, float * const Carray[], int ldc, int batchCount);
cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
    int m, int n, int k, const float * alpha, const float * A, int lda, long long int strideA,
    const float * B, int ldb, long long int strideB, const float * beta, float * C, int ldc,
    long long int strideC, int batchCount);
cublasStatus_t cublasStrsmBatched(cublasHandle_t handle, cublasSideMode_t side, cublasFillMode_t uplo,
    cublasOperation_t trans, cublasDiagType_t diag, int m, int n, const float * alpha,
    const float * const A[], int lda, float * const B[], int ldb, int batchCount);
#ifdef __cplusplus
}
#endif
EOF
  CUBLAS_KIND="stub"
else
  CUBLAS_KIND="$CUBLAS_INC"
fi

FLAGS=(-c -std=c++17 -O3 "-arch=sm_${ARCH}" -use_fast_math -extended-lambda
       -DNDEBUG -DGGML_SCHED_MAX_COPIES=4 -DGGML_CUDA_USE_GRAPHS -DGGML_BACKEND_BUILD -DGGML_BACKEND_SHARED
       -DGGML_SHARED -D_GNU_SOURCE -D_XOPEN_SOURCE=600 -Xcompiler -fPIC
       -I "$SRC/ggml/include" -I "$SRC/ggml/src" -I "$SRC/ggml/src/ggml-cuda" -I "$CUBLAS_INC" "${EXTRA_INC[@]}")

NVCC_VERSION=$("$NVCC_BIN" --version | tail -n 2 | tr '\n' ' ')
echo "nvcc: $NVCC_BIN ($NVCC_VERSION)"
echo "cuBLAS headers: $CUBLAS_KIND"

# cache key: nvcc version, flags, the stub, and every header/source the files can include
FLAGS_FOR_KEY=("${FLAGS[@]/#$SRC/SRC}")
FLAGS_FOR_KEY=("${FLAGS_FOR_KEY[@]/#$TMP/TMP}")
KEY=$( { echo "$NVCC_VERSION"; printf '%s\n' "${FILES[@]}" "${FLAGS_FOR_KEY[@]}";
         cat "$CUBLAS_INC/cublas_v2.h";
         cd "$SRC" && find ggml/include ggml/src/ggml-common.h ggml/src/ggml-impl.h ggml/src/ggml-cuda \
              -maxdepth 2 -type f \( -name '*.h' -o -name '*.cuh' -o -name '*.cu' \) -print0 | sort -z | xargs -0 cat;
       } | sha256sum | cut -c1-16)
STAMP="$CACHE/cuda-check/$KEY.ok"
if [ -f "$STAMP" ]; then
  sed 's/^/cached: /' "$STAMP"
  echo "CUDA check OK (cached, key $KEY)"
  exit 0
fi

fail=0
: > "$TMP/report"
for f in "${FILES[@]}"; do
  obj="$TMP/$(basename "$f").o"
  t0=$(date +%s)
  if "$NVCC_BIN" "${FLAGS[@]}" "$SRC/$f" -o "$obj" > "$TMP/log" 2>&1; then
    line="OK   $f ($(( $(date +%s) - t0 )) s, sm_${ARCH})"
    sym=${SYMBOL[$f]}
    if [ -n "$sym" ]; then
      n=$(nm -C "$obj" 2>/dev/null | grep -cF "$sym" || true)
      if [ "$n" -gt 0 ]; then
        line="$line; $n symbols with '$sym'"
      else
        line="FAIL $f compiled but has no symbol with '$sym'"; fail=1
      fi
    fi
    echo "$line" | tee -a "$TMP/report"
  else
    echo "FAIL $f"
    grep -E "error|Error" "$TMP/log" | head -n 20 || tail -n 20 "$TMP/log"
    fail=1
  fi
done
if [ "$fail" -ne 0 ]; then
  echo "CUDA check FAILED"
  exit 1
fi
mkdir -p "$(dirname "$STAMP")"
cp "$TMP/report" "$STAMP"
echo "CUDA check OK"
