"""The train fast path: fused LoRA branches, decoder layers as CUDA graphs, varlen attention."""
