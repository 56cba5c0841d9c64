// gpt2cube routed-inference engine: a GPT-2 on ggml that can compute each FFN only over the
// hypercube vertex groups a token is routed to. Plain C ABI so Python reaches it with ctypes.
//
// Every function that can fail returns NULL or a negative value and leaves a message for
// g2c_last_error(); nothing aborts the process on bad input (corrupt files, wrong tokens).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct g2c_engine g2c_engine;

// Message of the last failure on this thread ("" if none).
const char * g2c_last_error(void);

// Load a GPT-2 GGUF. device: "cpu", or "auto" (the best GPU backend ggml has, else the CPU).
// n_ctx <= 0 means the model's context length. n_threads <= 0: ggml's default.
// kv_type "f16" (NULL: f16) or "f32"; repack != 0: CPU weight repacking where ggml has it (llama.cpp's default)
g2c_engine * g2c_load(const char * path, int32_t n_ctx, int32_t n_threads, const char * device,
                      const char * kv_type, int32_t repack);
void         g2c_free(g2c_engine * e);

int32_t      g2c_n_vocab(const g2c_engine * e);
int32_t      g2c_n_ctx(const g2c_engine * e);
int32_t      g2c_n_layer(const g2c_engine * e);
int32_t      g2c_n_past(const g2c_engine * e);
int32_t      g2c_cube_dim(const g2c_engine * e);      // 0 when the file has no hypercube
int32_t      g2c_n_graph_builds(const g2c_engine * e);  // graphs built so far (the rest were reused)
int32_t      g2c_n_repacked(const g2c_engine * e);      // weight tensors in a repacked CPU layout
const char * g2c_backend_name(const g2c_engine * e);

// Forget the KV cache (the next g2c_eval starts at position 0).
void         g2c_reset(g2c_engine * e);

// Run n tokens after the cached ones. radius < 0 or >= dim: dense FFN (all groups, plain
// mul_mat, as llama.cpp computes it); 0 <= radius < dim: each token's FFN uses the groups within
// Hamming distance `radius` of its vertex (ggml_mul_mat_id). experts != 0 takes the
// mul_mat_id path even for the full radius (to test it against the dense path).
// all_logits != 0: logits of every position (n * n_vocab floats), else of the last one only
// (n_vocab floats); logits may be NULL. vertices: n_layer * n int32 (layer-major), or NULL;
// filled only on the routed path. Returns 0, or -1 with g2c_last_error() set.
int32_t g2c_eval(g2c_engine * e, const int32_t * tokens, int32_t n, int32_t radius, int32_t experts,
                 int32_t all_logits, float * logits, int32_t * vertices);

#ifdef __cplusplus
}
#endif
