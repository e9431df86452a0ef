/* flowblend fused step: classifier-free-guidance combine + solver update in one elementwise pass.
 *
 * The runtime's solvers (runtime/solvers.py) turn every Euler or UniPC step into a short list of
 * in-place linear combinations ("Combine" ops) over named fp32 buffers. Run as PyTorch ops that is
 * 4-8 kernel launches per step, each reading and writing the whole latent; here one kernel reads
 * the engine's velocity once, applies the CFG combine and every Combine of the step in registers,
 * and writes back only the buffers the step changes (plus the next model input in engine dtype).
 *
 * Plain C ABI so runtime/fused.py can load it with ctypes, no PyTorch extension build needed.
 */
#ifndef FLOWBLEND_FUSED_STEP_H
#define FLOWBLEND_FUSED_STEP_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FLOWBLEND_API __declspec(dllexport)
#else
#define FLOWBLEND_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a signature or struct below changes; the loader refuses other versions. */
#define FLOWBLEND_ABI_VERSION 1

#define FLOWBLEND_MAX_SLOTS 8  /* named fp32 buffers one step may touch */
#define FLOWBLEND_MAX_OPS 6    /* Combine ops per step (UniPC uses 4) */
#define FLOWBLEND_MAX_TERMS 6  /* terms per Combine (UniPC's corrector uses 4) */

/* Slot numbering: 0 = latents, 1 = guided velocity (computed in the kernel from `velocity`, never
 * loaded; stored only if slots[1] is non-NULL), 2.. = solver state (last_sample, x0_0, ...). */
#define FLOWBLEND_SLOT_LATENTS 0
#define FLOWBLEND_SLOT_VELOCITY 1

enum flowblend_dtype { FLOWBLEND_FP32 = 0, FLOWBLEND_FP16 = 1, FLOWBLEND_BF16 = 2 };

/* slots[target] <- sum_k coef[k] * slots[source[k]], terms applied in order (fp32 fused multiply-add). */
typedef struct {
  int32_t target;
  int32_t num_terms;
  int32_t source[FLOWBLEND_MAX_TERMS];
  float coef[FLOWBLEND_MAX_TERMS];
} flowblend_combine;

/* Error codes: 0 success, > 0 a cudaError_t from the launch, < 0 a bad argument (below). */
#define FLOWBLEND_ERR_DTYPE (-1)
#define FLOWBLEND_ERR_BATCH (-2)
#define FLOWBLEND_ERR_LIMITS (-3)
#define FLOWBLEND_ERR_INDEX (-4)
#define FLOWBLEND_ERR_NULL (-5)

/* One denoising step over n latent elements, enqueued on `stream` (a cudaStream_t; capturable).
 *
 * velocity     [batch, n] engine output in `dtype`; row 0 conditional, row batch-1 unconditional
 * guidance     CFG scale: guided = uncond + guidance * (cond - uncond) when batch == 2
 * slots        num_slots fp32 device pointers, numbered as above (NULL for unused slots)
 * ops          num_ops Combine ops of this step, applied in order
 * model_input  [batch, n] in `dtype`: every row receives the updated latents; NULL to skip
 */
FLOWBLEND_API int flowblend_fused_step(const void* velocity, int32_t batch, int32_t dtype, float guidance,
                                       float* const* slots, int32_t num_slots, const flowblend_combine* ops,
                                       int32_t num_ops, void* model_input, int64_t n, void* stream);

/* The same arithmetic on host memory, element by element (the kernel's own per-element function,
 * compiled for the host): lets machines without a GPU test the library's math and argument checks. */
FLOWBLEND_API int flowblend_fused_step_host(const void* velocity, int32_t batch, int32_t dtype, float guidance,
                                            float* const* slots, int32_t num_slots, const flowblend_combine* ops,
                                            int32_t num_ops, void* model_input, int64_t n);

FLOWBLEND_API const char* flowblend_error_string(int code);
FLOWBLEND_API int flowblend_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* FLOWBLEND_FUSED_STEP_H */
