"""One rank of the sharded-inference test: mlx-lm's sharded_load, then attach a memory."""

import sys

import mlx.core as mx
import numpy as np
from mlx_lm.utils import sharded_load

from mlx_knnmoe import KNNConfig, attach

model_dir, memory_path, mode, out = sys.argv[1:5]
group = mx.distributed.init()
tensor = group if mode == "tensor" else None
pipeline = group if mode == "pipeline" else None
model, tokenizer = sharded_load(model_dir, pipeline, tensor)
attach(model, memory_path, KNNConfig(mix="union", lambda_scale=0.7))
tokens = mx.array([tokenizer.encode("The patient presents with fever and cough.")])
logits = model(tokens)
mx.eval(logits)
if group.rank() == 0:
    np.save(out, np.array(logits.astype(mx.float32)))
print(f"rank {group.rank()} ok", flush=True)
