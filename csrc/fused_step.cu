// One kernel per denoising step: CFG combine + every solver Combine of the step (see fused_step.h).
//
// Velocity arrives in the engine dtype (fp32/fp16/bf16); latents and solver state stay fp32, as in
// the PyTorch path (runtime/sampler.py), which is the reference this kernel is tested against.
#include "fused_step.h"

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loop covers the rest

// Everything one step needs, passed by value as a kernel parameter: a captured CUDA graph then
// holds its own copy, so the host structs may be reused or freed after the launch.
struct StepArgs {
  float* slots[FLOWBLEND_MAX_SLOTS];
  flowblend_combine ops[FLOWBLEND_MAX_OPS];
  int32_t num_ops;
  uint32_t load_mask;   // slots whose first use in the step is a read
  uint32_t store_mask;  // slots the step changes
  int32_t batch;
  float guidance;
};

__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(__half x) { return __half2float(x); }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__host__ __device__ inline T from_float(float x);
template <>
__host__ __device__ inline float from_float<float>(float x) { return x; }
template <>
__host__ __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// The whole step for element i: shared by the kernel and the host path, so both compute the same.
template <typename T>
__host__ __device__ inline void step_element(const T* velocity, T* model_input, const StepArgs& a, int64_t n,
                                             int64_t i) {
  float v = to_float(velocity[i]);
  if (a.batch == 2) {  // uncond + g * (cond - uncond), as diffusers' pipelines
    const float u = to_float(velocity[n + i]);
    v = (v - u) * a.guidance + u;
  }
  float val[FLOWBLEND_MAX_SLOTS];
  for (int s = 0; s < FLOWBLEND_MAX_SLOTS; ++s) val[s] = ((a.load_mask >> s) & 1u) ? a.slots[s][i] : 0.0f;
  val[FLOWBLEND_SLOT_VELOCITY] = v;
  for (int o = 0; o < a.num_ops; ++o) {
    const flowblend_combine& op = a.ops[o];
    float acc = op.coef[0] * val[op.source[0]];
    for (int k = 1; k < op.num_terms; ++k) acc = fmaf(op.coef[k], val[op.source[k]], acc);
    val[op.target] = acc;
  }
  for (int s = 0; s < FLOWBLEND_MAX_SLOTS; ++s)
    if ((a.store_mask >> s) & 1u) a.slots[s][i] = val[s];
  if (model_input != nullptr) {
    const T x = from_float<T>(val[FLOWBLEND_SLOT_LATENTS]);
    for (int b = 0; b < a.batch; ++b) model_input[b * n + i] = x;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fused_step_kernel(const T* __restrict__ velocity, T* __restrict__ model_input, const StepArgs a, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    step_element<T>(velocity, model_input, a, n, i);
}

// Validates the arguments and works out which slots to load and store; no CUDA calls.
int prepare(const void* velocity, int32_t batch, int32_t dtype, float guidance, float* const* slots,
            int32_t num_slots, const flowblend_combine* ops, int32_t num_ops, void* model_input, int64_t n,
            StepArgs* a) {
  if (dtype < FLOWBLEND_FP32 || dtype > FLOWBLEND_BF16) return FLOWBLEND_ERR_DTYPE;
  if (batch != 1 && batch != 2) return FLOWBLEND_ERR_BATCH;
  if (num_slots < 2 || num_slots > FLOWBLEND_MAX_SLOTS || num_ops < 0 || num_ops > FLOWBLEND_MAX_OPS || n < 0)
    return FLOWBLEND_ERR_LIMITS;
  if (velocity == nullptr || slots == nullptr || (num_ops > 0 && ops == nullptr)) return FLOWBLEND_ERR_NULL;
  uint32_t written = 0, load = 0;
  for (int o = 0; o < num_ops; ++o) {
    const flowblend_combine& op = ops[o];
    if (op.num_terms < 1 || op.num_terms > FLOWBLEND_MAX_TERMS) return FLOWBLEND_ERR_LIMITS;
    for (int k = 0; k < op.num_terms; ++k) {
      const int s = op.source[k];
      if (s < 0 || s >= num_slots) return FLOWBLEND_ERR_INDEX;
      if (s != FLOWBLEND_SLOT_VELOCITY && !((written >> s) & 1u)) load |= 1u << s;
    }
    if (op.target < 0 || op.target >= num_slots || op.target == FLOWBLEND_SLOT_VELOCITY) return FLOWBLEND_ERR_INDEX;
    written |= 1u << op.target;
    a->ops[o] = op;
  }
  if (model_input != nullptr && !(written & 1u)) load |= 1u;  // the model input copies the latents
  uint32_t store = written;
  for (int s = 0; s < FLOWBLEND_MAX_SLOTS; ++s) a->slots[s] = s < num_slots ? slots[s] : nullptr;
  if (a->slots[FLOWBLEND_SLOT_VELOCITY] != nullptr) store |= 1u << FLOWBLEND_SLOT_VELOCITY;
  for (int s = 0; s < FLOWBLEND_MAX_SLOTS; ++s)
    if ((((load | store) >> s) & 1u) && a->slots[s] == nullptr) return FLOWBLEND_ERR_NULL;
  a->num_ops = num_ops;
  a->load_mask = load;
  a->store_mask = store;
  a->batch = batch;
  a->guidance = guidance;
  return 0;
}

template <typename T>
int launch(const void* velocity, void* model_input, const StepArgs& a, int64_t n, cudaStream_t stream) {
  if (n == 0) return 0;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  fused_step_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(velocity), static_cast<T*>(model_input), a, n);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
void run_host(const void* velocity, void* model_input, const StepArgs& a, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    step_element<T>(static_cast<const T*>(velocity), static_cast<T*>(model_input), a, n, i);
}

}  // namespace

extern "C" {

int flowblend_fused_step(const void* velocity, int32_t batch, int32_t dtype, float guidance, float* const* slots,
                         int32_t num_slots, const flowblend_combine* ops, int32_t num_ops, void* model_input,
                         int64_t n, void* stream) {
  StepArgs a{};
  const int rc = prepare(velocity, batch, dtype, guidance, slots, num_slots, ops, num_ops, model_input, n, &a);
  if (rc != 0) return rc;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case FLOWBLEND_FP16: return launch<__half>(velocity, model_input, a, n, s);
    case FLOWBLEND_BF16: return launch<__nv_bfloat16>(velocity, model_input, a, n, s);
    default: return launch<float>(velocity, model_input, a, n, s);
  }
}

int flowblend_fused_step_host(const void* velocity, int32_t batch, int32_t dtype, float guidance,
                              float* const* slots, int32_t num_slots, const flowblend_combine* ops,
                              int32_t num_ops, void* model_input, int64_t n) {
  StepArgs a{};
  const int rc = prepare(velocity, batch, dtype, guidance, slots, num_slots, ops, num_ops, model_input, n, &a);
  if (rc != 0) return rc;
  switch (dtype) {
    case FLOWBLEND_FP16: run_host<__half>(velocity, model_input, a, n); break;
    case FLOWBLEND_BF16: run_host<__nv_bfloat16>(velocity, model_input, a, n); break;
    default: run_host<float>(velocity, model_input, a, n); break;
  }
  return 0;
}

const char* flowblend_error_string(int code) {
  switch (code) {
    case 0: return "success";
    case FLOWBLEND_ERR_DTYPE: return "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)";
    case FLOWBLEND_ERR_BATCH: return "batch must be 1 (no CFG) or 2 (CFG)";
    case FLOWBLEND_ERR_LIMITS: return "too many slots, ops or terms, or a negative element count";
    case FLOWBLEND_ERR_INDEX: return "a Combine names a slot out of range, or targets the velocity slot";
    case FLOWBLEND_ERR_NULL: return "a buffer the step reads or writes is NULL";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown flowblend error";
  }
}

int flowblend_abi_version(void) { return FLOWBLEND_ABI_VERSION; }

}  // extern "C"
