"""Named model sizes, as plain keyword arguments of `DiffuAprielConfig` (`DiffuAprielConfig.from_preset(name)`).

The three 1.3B presets are parameter-matched (GPT-2 vocabulary plus the mask token, tied embeddings), so that
their speed and quality compare like for like; `tests/test_config.py` checks the counts stated here:

| preset               | layers                     | parameters    |
|----------------------|----------------------------|---------------|
| `diffuapriel-1.3b`   | 20 bidirectional Mamba-2   | 1,388,559,872 |
| `diffuapriel-h-1.3b` | 18 Mamba-2 + 4 attention   | 1,377,453,824 |
| `diffutran-1.3b`     | 24 attention               | 1,336,154,112 |
| `diffuapriel-240m`   | 12 bidirectional Mamba-2   |   247,639,296 |
| `diffuapriel-8m`     | 6 bidirectional Mamba-2    |     8,617,280 |
| `diffutran-8m`       | 6 attention                |     8,523,008 |

Each but `tiny` has a block diffusion variant named with `-block` (`block_size` 32, the block length generation
uses; BD3-LM's training and an exact cache in generation): the same weights, so the same counts:

| preset                     | layers                     | parameters    |
|----------------------------|----------------------------|---------------|
| `diffuapriel-1.3b-block`   | 20 bidirectional Mamba-2   | 1,388,559,872 |
| `diffuapriel-h-1.3b-block` | 18 Mamba-2 + 4 attention   | 1,377,453,824 |
| `diffutran-1.3b-block`     | 24 attention               | 1,336,154,112 |
| `diffuapriel-240m-block`   | 12 bidirectional Mamba-2   |   247,639,296 |
| `diffuapriel-8m-block`     | 6 bidirectional Mamba-2    |     8,617,280 |
| `diffutran-8m-block`       | 6 attention                |     8,523,008 |

The two 8M presets (a 4,096-token byte-level BPE vocabulary) are the size of the default model shipped in the
package, trained on the Python standard library (benchmarks/default_model/), and of its DiffuTran baseline.

The larger Mamba presets take SSD chunks of 128 tokens rather than mamba-ssm's 256 (the result does not depend on
it): on an H200 mamba-ssm's forward took 2.68 vs 2.77 ms at 64K tokens, and forward + backward 10.8 vs 11.3 ms
(benchmarks/results/ssd_chunk_size.json).
"""

# The two layer kinds, in transformers' vocabulary (the entries of `DiffuAprielConfig.layer_types`). They are defined
# here because this module is plain data and imports nothing: the configuration imports it, and them.
MAMBA = "linear_attention"
ATTENTION = "full_attention"

GPT2_VOCAB_WITH_MASK = 50258  # GPT-2's 50,257 tokens and [MASK] = 50257
GPT2_SPECIAL = dict(mask_token_id=50257, eos_token_id=50256, bos_token_id=50256, pad_token_id=50256)


def _hybrid_layer_types(num_layers: int, attention_every: int) -> list[str]:
    """One attention layer after every `attention_every` Mamba layers, and one last attention layer."""
    types = [ATTENTION if (i + 1) % (attention_every + 1) == 0 else MAMBA for i in range(num_layers)]
    types[-1] = ATTENTION
    return types


PRESETS = {
    "tiny": dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_state=8, mamba_d_head=8, mamba_n_groups=1, mamba_chunk_size=8,
        max_position_embeddings=256, mask_token_id=95, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "diffuapriel-8m": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=6, intermediate_size=512, num_attention_heads=8,
        mamba_d_state=64, mamba_d_head=32, mamba_chunk_size=128, max_position_embeddings=1024,
    ),
    "diffutran-8m": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=6, intermediate_size=1280, num_attention_heads=8,
        layer_types=[ATTENTION] * 6, max_position_embeddings=1024,
    ),
    "diffuapriel-240m": dict(
        vocab_size=GPT2_VOCAB_WITH_MASK, hidden_size=1024, num_hidden_layers=12, intermediate_size=1024,
        num_attention_heads=16, mamba_d_state=128, mamba_d_head=64, mamba_chunk_size=128, **GPT2_SPECIAL,
    ),
    "diffuapriel-1.3b": dict(
        vocab_size=GPT2_VOCAB_WITH_MASK, hidden_size=2048, num_hidden_layers=20, intermediate_size=2048,
        num_attention_heads=16, mamba_d_state=128, mamba_d_head=64, mamba_chunk_size=128, **GPT2_SPECIAL,
    ),
    "diffuapriel-h-1.3b": dict(
        vocab_size=GPT2_VOCAB_WITH_MASK, hidden_size=2048, num_hidden_layers=22, intermediate_size=2048,
        layer_types=_hybrid_layer_types(22, attention_every=5), num_attention_heads=16,
        mamba_d_state=128, mamba_d_head=64, mamba_chunk_size=128, **GPT2_SPECIAL,
    ),
    "diffutran-1.3b": dict(
        vocab_size=GPT2_VOCAB_WITH_MASK, hidden_size=2048, num_hidden_layers=24, intermediate_size=5632,
        layer_types=[ATTENTION] * 24, num_attention_heads=16, **GPT2_SPECIAL,
    ),
}

# The block diffusion variants of the table above (their weights are the same shapes).
BLOCK_SIZE = 32
PRESETS.update({f"{name}-block": {**fields, "block_size": BLOCK_SIZE} for name, fields in list(PRESETS.items())
                if name != "tiny"})


__all__ = ["ATTENTION", "BLOCK_SIZE", "MAMBA", "PRESETS"]
