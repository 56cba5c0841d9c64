// gpt2cube routed-inference engine: GPT-2 on ggml with hypercube-routed FFNs.
//
// Shapes are ggml's (ne0 first): E = n_embd, F = n_ff, H = heads, hd = E / H, n = tokens in
// this call, n_kv = cached + new tokens, d = cube dimension, V = 2^d vertices, g = F / V,
// B = vertices within the routing radius.
//
// The graph is llama.cpp's GPT-2 (src/models/gpt2.cpp, read, not copied): pre-norm blocks,
// fused QKV, causal soft-max attention scaled by 1/sqrt(hd), GELU FFN, tied or separate head.
// KV cache in f16 (llama.cpp's default) or f32, written with ggml_set_rows at positions given as
// an input, V transposed ([n_ctx, E], element e of position p at e n_ctx + p, as llama.cpp keeps
// it without flash attention) so attention reads it as [n_kv, hd, H] rows without a per-step copy
// of the cache (that copy cost a third of the generation step at 300 cached tokens on the 124M
// shape); one graph serves every step of a generation: graphs are cached by (tokens per
// call, path, radius, logits wanted, padded KV length) and reused without rebuilding or
// re-allocating, as llama.cpp reuses its graphs. The routed FFN: router margins m = W x + b (d, n); vertex = argmax over V of
// S^T sgn(m), where S[k, v] = +1 if bit k of v is set, else -1 (the vertex whose bits agree with
// every sign; a zero margin ties and argmax takes the lower id, i.e. bit 0 = [m > 0]); the ball
// table maps each vertex to the B group ids; ffn_up rows and ffn_down columns of group v are
// contiguous after the converter's permutation, so ffn_up is a [E, g, V] reshape and ffn_down is
// re-laid once at load time as [g, E, V] experts (whole quant blocks are moved).
#include "gpt2cube_engine.h"

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

thread_local std::string g_error;

struct error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

template <typename... Args> std::string fmt(const char * f, Args... args) {
    char buf[1024];
    snprintf(buf, sizeof(buf), f, args...);
    return buf;
}

struct layer {
    ggml_tensor *attn_norm, *attn_norm_b, *wqkv, *bqkv, *wo, *bo;
    ggml_tensor *ffn_norm, *ffn_norm_b, *up, *up_b, *down, *down_b;
    ggml_tensor *down_exps = nullptr;                          // [g, E, V]
    ggml_tensor *up_exps = nullptr;                            // [E, g, V] copy of `up` when that is repacked
    ggml_tensor *router_w = nullptr, *router_b = nullptr;      // [E, d], [d]
    ggml_tensor *comp = nullptr;                               // [E, d V]: row r V + v, schema 2's compensation
    ggml_tensor *k_cache = nullptr;                            // [E, n_ctx] kv_type
    ggml_tensor *v_cache = nullptr;                            // [n_ctx, E] kv_type: transposed, as llama.cpp
                                                               // keeps it without flash attention
};

bool supported_weight_type(ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_K: case GGML_TYPE_Q6_K: case GGML_TYPE_TQ1_0: case GGML_TYPE_TQ2_0:
            return true;
        default:
            return false;
    }
}

}  // namespace

struct g2c_engine {
    std::string path;
    int n_layer = 0, n_embd = 0, n_head = 0, n_ff = 0, n_vocab = 0, n_ctx_train = 0, n_ctx = 0;
    float eps = 1e-5f;
    int dim = 0, n_vertices = 0, group = 0;
    std::vector<float> comp_data;               // (L, d, V, E) hypercube.compensation; empty: none (schema 1); released once uploaded
    int n_past = 0;
    ggml_type kv_type = GGML_TYPE_F16;
    bool repack = true;   // CPU weight repacking (ggml's extra buffer types), as llama.cpp does by default
    int n_repacked = 0;

    gguf_context * gguf = nullptr;
    ggml_context * wctx = nullptr;   // tensors from the file (metadata only, no_alloc)
    ggml_context * xctx = nullptr;   // engine-made tensors: experts, routers, tables, KV cache
    ggml_backend_t backend = nullptr, cpu = nullptr;
    std::vector<ggml_backend_buffer_t> buffers;
    ggml_backend_sched_t sched = nullptr;
    ggml_threadpool * threadpool = nullptr;           // persistent CPU workers (none: one pool per graph)
    void (*threadpool_free)(ggml_threadpool *) = nullptr;

    ggml_tensor *tok_embd, *pos_embd, *out_norm, *out_norm_b, *output;
    std::vector<layer> layers;
    ggml_tensor * signs = nullptr;              // [d, V] S
    std::vector<ggml_tensor *> balls;           // radius r -> [B_r, V] i32 group ids (ascending)
    std::vector<ggml_tensor *> ball_masks;      // radius r -> [V, V] f32: 1 where group u is in v's ball;
                                                // only for the radii the masked path runs (else null)
    int graph_size = 0;                         // nodes of the largest graph build() makes

    // The graph of the last call, kept with its context and allocation for the next call with
    // the same key (a generation step after a generation step).
    struct graph_key {
        int n, radius, n_kv;
        bool experts, all_logits, vertices;
        bool operator==(const graph_key & o) const {
            return n == o.n && radius == o.radius && n_kv == o.n_kv && experts == o.experts && all_logits == o.all_logits
                && vertices == o.vertices;
        }
    };
    struct graph_io {
        ggml_tensor *tokens, *pos, *kv_idx, *v_idx, *mask, *logits;
        std::vector<ggml_tensor *> vertex;
    };
    ggml_context * gctx = nullptr;
    ggml_cgraph * cached_gf = nullptr;
    graph_key cached_key = {0, 0, 0, false, false, false};
    graph_io cached_io;
    int n_builds = 0;                           // graphs built (a test checks the reuse)
    static constexpr int kKvPad = 256;          // KV length padded to this, as llama.cpp pads

