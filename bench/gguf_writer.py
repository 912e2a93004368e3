"""Writes an HF Llama or Qwen2 checkpoint that uses SmolLM2's tokenizer (the tests' tiny models,
bench/make_model.py's shapes) as a GGUF file the way llama.cpp's converter does: llama.cpp tensor
names, Llama's q/k rows permuted for its rotary layout, norms and biases in F32 and the matrices
in the asked type (F16, Q8_0, Q4_0 through the gguf package's quantizers), and the tokenizer with
its chat template copied from the embedded SmolLM2 GGUF, its token list padded with [PAD<i>]
tokens up to the model's vocabulary size (as the converter pads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
         "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[module]}.{kind}"


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of a Llama q/k projection's rows (transformers undoes it)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]) \
        .swapaxes(1, 2).reshape(weights.shape)


def write_gguf(hf_dir: Path, path: Path, qtype: str) -> Path:
    """hf_dir's model as a GGUF at `path`; qtype: "F16", "Q8_0", "Q4_0" or "Q4_K" (matrices
    whose rows are not whole 256-weight blocks in Q8_0, as llama.cpp falls back)."""
    import gguf

    from worker.gguf_import import find_default_gguf

    config = json.loads((hf_dir / "config.json").read_text())
    arch = config["model_type"]  # "llama" / "qwen2": llama.cpp's names too
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_vocab_size(config["vocab_size"])
    source = gguf.GGUFReader(find_default_gguf())
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            pad = config["vocab_size"] - len(value) if key.endswith((".tokens", ".token_type")) \
                else 0
            if key.endswith(".tokens") and pad > 0:
                value = value + [f"[PAD{i}]" for i in range(len(value), config["vocab_size"])]
            elif key.endswith(".token_type") and pad > 0:
                value = value + [int(gguf.TokenType.UNUSED)] * pad
            writer.add_key_value(key, value, vtype, sub)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for name, tensor in load_file(hf_dir / "model.safetensors").items():
        tensor = tensor.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            tensor = permute(tensor, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            tensor = permute(tensor, kv_heads)
        if tensor.ndim == 1:  # norms and biases stay float32, as llama.cpp keeps them
            writer.add_tensor(gguf_name(name), tensor)
        elif qt == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name(name), tensor.astype(np.float16))
        elif qt == gguf.GGMLQuantizationType.Q4_K:
            if tensor.shape[1] % QK_K:  # as llama.cpp's fallback for rows K-quants cannot take
                q8 = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(gguf_name(name), gguf.quants.quantize(tensor, q8), raw_dtype=q8)
            else:
                writer.add_tensor(gguf_name(name), quantize_q4_k(tensor), raw_dtype=qt)
        else:
            # the quantized bytes; the writer derives the element shape from raw_dtype
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(tensor, qt), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


QK_K = 256  # weights per K-quant super-block


def quantize_q4_k(weights: np.ndarray) -> np.ndarray:
    """[rows, cols] float32 -> GGUF Q4_K bytes [rows, cols / 256 * 144] (the gguf package only
    dequantizes K-quants). Per super-block of 256: fp16 d and dmin, 12 bytes of 6-bit scales and
    mins for its 8 sub-blocks of 32, 128 bytes of 4-bit q; w = d * sc * q - dmin * m. A plain
    min/max fit per sub-block (llama.cpp searches for better ones: same format, more error)."""
    rows, cols = weights.shape
    sub = weights.reshape(-1, 8, 32).astype(np.float32)             # [blocks, 8, 32]
    low = np.minimum(sub.min(axis=2), 0.0)                          # offsets are subtracted
    scale = (sub.max(axis=2) - low) / 15                            # [blocks, 8]
    d = (scale.max(axis=1) / 63).astype(np.float16)                 # [blocks]
    dmin = ((-low).max(axis=1) / 63).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63)
    m = np.clip(np.round(np.divide(-low, dmin32, out=np.zeros_like(low), where=dmin32 > 0)),
                0, 63)
    step = (d32 * sc)[:, :, None]
    q = np.round(np.divide(sub + (dmin32 * m)[:, :, None], step, out=np.zeros_like(sub),
                           where=step > 0))
    q = np.clip(q, 0, 15).astype(np.uint8)                          # [blocks, 8, 32]
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = np.zeros((len(sub), 12), dtype=np.uint8)               # ggml's get_scale_min_k4
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(sub), 128)    # chunk c: sub-blocks 2c, 2c+1
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                             scales, qs], axis=1)                    # [blocks, 144]
    return blocks.reshape(rows, cols // QK_K * 144)
