"""Generation: the sampler, its KV cache, token selection and the CUDA-graph decode step."""