    ~g2c_engine() {
        if (gctx) ggml_free(gctx);
        if (sched) ggml_backend_sched_free(sched);
        for (auto b : buffers) ggml_backend_buffer_free(b);
        if (xctx) ggml_free(xctx);
        if (wctx) ggml_free(wctx);
        if (gguf) gguf_free(gguf);
        if (backend && backend != cpu) ggml_backend_free(backend);
        if (cpu) ggml_backend_free(cpu);
        if (threadpool && threadpool_free) threadpool_free(threadpool);
    }

    // ---- metadata -------------------------------------------------------------------------
    int64_t key(const char * k, bool required = true) const {
        int64_t id = gguf_find_key(gguf, k);
        if (id < 0 && required) throw error(fmt("%s: metadata key %s is missing", path.c_str(), k));
        return id;
    }
    uint32_t u32(const char * k) const {
        int64_t id = key(k);
        if (gguf_get_kv_type(gguf, id) != GGUF_TYPE_UINT32)
            throw error(fmt("%s: metadata key %s has type %s; expected uint32", path.c_str(), k,
                            gguf_type_name(gguf_get_kv_type(gguf, id))));
        return gguf_get_val_u32(gguf, id);
    }
    template <typename T> std::vector<T> array(const char * k, gguf_type want, size_t n) const {
        int64_t id = key(k);
        if (gguf_get_kv_type(gguf, id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(gguf, id) != want)
            throw error(fmt("%s: metadata key %s is not an array of %s", path.c_str(), k, gguf_type_name(want)));
        if (gguf_get_arr_n(gguf, id) != n)
            throw error(fmt("%s: metadata key %s has %zu values; expected %zu", path.c_str(), k,
                            gguf_get_arr_n(gguf, id), n));
        const T * p = static_cast<const T *>(gguf_get_arr_data(gguf, id));
        return std::vector<T>(p, p + n);
    }

    void read_hparams() {
        int64_t id = key("general.architecture");
        if (gguf_get_kv_type(gguf, id) != GGUF_TYPE_STRING || std::string(gguf_get_val_str(gguf, id)) != "gpt2")
            throw error(fmt("%s: general.architecture is not 'gpt2'; this engine runs GPT-2 files", path.c_str()));
        n_layer = (int) u32("gpt2.block_count");
        n_embd = (int) u32("gpt2.embedding_length");
        n_head = (int) u32("gpt2.attention.head_count");
        n_ff = (int) u32("gpt2.feed_forward_length");
        n_ctx_train = (int) u32("gpt2.context_length");
        int64_t e = key("gpt2.attention.layer_norm_epsilon");
        if (gguf_get_kv_type(gguf, e) != GGUF_TYPE_FLOAT32)
            throw error(fmt("%s: gpt2.attention.layer_norm_epsilon is not a float32", path.c_str()));
        eps = gguf_get_val_f32(gguf, e);
        if (n_layer <= 0 || n_embd <= 0 || n_head <= 0 || n_ff <= 0 || n_ctx_train <= 0 || n_embd % n_head)
            throw error(fmt("%s: hyper-parameters n_layer=%d n_embd=%d n_head=%d n_ff=%d ctx=%d are inconsistent",
                            path.c_str(), n_layer, n_embd, n_head, n_ff, n_ctx_train));
    }

    ggml_tensor * weight(const std::string & name, int64_t ne0, int64_t ne1, bool required = true) {
        ggml_tensor * t = ggml_get_tensor(wctx, name.c_str());
        if (!t) {
            if (!required) return nullptr;
            throw error(fmt("%s: tensor %s is missing", path.c_str(), name.c_str()));
        }
        if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1)
            throw error(fmt("%s: tensor %s has shape [%lld, %lld, %lld]; expected [%lld, %lld]", path.c_str(),
                            name.c_str(), (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
                            (long long) ne0, (long long) ne1));
        if (!supported_weight_type(t->type))
            throw error(fmt("%s: tensor %s has type %s; the engine runs f32, f16, bf16, q8_0, q4_0, q4_k, q6_k, tq1_0, tq2_0",
                            path.c_str(), name.c_str(), ggml_type_name(t->type)));
        return t;
    }

    void map_tensors() {
        const int E = n_embd, F = n_ff;
        ggml_tensor * te = ggml_get_tensor(wctx, "token_embd.weight");
        if (!te) throw error(fmt("%s: tensor token_embd.weight is missing", path.c_str()));
        n_vocab = (int) te->ne[1];
        tok_embd = weight("token_embd.weight", E, n_vocab);
        pos_embd = weight("position_embd.weight", E, n_ctx_train);
        out_norm = weight("output_norm.weight", E, 1);
        out_norm_b = weight("output_norm.bias", E, 1);
        output = weight("output.weight", E, n_vocab, false);
        if (!output) output = tok_embd;  // tied head
        layers.resize(n_layer);
        for (int i = 0; i < n_layer; ++i) {
            auto n = [i](const char * s) { return "blk." + std::to_string(i) + "." + s; };
            layer & L = layers[i];
            L.attn_norm = weight(n("attn_norm.weight"), E, 1);
            L.attn_norm_b = weight(n("attn_norm.bias"), E, 1);
            L.wqkv = weight(n("attn_qkv.weight"), E, 3 * E);
            L.bqkv = weight(n("attn_qkv.bias"), 3 * E, 1);
            L.wo = weight(n("attn_output.weight"), E, E);
            L.bo = weight(n("attn_output.bias"), E, 1);
            L.ffn_norm = weight(n("ffn_norm.weight"), E, 1);
            L.ffn_norm_b = weight(n("ffn_norm.bias"), E, 1);
            L.up = weight(n("ffn_up.weight"), E, F);
            L.up_b = weight(n("ffn_up.bias"), F, 1);
            L.down = weight(n("ffn_down.weight"), F, E);
            L.down_b = weight(n("ffn_down.bias"), E, 1);
        }
    }

    // Reads and checks hypercube.*; returns the router weights (L, d, E) and biases (L, d).
    void read_hypercube(std::vector<float> & rw, std::vector<float> & rb) {
        if (key("hypercube.dim", false) < 0) return;
        if (key("hypercube.version", false) >= 0) {
            const uint32_t version = u32("hypercube.version");
            if (version < 1 || version > 2)
                throw error(fmt("%s: hypercube.version = %u; this engine reads versions 1..2 (a newer gpt2cube wrote the file)",
                                path.c_str(), version));
        }
        dim = (int) u32("hypercube.dim");
        if (dim < 1 || dim > 10) throw error(fmt("%s: hypercube.dim = %d; expected 1..10", path.c_str(), dim));
        n_vertices = 1 << dim;
        if ((int) u32("hypercube.vertex_count") != n_vertices)
            throw error(fmt("%s: hypercube.vertex_count = %u; expected 2^%d = %d", path.c_str(),
                            u32("hypercube.vertex_count"), dim, n_vertices));
        if ((int) u32("hypercube.layer_count") != n_layer)
            throw error(fmt("%s: hypercube.layer_count = %u; expected %d", path.c_str(), u32("hypercube.layer_count"), n_layer));
        if (n_ff % n_vertices) throw error(fmt("%s: n_ff %d is not divisible by 2^%d", path.c_str(), n_ff, dim));
        group = (int) u32("hypercube.group_size");
        if (group != n_ff / n_vertices)
            throw error(fmt("%s: hypercube.group_size = %d; expected n_ff / 2^d = %d", path.c_str(), group, n_ff / n_vertices));
        auto table = array<uint32_t>("hypercube.routing_table", GGUF_TYPE_UINT32, (size_t) n_vertices * dim);
        for (int v = 0; v < n_vertices; ++v)
            for (int k = 0; k < dim; ++k)
                if (table[(size_t) v * dim + k] != (uint32_t) (v ^ (1 << k)))
                    throw error(fmt("%s: hypercube.routing_table[%d][%d] = %u; expected %d (vertex %d with bit %d flipped)",
                                    path.c_str(), v, k, table[(size_t) v * dim + k], v ^ (1 << k), v, k));
        rw = array<float>("hypercube.router.weight", GGUF_TYPE_FLOAT32, (size_t) n_layer * dim * n_embd);
        rb = array<float>("hypercube.router.bias", GGUF_TYPE_FLOAT32, (size_t) n_layer * dim);
        for (float x : rw) if (!std::isfinite(x)) throw error(fmt("%s: hypercube.router.weight holds NaN or infinity", path.c_str()));
        for (float x : rb) if (!std::isfinite(x)) throw error(fmt("%s: hypercube.router.bias holds NaN or infinity", path.c_str()));
        if (key("hypercube.compensation", false) >= 0) {
            comp_data = array<float>("hypercube.compensation", GGUF_TYPE_FLOAT32, (size_t) n_layer * dim * n_vertices * n_embd);
            for (float x : comp_data)
                if (!std::isfinite(x)) throw error(fmt("%s: hypercube.compensation holds NaN or infinity", path.c_str()));
        }
        for (int i = 0; i < n_layer; ++i) {
            const ggml_tensor * d = layers[i].down;
            if (group % ggml_blck_size(d->type))
                throw error(fmt("%s: blk.%d.ffn_down.weight is %s (blocks of %lld) but the groups hold %d neurons; "
                                "groups must fill whole blocks", path.c_str(), i, ggml_type_name(d->type),
                                (long long) ggml_blck_size(d->type), group));
        }
    }

    // ---- backend and weights ---------------------------------------------------------------
    void init_backend(const std::string & device, int n_threads) {
        ggml_backend_load_all();
        ggml_backend_dev_t cpu_dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!cpu_dev) throw error("ggml has no CPU backend");
        cpu = ggml_backend_dev_init(cpu_dev, nullptr);
        if (!cpu) throw error("cannot start ggml's CPU backend");
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu_dev);
        if (n_threads > 0) {
            auto set = (void (*)(ggml_backend_t, int)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
            if (set) set(cpu, n_threads);
            // a persistent pool, as llama.cpp keeps: otherwise every graph starts its own threads,
            // which costs more than a 1-token step of a small model
            auto tp_new = (ggml_threadpool * (*)(ggml_threadpool_params *)) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new");
            auto tp_set = (void (*)(ggml_backend_t, ggml_threadpool *)) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_threadpool");
            threadpool_free = (void (*)(ggml_threadpool *)) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free");
            if (tp_new && tp_set && threadpool_free) {
                ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
                threadpool = tp_new(&tpp);
                if (threadpool) tp_set(cpu, threadpool);
            }
        }
        backend = cpu;
        if (device == "auto") {
            ggml_backend_dev_t gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
            if (!gpu) gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
            if (gpu) backend = ggml_backend_dev_init(gpu, nullptr);
            if (!backend) backend = cpu;
        } else if (device != "cpu") {
            ggml_backend_dev_t dev = ggml_backend_dev_by_name(device.c_str());
            if (!dev) throw error(fmt("device '%s' is not one of ggml's devices; expected cpu, auto or a device name", device.c_str()));
            backend = ggml_backend_dev_init(dev, nullptr);
            if (!backend) throw error(fmt("cannot start device '%s'", device.c_str()));
        }
    }

