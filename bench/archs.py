"""Real architectures' configs for the GPU benches (random weights: speed and memory do not
depend on their values)."""

# The real configs (Hugging Face config.json values). Mistral-7B's sliding window (4096 in
# v0.1, none in v0.2/v0.3) never binds at 2048 tokens, so it is left out.
ARCHS = {
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=32768, sliding_window=None,
                       tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    # Llama-2-13B (13.0B parameters): the >= 13B model FSDP-QLoRA is measured on.
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120,
                        intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, rope_theta=10000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=4096, tie_word_embeddings=False),
    # For `--suite cpu-check` only: the whole driver on a CPU in seconds, before any GPU time.
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=4096, tie_word_embeddings=False),
}
