"""One-line patches that run spell_kernels inside other frameworks. Each submodule imports its
framework only when it is imported itself, and a missing framework names the extra to install:
  transformers  attention + log-prob head for Llama / Qwen2 / Qwen3   pip install 'spell-kernels[transformers]'
  verl          the linear_cross_entropy contract of verl's fused-kernel hook (no verl import needed)
  trl           GRPOTrainer patch                                    pip install 'spell-kernels[trl]'
"""