    // Whether the primary backend runs every op of every graph the engine builds (CUDA has no TQ
    // kernels, Metal no TQ1_0; mul_mat_id, add_id and quantized get_rows vary by backend): the
    // graphs for one and two tokens, dense and at every radius, are built on the (not yet
    // allocated) tensors and each node is asked. If any is refused the whole model runs on the CPU.
    const ggml_tensor * unsupported_node() {
        ggml_backend_dev_t dev = ggml_backend_get_device(backend);
        ggml_init_params p = {ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false), nullptr, true};
        for (int radius = -1; radius <= dim; ++radius)
            for (int experts = 0; experts <= (radius == dim ? 1 : 0); ++experts)
                for (int n = 1; n <= 2; ++n) {
                    if (radius == -1 && experts) continue;
                    ggml_context * c = ggml_init(p);
                    std::unique_ptr<ggml_context, void (*)(ggml_context *)> guard(c, ggml_free);
                    graph_io io;
                    ggml_cgraph * gf = build(c, n, n, radius, experts, true, true, io);
                    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
                        ggml_tensor * node = ggml_graph_node(gf, i);
                        if (!ggml_backend_dev_supports_op(dev, node)) return node;
                    }
                }
        return nullptr;
    }

    void create_engine_tensors() {
        size_t n_extra = (size_t) n_layer * 7 + 16 + 2 * ((size_t) dim + 1);
        ggml_init_params p = {ggml_tensor_overhead() * n_extra, nullptr, true};
        xctx = ggml_init(p);
        for (int i = 0; i < n_layer; ++i) {
            layer & L = layers[i];
            L.k_cache = ggml_new_tensor_2d(xctx, kv_type, n_embd, n_ctx);
            L.v_cache = ggml_new_tensor_2d(xctx, kv_type, n_ctx, n_embd);
            if (dim) {
                L.down_exps = ggml_new_tensor_3d(xctx, L.down->type, group, n_embd, n_vertices);
                // the expert path reads ffn_up as [E, g, V]: a repacked ffn_up cannot be viewed so
                if (repack) L.up_exps = ggml_new_tensor_3d(xctx, L.up->type, n_embd, group, n_vertices);
                L.router_w = ggml_new_tensor_2d(xctx, GGML_TYPE_F32, n_embd, dim);
                L.router_b = ggml_new_tensor_1d(xctx, GGML_TYPE_F32, dim);
                if (!comp_data.empty()) L.comp = ggml_new_tensor_2d(xctx, GGML_TYPE_F32, n_embd, (int64_t) dim * n_vertices);
            }
        }
        if (dim) {
            signs = ggml_new_tensor_2d(xctx, GGML_TYPE_F32, dim, n_vertices);
            for (int r = 0; r <= dim; ++r) {
                int64_t B = 0;
                for (int k = 0; k <= r; ++k) B += binom(dim, k);
                balls.push_back(ggml_new_tensor_2d(xctx, GGML_TYPE_I32, B, n_vertices));
                ball_masks.push_back(2 * B > n_vertices ? ggml_new_tensor_2d(xctx, GGML_TYPE_F32, n_vertices, n_vertices)
                                                        : nullptr);
            }
        }
        // nodes per layer: about 30 for attention and a dense FFN, about 20 more when routed
        graph_size = 64 * n_layer + 128;
    }

    static int64_t binom(int n, int k) {
        int64_t b = 1;
        for (int i = 1; i <= k; ++i) b = b * (n - k + i) / i;
        return b;
    }

    void load_weights(const std::vector<float> & rw, const std::vector<float> & rb) {
        create_engine_tensors();
        if (backend != cpu) {
            if (const ggml_tensor * node = unsupported_node()) {
                fprintf(stderr, "gpt2cube engine: %s cannot run %s on %s (%s); using the CPU\n", ggml_backend_name(backend),
                        ggml_op_desc(node), node->src[0] ? ggml_type_name(node->src[0]->type) : "-", node->name);
                ggml_backend_free(backend);
                backend = cpu;
            }
        }
        if (repack) alloc_repacked();
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(wctx, backend);  // the rest
        if (!buf) throw error(fmt("%s: cannot allocate the weights on %s", path.c_str(), ggml_backend_name(backend)));
        buffers.push_back(buf);
        buf = ggml_backend_alloc_ctx_tensors(xctx, backend);
        if (!buf) throw error(fmt("cannot allocate the KV cache (%d tokens) on %s", n_ctx, ggml_backend_name(backend)));
        buffers.push_back(buf);
        ggml_backend_buffer_clear(buf, 0);

        FILE * f = fopen(path.c_str(), "rb");
        if (!f) throw error(fmt("%s: cannot open", path.c_str()));
        std::unique_ptr<FILE, int (*)(FILE *)> guard(f, fclose);
        const size_t base = gguf_get_data_offset(gguf);
        std::vector<uint8_t> data;
        for (ggml_tensor * t = ggml_get_first_tensor(wctx); t; t = ggml_get_next_tensor(wctx, t)) {
            int64_t id = gguf_find_tensor(gguf, t->name);
            data.resize(ggml_nbytes(t));
            if (fseek(f, (long) (base + gguf_get_tensor_offset(gguf, id)), SEEK_SET) != 0 ||
                fread(data.data(), 1, data.size(), f) != data.size())
                throw error(fmt("%s: tensor %s: the file is truncated", path.c_str(), t->name));
            ggml_backend_tensor_set(t, data.data(), 0, data.size());
            for (int i = 0; dim && i < n_layer; ++i) {
                if (t == layers[i].down) set_experts(layers[i], data);
                if (t == layers[i].up && layers[i].up_exps) ggml_backend_tensor_set(layers[i].up_exps, data.data(), 0, data.size());
            }
        }
        for (int i = 0; dim && i < n_layer; ++i) {
            ggml_backend_tensor_set(layers[i].router_w, rw.data() + (size_t) i * dim * n_embd, 0, ggml_nbytes(layers[i].router_w));
            ggml_backend_tensor_set(layers[i].router_b, rb.data() + (size_t) i * dim, 0, ggml_nbytes(layers[i].router_b));
            if (layers[i].comp)
                ggml_backend_tensor_set(layers[i].comp, comp_data.data() + (size_t) i * dim * n_vertices * n_embd, 0,
                                        ggml_nbytes(layers[i].comp));
        }
        std::vector<float>().swap(comp_data);  // the backend holds it now
        if (dim) {
            std::vector<float> s((size_t) dim * n_vertices);
            for (int v = 0; v < n_vertices; ++v)
                for (int k = 0; k < dim; ++k) s[(size_t) v * dim + k] = (v >> k & 1) ? 1.0f : -1.0f;
            ggml_backend_tensor_set(signs, s.data(), 0, ggml_nbytes(signs));
            // ball of radius r around v: the groups u with popcount(u ^ v) <= r, ascending, and as a 0/1 mask
            std::vector<int32_t> ids;
            std::vector<float> mask((size_t) n_vertices * n_vertices);
            for (int r = 0; r <= dim; ++r) {
                ids.clear();
                for (int v = 0; v < n_vertices; ++v)
                    for (int u = 0; u < n_vertices; ++u) {
                        const bool in = __builtin_popcount(u ^ v) <= r;
                        mask[(size_t) v * n_vertices + u] = in ? 1.0f : 0.0f;
                        if (in) ids.push_back(u);
                    }
                ggml_backend_tensor_set(balls[r], ids.data(), 0, ids.size() * sizeof(int32_t));
                if (ball_masks[r]) ggml_backend_tensor_set(ball_masks[r], mask.data(), 0, mask.size() * sizeof(float));
            }
        }
    }

    // Weights that multiply activations (attn_qkv, attn_output, ffn_up, ffn_down, an untied head,
    // and for Q4_0 the routed path's expert copies up_exps and down_exps, read by mul_mat_id) go
    // to the first of the CPU's extra buffer types that takes them: ggml's repacked
    // (interleaved) layouts for Q4_0 / Q4_K / IQ4_NL / Q8_0 where the CPU has the kernels, chosen
    // as llama.cpp chooses (a dummy buffer of that type, then supports_op on a mul_mat).
    void alloc_repacked() {
        if (backend != cpu) return;
        ggml_backend_dev_t dev = ggml_backend_get_device(cpu);
        auto get = (ggml_backend_buffer_type_t * (*)(ggml_backend_dev_t))
            ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
        if (!get) return;
        ggml_backend_buffer_type_t * extra = get(dev);
        std::vector<ggml_tensor *> cands;
        for (layer & L : layers) {
            for (ggml_tensor * w : {L.wqkv, L.wo, L.up, L.down}) cands.push_back(w);
            // the expert copies only where mul_mat_id gains from it: measured on x86-64 AVX-512,
            // repacked Q4_0 experts 1.15x faster in generation at half the groups (355M shape),
            // repacked Q4_K experts half as fast in prompt processing and no faster generating
            for (ggml_tensor * w : {L.up_exps, L.down_exps})
                if (w && w->type == GGML_TYPE_Q4_0) cands.push_back(w);
        }
        if (output != tok_embd) cands.push_back(output);  // a tied head is also get_rows' table
        ggml_init_params p = {ggml_tensor_overhead() * 4, nullptr, true};
        for (ggml_tensor * w : cands) {
            for (ggml_backend_buffer_type_t * b = extra; b && *b; ++b) {
                ggml_context * c = ggml_init(p);
                std::unique_ptr<ggml_context, void (*)(ggml_context *)> guard(c, ggml_free);
                // the expert tensors [.., .., V] are read by mul_mat_id, which ggml's repacked
                // layouts also serve (one 2-D repack per expert)
                ggml_tensor * op = w->ne[2] == 1
                    ? ggml_mul_mat(c, w, ggml_new_tensor_2d(c, GGML_TYPE_F32, w->ne[0], 512))
                    : ggml_mul_mat_id(c, w, ggml_new_tensor_3d(c, GGML_TYPE_F32, w->ne[0], 1, 512),
                                      ggml_new_tensor_2d(c, GGML_TYPE_I32, 1, 512));
                w->buffer = ggml_backend_buft_alloc_buffer(*b, 0);
                const bool ok = ggml_backend_dev_supports_op(dev, op);
                ggml_backend_buffer_free(w->buffer);
                w->buffer = nullptr;
                if (!ok) continue;
                ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(*b, ggml_backend_buft_get_alloc_size(*b, w));
                if (!buf) break;  // no memory for it there: the plain buffer takes it
                buffers.push_back(buf);
                if (ggml_backend_tensor_alloc(buf, w, ggml_backend_buffer_get_base(buf)) != GGML_STATUS_SUCCESS)
                    throw error(fmt("%s: cannot place %s in %s", path.c_str(), w->name, ggml_backend_buft_name(*b)));
                ++n_repacked;
                break;
            }
        }
    }

    // ffn_down [F, E] (row e holds F weights, group v = columns [v g, (v+1) g)) -> [g, E, V]:
    // expert v's row e is a byte copy of that segment (whole quant blocks: checked at load).
    void set_experts(layer & L, const std::vector<uint8_t> & down) {
        const size_t row = ggml_row_size(L.down->type, n_ff), seg = ggml_row_size(L.down->type, group);
        std::vector<uint8_t> out(ggml_nbytes(L.down_exps));
        for (int v = 0; v < n_vertices; ++v)
            for (int e = 0; e < n_embd; ++e)
                memcpy(out.data() + ((size_t) v * n_embd + e) * seg, down.data() + (size_t) e * row + (size_t) v * seg, seg);
        ggml_backend_tensor_set(L.down_exps, out.data(), 0, out.size());
    }

    // ---- graph ------------------------------------------------------------------------------
    ggml_tensor * norm(ggml_context * c, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) const {
        return ggml_add(c, ggml_mul(c, ggml_norm(c, x, eps), w), b);
    }

    ggml_tensor * ffn_dense(ggml_context * c, const layer & L, ggml_tensor * x) const {
        ggml_tensor * h = ggml_gelu(c, ggml_add(c, ggml_mul_mat(c, L.up, x), L.up_b));
        return ggml_add(c, ggml_mul_mat(c, L.down, h), L.down_b);
    }

    // Which path computes radius r: ggml_mul_mat_id over the B ball groups when the ball holds at
    // most half of the groups (it reads fewer weights than the dense FFN), else the dense FFN
    // with the neurons outside the ball zeroed (same result, O(F n) memory whatever B is).
    bool use_experts(int r) const { return 2 * balls[r]->ne[0] <= n_vertices; }

    // Bytes of intermediate results (and ggml's mul_mat_id work area) per token on the FFN path
    // of radius r (r < 0: dense), plus attention over n_ctx keys; eval() cuts a batch into
    // micro-batches that keep this under kBatchBudget.
    size_t bytes_per_token(int r, bool experts) const {
        size_t b = (size_t) n_ctx * n_head * 4 * 3 + (size_t) n_ff * 4 * 4 + (size_t) n_embd * 4 * 16 + (size_t) n_embd * 8;  // + the transposed V write's indices
        if (r >= 0 && (experts || use_experts(r))) {
            const size_t B = balls[r]->ne[0];
            b += (size_t) n_vertices * B * 16             // mul_mat_id's row mapping: [V][B n] entries
               + B * ((size_t) group * 3 + n_embd * 2) * 4;  // [g, B] up/gelu, [E, B] down and its copy
        } else if (r >= 0) {
            b += (size_t) n_vertices * 4 * 2;
        }
        return b;
    }

    // x [E, n] -> [E, n] through the groups around each token's vertex, plus (schema 2) the
    // skipped groups' mean output at that vertex; *vertex <- [n] i32
    ggml_tensor * ffn_routed(ggml_context * c, const layer & L, ggml_tensor * x, int radius, bool experts,
                             ggml_tensor ** vertex) const {
        ggml_tensor * y = ffn_routed_groups(c, L, x, radius, experts, vertex);
        if (!L.comp || radius >= dim) return y;
        ggml_tensor * rows = ggml_view_2d(c, L.comp, n_embd, n_vertices, L.comp->nb[1], (size_t) radius * n_vertices * L.comp->nb[1]);
        return ggml_add(c, y, ggml_get_rows(c, rows, *vertex));                          // + [E, n]
    }

    ggml_tensor * ffn_routed_groups(ggml_context * c, const layer & L, ggml_tensor * x, int radius, bool experts,
                                    ggml_tensor ** vertex) const {
        const int64_t n = x->ne[1];
        ggml_tensor * m = ggml_add(c, ggml_mul_mat(c, L.router_w, x), L.router_b);     // [d, n]
        ggml_tensor * score = ggml_mul_mat(c, signs, ggml_sgn(c, m));                    // [V, n]
        *vertex = ggml_argmax(c, score);                                                 // [n] i32
        if (!experts && !use_experts(radius)) {
            ggml_tensor * keep = ggml_get_rows(c, ball_masks[radius], *vertex);          // [V, n] 0/1
            keep = ggml_repeat_4d(c, ggml_reshape_3d(c, keep, 1, n_vertices, n), group, n_vertices, n, 1);
            ggml_tensor * h = ggml_gelu(c, ggml_add(c, ggml_mul_mat(c, L.up, x), L.up_b));  // [F, n]
            h = ggml_mul(c, h, ggml_reshape_2d(c, keep, n_ff, n));
            return ggml_add(c, ggml_mul_mat(c, L.down, h), L.down_b);
        }
        ggml_tensor * ball = balls[radius];
        const int64_t B = ball->ne[0];
        ggml_tensor * ids = ggml_get_rows(c, ball, *vertex);                             // [B, n] i32
        ggml_tensor * up = L.up_exps ? L.up_exps : ggml_reshape_3d(c, L.up, n_embd, group, n_vertices);  // [E, g, V]
        ggml_tensor * h = ggml_mul_mat_id(c, up, ggml_reshape_3d(c, x, n_embd, 1, n), ids);  // [g, B, n]
        h = ggml_add_id(c, h, ggml_reshape_2d(c, L.up_b, group, n_vertices), ids);
        h = ggml_gelu(c, h);
        ggml_tensor * y = ggml_mul_mat_id(c, L.down_exps, h, ids);                       // [E, B, n]
        // sum over the B groups in one op: [E, B, n] -> [B, E, n] -> sum_rows [1, E, n]
        ggml_tensor * sum = B == 1 ? y : ggml_sum_rows(c, ggml_cont(c, ggml_permute(c, y, 1, 0, 2, 3)));
        return ggml_add(c, ggml_reshape_2d(c, sum, n_embd, n), L.down_b);
    }

    // KV positions the graph for n new tokens after n_past cached ones attends over: padded up
    // to kKvPad so that consecutive generation steps share one graph (the mask hides the rest).
    int padded_kv(int n) const {
        return std::min(n_ctx, (n_past + n + kKvPad - 1) / kKvPad * kKvPad);
    }

    // With only the last position's logits wanted (and no vertex ids read back) the last layer's
    // FFN runs on that position alone, as llama.cpp's graph selects its output rows there: the
    // other positions' K and V are already in the cache and nothing else reads their FFN output.
    ggml_cgraph * build(ggml_context * c, int n, int n_kv, int radius, bool experts, bool all_logits, bool vertices,
                        graph_io & io) const {
        const int E = n_embd, H = n_head, hd = E / H;
        ggml_cgraph * gf = ggml_new_graph_custom(c, graph_size, false);
        io.tokens = ggml_new_tensor_1d(c, GGML_TYPE_I32, n);
        io.pos = ggml_new_tensor_1d(c, GGML_TYPE_I32, n);
        io.kv_idx = ggml_new_tensor_1d(c, GGML_TYPE_I64, n);
        io.v_idx = ggml_new_tensor_1d(c, GGML_TYPE_I64, (int64_t) E * n);
        io.mask = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_kv, n);
        for (ggml_tensor * t : {io.tokens, io.pos, io.kv_idx, io.v_idx, io.mask}) ggml_set_input(t);
        ggml_tensor * x = ggml_add(c, ggml_get_rows(c, tok_embd, io.tokens), ggml_get_rows(c, pos_embd, io.pos));
        const bool routed = dim && (experts || (radius >= 0 && radius < dim));
        const int r = radius < 0 || radius > dim ? dim : radius;
        for (int il = 0; il < n_layer; ++il) {
            const layer & L = layers[il];
            ggml_tensor * cur = norm(c, x, L.attn_norm, L.attn_norm_b);
            ggml_tensor * qkv = ggml_add(c, ggml_mul_mat(c, L.wqkv, cur), L.bqkv);        // [3E, n]
            ggml_tensor * q = ggml_view_3d(c, qkv, hd, H, n, hd * sizeof(float), qkv->nb[1], 0);
            ggml_tensor * k = ggml_view_2d(c, qkv, E, n, qkv->nb[1], E * sizeof(float));
            ggml_tensor * v = ggml_view_2d(c, qkv, E, n, qkv->nb[1], 2 * E * sizeof(float));
            // write K at the rows kv_idx (n_past..) of the cache and V, transposed, element by
            // element at v_idx (e n_ctx + position); these run before the reads
            ggml_build_forward_expand(gf, ggml_set_rows(c, L.k_cache, k, io.kv_idx));
            ggml_tensor * v_elems = ggml_reshape_2d(c, ggml_cont(c, v), 1, (int64_t) E * n);
            ggml_build_forward_expand(gf, ggml_set_rows(c, ggml_reshape_2d(c, L.v_cache, 1, (int64_t) E * n_ctx), v_elems, io.v_idx));
            ggml_tensor * K = ggml_permute(c, ggml_view_3d(c, L.k_cache, hd, H, n_kv, ggml_row_size(kv_type, hd), L.k_cache->nb[1], 0), 0, 2, 1, 3);  // [hd, n_kv, H]
            ggml_tensor * V = ggml_view_3d(c, L.v_cache, n_kv, hd, H, L.v_cache->nb[1], L.v_cache->nb[1] * hd, 0);  // [n_kv, hd, H]
            ggml_tensor * Q = ggml_permute(c, q, 0, 2, 1, 3);                                // [hd, n, H]
            ggml_tensor * kq = ggml_soft_max_ext(c, ggml_mul_mat(c, K, Q), io.mask, 1.0f / sqrtf((float) hd), 0.0f);  // [n_kv, n, H]
            ggml_tensor * o = ggml_permute(c, ggml_mul_mat(c, V, kq), 0, 2, 1, 3);          // [hd, H, n]
            o = ggml_cont_2d(c, o, E, n);
            o = ggml_add(c, ggml_mul_mat(c, L.wo, o), L.bo);
            ggml_tensor * ffn_inp = ggml_add(c, o, x);
            if (il == n_layer - 1 && !all_logits && !vertices && n > 1)
                ffn_inp = ggml_view_2d(c, ffn_inp, E, 1, ffn_inp->nb[1], (size_t) (n - 1) * ffn_inp->nb[1]);
            cur = norm(c, ffn_inp, L.ffn_norm, L.ffn_norm_b);
            if (routed) {
                ggml_tensor * vx = nullptr;
                cur = ffn_routed(c, L, cur, r, experts, &vx);
                ggml_set_output(vx);
                ggml_build_forward_expand(gf, vx);
                io.vertex.push_back(vx);
            } else {
                cur = ffn_dense(c, L, cur);
            }
            x = ggml_add(c, cur, ffn_inp);
        }
        if (!all_logits && x->ne[1] > 1)  // only the last position's logits: the head is most of a small GPT-2's work
            x = ggml_view_2d(c, x, n_embd, 1, x->nb[1], (size_t) (n - 1) * x->nb[1]);
        x = norm(c, x, out_norm, out_norm_b);
        io.logits = ggml_mul_mat(c, output, x);                                              // [n_vocab, n or 1]
        ggml_set_output(io.logits);
        ggml_build_forward_expand(gf, io.logits);
        return gf;
    }

    // Intermediate results of one micro-batch stay under this (and so does ggml_mul_mat_id's
    // work area, which grows with vertices x ball size x tokens: 3.5 GB for d = 10, r = 6 and 512
    // tokens in one batch).
    static constexpr size_t kBatchBudget = 256u << 20;

    void eval(const int32_t * tokens, int n, int radius, bool experts, bool all_logits, float * logits,
              int32_t * vertices) {
        if (n <= 0) throw error(fmt("%d tokens; expected at least 1", n));
        if (n_past + n > n_ctx)
            throw error(fmt("%d cached + %d new tokens exceed the context of %d; reset first", n_past, n, n_ctx));
        for (int i = 0; i < n; ++i)
            if (tokens[i] < 0 || tokens[i] >= n_vocab)
                throw error(fmt("token %d (at %d) is outside the vocabulary of %d", tokens[i], i, n_vocab));
        if (!dim && (experts || radius >= 0))
            throw error(fmt("%s has no hypercube metadata, so it cannot be routed; convert it with --hypercube-dim", path.c_str()));
        const bool routed = dim && (experts || (radius >= 0 && radius < dim));
        const int r = !routed ? -1 : (radius < 0 || radius > dim ? dim : radius);
        const int ubatch = (int) std::max<size_t>(1, std::min<size_t>(n, kBatchBudget / bytes_per_token(r, experts)));
        const int n_past0 = n_past;
        try {
            for (int i0 = 0; i0 < n; i0 += ubatch) {
                const int u = std::min(ubatch, n - i0);
                const bool last = i0 + u == n;
                float * out = !logits ? nullptr : all_logits ? logits + (size_t) i0 * n_vocab : last ? logits : nullptr;
                eval_batch(tokens + i0, u, radius, experts, all_logits, out, vertices ? vertices + i0 : nullptr, n);
            }
        } catch (...) {
            n_past = n_past0;  // a failed call leaves the cache as it was
            throw;
        }
    }

    // One micro-batch of u tokens; vertices (layer-major, row stride `stride`) at this batch's offset.
    void eval_batch(const int32_t * tokens, int u, int radius, bool experts, bool all_logits, float * logits,
                    int32_t * vertices, int stride) {
        const int n_kv = padded_kv(u);
        const graph_key k = {u, radius, n_kv, experts, all_logits, vertices != nullptr};
        if (!cached_gf || !(k == cached_key)) {
            if (gctx) ggml_free(gctx);
            cached_gf = nullptr;
            ggml_init_params p = {ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false), nullptr, true};
            gctx = ggml_init(p);
            if (!gctx) throw error("cannot allocate the graph's context");
            cached_io = graph_io();
            ggml_cgraph * gf = build(gctx, u, n_kv, radius, experts, all_logits, vertices != nullptr, cached_io);
            ggml_backend_sched_reset(sched);
            if (!ggml_backend_sched_alloc_graph(sched, gf)) throw error("cannot allocate the compute graph");
            cached_gf = gf;
            cached_key = k;
            ++n_builds;
        }
        const graph_io & io = cached_io;
        std::vector<int32_t> pos(u);
        std::vector<int64_t> idx(u), v_idx((size_t) u * n_embd);
        for (int i = 0; i < u; ++i) {
            pos[i] = n_past + i, idx[i] = n_past + i;
            for (int e = 0; e < n_embd; ++e) v_idx[(size_t) i * n_embd + e] = (int64_t) e * n_ctx + n_past + i;
        }
        std::vector<float> mask((size_t) n_kv * u);
        for (int i = 0; i < u; ++i)
            for (int j = 0; j < n_kv; ++j) mask[(size_t) i * n_kv + j] = j <= n_past + i ? 0.0f : -INFINITY;
        ggml_backend_tensor_set(io.tokens, tokens, 0, u * sizeof(int32_t));
        ggml_backend_tensor_set(io.pos, pos.data(), 0, u * sizeof(int32_t));
        ggml_backend_tensor_set(io.kv_idx, idx.data(), 0, u * sizeof(int64_t));
        ggml_backend_tensor_set(io.v_idx, v_idx.data(), 0, v_idx.size() * sizeof(int64_t));
        ggml_backend_tensor_set(io.mask, mask.data(), 0, mask.size() * sizeof(float));
        if (ggml_backend_sched_graph_compute(sched, cached_gf) != GGML_STATUS_SUCCESS) {
            cached_gf = nullptr;  // rebuilt next time
            throw error("graph computation failed");
        }
        n_past += u;
        if (logits) ggml_backend_tensor_get(io.logits, logits, 0, ggml_nbytes(io.logits));
        if (vertices)
            for (size_t il = 0; il < io.vertex.size(); ++il)
                ggml_backend_tensor_get(io.vertex[il], vertices + il * stride, 0, u * sizeof(int32_t));
    }
};

// ---- C ABI ------------------------------------------------------------------------------------
extern "C" {

const char * g2c_last_error(void) { return g_error.c_str(); }

g2c_engine * g2c_load(const char * path, int32_t n_ctx, int32_t n_threads, const char * device, const char * kv_type,
                      int32_t repack) {
    g_error.clear();
    auto e = std::make_unique<g2c_engine>();
    try {
        e->path = path ? path : "";
        const std::string kv = kv_type ? kv_type : "f16";
        if (kv == "f16") e->kv_type = GGML_TYPE_F16;
        else if (kv == "f32") e->kv_type = GGML_TYPE_F32;
        else throw error(fmt("KV cache type '%s'; expected f16 or f32", kv.c_str()));
        e->repack = repack != 0;
        FILE * f = fopen(e->path.c_str(), "rb");
        if (!f) throw error(fmt("%s: no such file", e->path.c_str()));
        fclose(f);
        gguf_init_params gp = {true, &e->wctx};
        e->gguf = gguf_init_from_file(e->path.c_str(), gp);
        if (!e->gguf) throw error(fmt("%s: not a valid GGUF file (ggml's reader refused it)", e->path.c_str()));
        e->read_hparams();
        e->n_ctx = n_ctx > 0 ? n_ctx : e->n_ctx_train;
        if (e->n_ctx > e->n_ctx_train)
            throw error(fmt("%s: context %d exceeds the model's %d positions", e->path.c_str(), e->n_ctx, e->n_ctx_train));
        e->map_tensors();
        std::vector<float> rw, rb;
        e->read_hypercube(rw, rb);
        e->init_backend(device ? device : "cpu", n_threads);
        e->load_weights(rw, rb);
        ggml_backend_t bk[2] = {e->backend, e->cpu};
        e->sched = ggml_backend_sched_new(bk, nullptr, e->backend == e->cpu ? 1 : 2, e->graph_size, false, false);
        if (!e->sched) throw error("cannot create the ggml scheduler");
        return e.release();
    } catch (const std::exception & ex) {
        g_error = ex.what();
        return nullptr;
    }
}

void g2c_free(g2c_engine * e) { delete e; }
int32_t g2c_n_vocab(const g2c_engine * e) { return e->n_vocab; }
int32_t g2c_n_ctx(const g2c_engine * e) { return e->n_ctx; }
int32_t g2c_n_layer(const g2c_engine * e) { return e->n_layer; }
int32_t g2c_n_past(const g2c_engine * e) { return e->n_past; }
int32_t g2c_cube_dim(const g2c_engine * e) { return e->dim; }
int32_t g2c_n_graph_builds(const g2c_engine * e) { return e->n_builds; }
int32_t g2c_n_repacked(const g2c_engine * e) { return e->n_repacked; }
const char * g2c_backend_name(const g2c_engine * e) { return ggml_backend_name(e->backend); }
void g2c_reset(g2c_engine * e) { e->n_past = 0; }

int32_t g2c_eval(g2c_engine * e, const int32_t * tokens, int32_t n, int32_t radius, int32_t experts,
                 int32_t all_logits, float * logits, int32_t * vertices) {
    g_error.clear();
    try {
        e->eval(tokens, n, radius, experts != 0, all_logits != 0, logits, vertices);
        return 0;
    } catch (const std::exception & ex) {
        g_error = ex.what();
        return -1;
    }
}

}  // extern "C"
