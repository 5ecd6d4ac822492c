"""Tiny random-weight causal LMs for every architecture transformers maps to a causal LM.

`build_tiny(model_type, vocab_size)` makes a model of each `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`
entry from its config class's defaults, shrunk by generic overrides (applied only where the config
has the field, aliases included) plus per-family fixes. Per-layer lists (`layer_types`,
`mlp_layer_types`, ...) are rebuilt for the new depth keeping the default pattern and every kind
of layer; sliding windows are set to `window` and switched on. `char_tokenizer()` is a
character-level tokenizer to drive them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import torch
import transformers
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ARCHITECTURES: list[str] = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


class Unbuildable(Exception):
    """A tiny model of this architecture cannot be built; the message says why."""


# --- tokenizer -------------------------------------------------------------------------------

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]  # ids 0, 1, 2, 3
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


@functools.cache
def char_tokenizer():
    """One token per character (printable ASCII, newline, tab), BOS prepended, lossless decode.

    No normalizer and no prefix space; the pre-tokenizer isolates every character, so splitting a
    text never changes how its parts tokenize. Characters outside the vocabulary become <unk>.
    Caveat: the literal strings "<s>", "</s>", "<pad>", "<unk>" in a text match the special tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()  # join the pieces with nothing in between
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


# --- sizes -------------------------------------------------------------------------------------

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN, EXPERT_FFN = 64, 2, 4, 2, 16, 128, 32
MAX_LAYERS = 8  # cap for "enough layers to hold every layer kind" (prefix of the default pattern)

# Generic overrides: canonical name -> value, applied where the config has the field (directly or
# through its attribute_map). Names that are only fields of some families are listed too.
_GENERIC: dict[str, object] = {
    # widths
    "hidden_size": HIDDEN,
    "n_embd": HIDDEN,
    "d_model": HIDDEN,
    "emb_dim": HIDDEN,
    "dim": HIDDEN,
    "embed_dim": HIDDEN,
    "word_embed_proj_dim": HIDDEN,
    "hidden_size_global": HIDDEN,
    # depth
    "num_hidden_layers": LAYERS,
    "n_layer": LAYERS,
    "n_layers": LAYERS,
    "num_layers": LAYERS,
    "encoder_layers": LAYERS,
    "decoder_layers": LAYERS,
    "num_encoder_layers": LAYERS,
    "num_decoder_layers": LAYERS,
    # heads
    "num_attention_heads": HEADS,
    "n_head": HEADS,
    "n_heads": HEADS,
    "num_heads": HEADS,
    "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "num_encoder_attention_heads": HEADS,
    "num_decoder_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    # feed-forward
    "intermediate_size": FFN,
    "ffn_dim": FFN,
    "encoder_ffn_dim": FFN,
    "decoder_ffn_dim": FFN,
    "n_inner": FFN,
    "d_ff": FFN,
    "ffn_hidden_size": FFN,
    "moe_intermediate_size": EXPERT_FFN,
    "shared_expert_intermediate_size": EXPERT_FFN,
    "expert_ffn_hidden_size": EXPERT_FFN,
    "shared_experts_intermediate_size": EXPERT_FFN,
    "moe_shared_expert_intermediate_size": EXPERT_FFN,
    "dim_ff": FFN,
    "dff": FFN,
    "d_inner": FFN,
    "mlp_dim": FFN,
    "dense_intermediate_size": FFN,
    "shared_intermediate_size": EXPERT_FFN,
    "dim_head": HEAD_DIM,
    # experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "top_k_experts": 2,
    "num_experts_per_token": 2,
    "moe_top_k": 2,
    "zero_expert_num": 2,
    # the first layers dense, the others mixture-of-experts: one dense layer
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    "moe_layer_start_index": 1,
    # positions
    "max_position_embeddings": 512,
    "n_positions": 512,
    "max_seq_len": 512,
    "context_length": 512,
    "n_ctx": 512,
    # multi-head latent attention
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "o_lora_rank": 16,
    "o_groups": 2,
    # sparse-attention indexers (DeepSeek V3.2 style): small, but keeping every key up to
    # max_position_embeddings. A budget below the prompt length would exercise the selection, but
    # the ReLU index scores of a random model tie (at 0) a lot, and top-k then breaks ties
    # differently for different shapes (prefill vs decode), so the outputs would depend on how a
    # prompt is fed.
    "index_n_heads": 4,
    "index_head_dim": 16,
    "index_topk": 512,
    "index_block_size": 4,
    "index_topk_blocks": 128,
    # relative position buckets (CPM-Ant)
    "position_bias_num_buckets": 32,
    "position_bias_max_distance": 128,
    # state-space / linear-attention / conv mixers
    "mamba_d_state": 8,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_n_groups": 1,
    "mamba_chunk_size": 16,
    "mamba_dt_rank": 8,
    "mamba_expand": 2,
    "mamba_headdim": 16,
    "mamba_ngroups": 1,
    "n_mamba_heads": 8,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "ssm_state_size": 8,
    "state_size": 8,
    "n_groups": 1,
    "chunk_size": 16,
    "time_step_rank": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    # separate sizes for the sliding-window layers (Inkling)
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": KV_HEADS,
    "swa_head_dim": HEAD_DIM,
    # partial rotary as an absolute size (GPT-J, CodeGen)
    "rotary_dim": 8,
}

# Fields where None means "feature off" (keep it) rather than "derive it".
_KEEP_NONE = {
    "q_lora_rank",
    "rotary_dim",
    "n_shared_experts",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_intermediate_size",
    "top_k_experts",
}
# Per-layer lists that are not layer kinds (do not drive the depth).
_NOT_KINDS = {
    "intermediate_size",
    "activation_sparsity_pattern",
    "layer_rope_theta",
    "num_attention_heads_per_layer",
}
# Lists of layer indices (not one entry per layer): left to the config or to the family overrides.
_INDEX_LISTS = {
    "full_attn_idxs",
    "moe_layers",
    "hybrid_layer_ids",
    "mlp_only_layers",
    "attn_layer_indices",
}
# Sub-configs that get the vocabulary and token ids.
_TEXT_SUBCONFIGS = {"text_config", "decoder", "decoder_config", "encoder_config", "patcher_config"}
# Encoder architectures whose causal-LM class is the encoder run as a decoder (is_decoder=True).
_ENCODERS_AS_DECODERS = {
    "bert",
    "bert-generation",
    "big_bird",
    "camembert",
    "data2vec-text",
    "electra",
    "ernie",
    "megatron-bert",
    "rembert",
    "roberta",
    "roberta-prelayernorm",
    "roc_bert",
    "roformer",
    "xlm-roberta",
    "xlm-roberta-xl",
    "xmod",
    "reformer",
}
# Families with a sliding_window field whose layers cannot be made "sliding_attention".
_NO_SWA_LAYERS = {"minimax"}


@functools.cache
def _settable(cls) -> frozenset[str]:
    """Names config class `cls` takes as kwargs: its fields, and attributes its __post_init__
    sets."""
    return frozenset({f.name for f in dataclasses.fields(cls)} | set(cls().__dict__))


def _resolve(cls, name: str) -> str | None:
    """The name under which config class `cls` takes `name` (following attribute_map), or None."""
    real = getattr(cls, "attribute_map", {}).get(name, name)
    if real in _settable(cls):
        return real
    return name if name in _settable(cls) else None


# --- per-family fixes ----------------------------------------------------------------------------

# Plain kwargs applied after the generic ones (real field names or attribute_map aliases); a key
# "family.sub" applies to that family's sub-config `sub`.
_OVERRIDES: dict[str, dict] = {
    # hybrids: the default configs hold no (or too few) attention layers; put one of each kind in
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"num_hidden_layers": 3},  # block pattern: recurrent, recurrent, attention
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {
        "num_hidden_layers": 3,
        "layer_types": ["conv", "full_attention", "conv"],
        "num_dense_layers": 1,
    },
    "falcon_h1": {"mamba_d_ssm": 128},  # = mamba_n_heads * mamba_d_head
    "mamba2": {"num_heads": 8, "head_dim": 16},  # num_heads * head_dim = expand * hidden_size
    # the default enables MoE without sizes
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "zaya": {"num_experts_per_tok": 1, "layer_types": ["hybrid", "hybrid_sliding"]},
    # input/recurrent/output stacks must add up
    "dory": {
        "num_hidden_layers": 4,
        "n_input_layers": 1,
        "n_recurrent_layers": 2,
        "n_output_layers": 1,
        "layer_types": [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
    },
    "longcat_flash": {"num_layers": 1},  # num_hidden_layers = 2 * num_layers
    "roc_bert": {
        "shape_vocab_size": 64,
        "shape_embed_dim": 16,
        "pronunciation_vocab_size": 64,
        "pronunciation_embed_dim": 16,
    },
    "phi4_multimodal.audio_config": {
        "num_blocks": 1,
        "nemo_conv_channels": HIDDEN,
        "ext_pw_out_channel": HIDDEN,
        "depthwise_separable_out_channel": HIDDEN,
    },
    "cohere_compass_text": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e4},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        }
    },
    "zamba": {
        "num_hidden_layers": 5,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "layers_block_type": None,
    },
    # zamba: [mamba, mamba, hybrid] + [mamba, hybrid]; the shared transformer needs two hybrid
    # layers
    "big_bird": {"attention_type": "original_full"},  # block-sparse attention has no causal mode
    "xlm": {"causal": True},  # XLM's causal-LM mode
    "reformer": {
        "attn_layers": ["local", "lsh"],
        "attention_head_size": HEAD_DIM,
        "axial_pos_shape": (16, 32),
        "axial_pos_embds_dim": (32, 32),
        "feed_forward_size": FFN,
        "lsh_attn_chunk_length": 8,
        "num_buckets": 4,
        # else the LSH rotations are drawn afresh at every forward (note: with a hash_seed,
        # every LSH forward calls torch.manual_seed(hash_seed), resetting the global RNG)
        "hash_seed": 0,
    },
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": HEAD_DIM,
        "indexer_budget": 512,
        "indexer_compress_ratio": 4,
        "hc_lowrank": 8,
    },
    # DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig does not define
    # (and clamps q/k/v with clip_qkv unconditionally, which defaults to None)
    "dbrx.attn_config": {"rope_theta": 10000.0, "kv_n_heads": KV_HEADS, "clip_qkv": 8.0},
    # ProphetNet's position ids start at padding_idx = pad_token_id and its incremental decoding
    # only works when that is 0 (as in the real checkpoints)
    "prophetnet": {"pad_token_id": 0},
    # the sliding-window layers have their own MLA sizes (popped kwargs, not fields)
    "dots3_note_text": {
        "swa_num_attention_heads": HEADS,
        "swa_num_key_value_heads": HEADS,
        "swa_q_lora_rank": 32,
        "swa_kv_lora_rank": 16,
        "swa_head_dim": HEAD_DIM,
        "swa_qk_nope_head_dim": 8,
        "swa_v_head_dim": 16,
    },
    # one codebook, so that a row of input_ids is one sequence
    "musicgen.decoder": {"num_codebooks": 1},
    "musicgen_melody.decoder": {"num_codebooks": 1},
    # xLSTM rounds qk/v widths up to multiples of 64 for its cache but not for its projections:
    # hidden_size * 0.5 must be a multiple of 64
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # adapters map the vision/audio widths to the text width
    "dots3_note.vision_config": {"adapter_in_dim": HIDDEN, "adapter_out_dim": HIDDEN},
    "dots3_note.audio_config": {
        "adapter_input_size": HIDDEN,
        "adapter_out_dim": HIDDEN,
        "downsample_hidden_size": 32,
    },
}

# Functions (kwargs, default_config, window) -> None that fix up kwargs in place, after _OVERRIDES.
_FIXUPS: dict[str, object] = {}


def _fixup(*names):
    def register(fn):
        for n in names:
            _FIXUPS[n] = fn
        return fn

    return register


@_fixup("gpt_neo")
def _gpt_neo(kw, cfg, window):
    kw.update(attention_types=[[["global", "local"], 1]], window_size=window)


@_fixup("gemma4_text", "gemma4_unified_text")
def _gemma4(kw, cfg, window):
    kw.update(
        global_head_dim=HEAD_DIM,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=kw["vocab_size"],
    )


@_fixup("gemma3n_text")
def _gemma3n(kw, cfg, window):
    # 5 sliding : 1 full; the last layer reuses the KV cache of an earlier one of its kind
    kw.update(
        num_hidden_layers=6,
        num_kv_shared_layers=1,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=kw["vocab_size"],
        laurel_rank=8,
    )


@_fixup("blt")
def _blt(kw, cfg, window):
    # num_hidden_layers: not a BltConfig field, but DynamicCache(config=BltConfig) reads it
    kw.update(
        encoder_hash_byte_group_vocab=64, local_attention_window_len=window, num_hidden_layers=2
    )


@_fixup("reformer")
def _reformer(kw, cfg, window):
    kw["local_attn_chunk_length"] = window  # local attention: the current and the previous chunk


# Things to do to a built model before use.
_POST_BUILD: dict[str, object] = {
    "xmod": lambda m: m.set_default_language("en_XX"),  # adapters are per language
    # the delay pattern is filled with decoder_start_token_id (the pad token in the real
    # checkpoints)
    # (and MusicgenForCausalLM.generate expands by num_return_sequences, which defaults to None)
    "musicgen": lambda m: m.generation_config.update(
        decoder_start_token_id=m.config.pad_token_id, num_return_sequences=1
    ),
    "musicgen_melody": lambda m: m.generation_config.update(
        decoder_start_token_id=m.config.pad_token_id, num_return_sequences=1
    ),
}


# Architectures whose tiny model cannot be built, with the reason.
_DRAFTER = (
    "speculative-decoding drafter: its forward needs the target model's inputs_embeds and "
    "shared_kv_states, so it cannot run generate on its own"
)
_UNBUILDABLE: dict[str, str] = {
    "gemma4_assistant": "Gemma4AssistantForCausalLM is a " + _DRAFTER,
    "gemma4_unified_assistant": "Gemma4UnifiedAssistantForCausalLM is a " + _DRAFTER,
}


# Architectures that need an optional package: model type -> (package, what needs it).
_REQUIRES: dict[str, tuple[str, str]] = {
    "gemma3n": (
        "timm",
        "multimodal: Gemma3nForConditionalGeneration's vision tower is a TimmWrapperModel; "
        "the text model is tested as gemma3n_text",
    ),
}


# --- building ------------------------------------------------------------------------------------


def _default_config(model_type: str) -> PretrainedConfig:
    return CONFIG_MAPPING[model_type]()


def _per_layer_fields(cfg: PretrainedConfig, n_default: int) -> list[str]:
    """Fields of `cfg` holding one entry per layer (lists as long as the default depth)."""
    out = []
    for f in dataclasses.fields(cfg):
        v = cfg.__dict__.get(f.name)
        if isinstance(v, list) and len(v) == n_default:
            out.append(f.name)
    return out


def _depth_for(lists: list[list], minimum: int) -> int:
    """Smallest prefix of the default per-layer lists that holds every kind of each list."""
    n = minimum
    for lst in lists:
        kinds = {repr(x) for x in lst}
        seen: set[str] = set()
        for i, x in enumerate(lst):
            seen.add(repr(x))
            if seen == kinds:
                n = max(n, i + 1)
                break
    return n


def _get(cfg: PretrainedConfig, name: str):
    """cfg.name, or None; per-layer attributes (which may not be read globally) count as unset."""
    try:
        return getattr(cfg, name, None)
    except Exception:
        return cfg.__dict__.get(name)


def _generic_kwargs(cfg: PretrainedConfig, vocab_size: int | None, window: int) -> dict:
    """The generic overrides for `cfg`: sizes, token ids, sliding window."""
    cls = type(cfg)
    kw: dict = {}
    for name, value in _GENERIC.items():
        real = _resolve(cls, name)
        if real is None:
            continue
        current = _get(cfg, real)
        if (current is None and name in _KEEP_NONE) or isinstance(current, list):
            continue  # None: feature off; lists: per-layer, rebuilt later
        kw[real] = value
    if _resolve(cls, "kv_lora_rank"):
        # multi-head latent attention: one key/value head per query head; head_dim is the rope part
        kw[_resolve(cls, "num_key_value_heads") or "num_key_value_heads"] = HEADS
        if _resolve(cls, "head_dim"):
            kw[_resolve(cls, "head_dim")] = _GENERIC["qk_rope_head_dim"]
    if vocab_size is not None and _resolve(cls, "vocab_size"):
        kw[_resolve(cls, "vocab_size")] = vocab_size
        if _resolve(cls, "unpadded_vocab_size"):
            kw["unpadded_vocab_size"] = vocab_size
        tok = char_tokenizer()
        for name, tid in (
            ("bos_token_id", tok.bos_token_id),
            ("eos_token_id", tok.eos_token_id),
            ("pad_token_id", tok.pad_token_id),
        ):
            if _resolve(cls, name):
                kw[_resolve(cls, name)] = tid
    for name in ("n_group", "topk_group", "num_expert_group"):  # grouped expert routing: one group
        real = _resolve(cls, name)
        if real and _get(cfg, real) is not None:
            kw[real] = 1
    for name in (
        "sliding_window",
        "attention_window_size",
        "sliding_window_size",
    ):  # window on, at `window`
        real = _resolve(cls, name)
        if real:
            kw[real] = window
    if _resolve(cls, "use_sliding_window"):
        kw["use_sliding_window"] = True
    if _get(cfg, "attention_chunk_size") is not None:  # chunked local attention (Llama 4)
        kw["attention_chunk_size"] = window
    return kw


def _tiny_kwargs(
    cfg: PretrainedConfig, families: tuple[str, ...], vocab_size: int | None, window: int
) -> dict:
    """Constructor kwargs that shrink config `cfg` (recursively for its sub-configs).

    Order: generic overrides, sub-configs, the family's overrides and fixups, then the per-layer
    lists the family did not set are rebuilt for the depth (the family's, or the smallest prefix of
    the default pattern holding every kind of layer).
    """
    cls = type(cfg)
    kw = _generic_kwargs(cfg, vocab_size, window)
    for key in getattr(cls, "sub_configs", {}) or {}:
        sub = _get(cfg, key)
        if isinstance(sub, PretrainedConfig):
            text_like = key in _TEXT_SUBCONFIGS
            # a sub-config gets the fixes of its own model type and those keyed "<family>.<key>"
            subs = (sub.model_type, *(f"{f}.{key}" for f in families))
            sub_kw = _tiny_kwargs(sub, subs, vocab_size if text_like else None, window)
            kw[key] = type(sub)(**sub_kw)
    if _ENCODERS_AS_DECODERS.intersection(families):
        kw["is_decoder"] = True  # causal self-attention
    before = dict(kw)
    for family in families:
        for k, v in _OVERRIDES.get(family, {}).items():
            kw[_resolve(cls, k) or k] = v
        if family in _FIXUPS:
            _FIXUPS[family](kw, cfg, window)
    explicit = {k for k in kw if k not in before or kw[k] is not before[k]}

    layers_field = _resolve(cls, "num_hidden_layers")
    n_default = _get(cfg, layers_field) if layers_field else None
    if isinstance(n_default, int) and n_default > 1:
        per_layer = [
            f for f in _per_layer_fields(cfg, n_default) if f not in explicit | _INDEX_LISTS
        ]
        if layers_field in explicit:
            n = kw[layers_field]
        else:
            lists = [_get(cfg, f) for f in per_layer if f not in _NOT_KINDS]
            n = kw[layers_field] = min(_depth_for(lists, kw.get(layers_field, LAYERS)), MAX_LAYERS)
        for f in per_layer:
            kw[f] = [FFN] * n if f == "intermediate_size" else _fit(_get(cfg, f), n)
        lt = kw.get("layer_types")
        if (
            "layer_types" not in explicit
            and lt
            and kw.get("sliding_window")
            and "full_attention" in lt
            and "sliding_attention" not in lt
            and not _NO_SWA_LAYERS.intersection(families)
        ):
            # the default pattern never uses its window: make the last full-attention layer a
            # sliding one so that the window is exercised
            i = len(lt) - 1 - lt[::-1].index("full_attention")
            kw["layer_types"] = lt = lt[:i] + ["sliding_attention"] + lt[i + 1 :]
        if lt and _resolve(cls, "max_window_layers") and "sliding_attention" in lt:
            kw["max_window_layers"] = lt.index(
                "sliding_attention"
            )  # Qwen2 style: sliding from here on
    return kw


def _fit(lst: list, n: int) -> list:
    """The default per-layer list cut to `n`, making sure every kind of entry appears."""
    out = list(lst[:n])
    kinds = list(dict.fromkeys(repr(x) for x in lst))
    missing = [k for k in kinds if k not in {repr(x) for x in out}]
    for k in missing:  # replace entries of the most common kind with the missing ones, from the end
        reprs = [repr(x) for x in out]
        common = max(set(reprs), key=reprs.count)
        i = len(out) - 1 - reprs[::-1].index(common)
        out[i] = next(x for x in lst if repr(x) == k)
    return out


def tiny_config(model_type: str, vocab_size: int, *, window: int = 8) -> PretrainedConfig:
    """The shrunk config of `model_type` (the composite one for multimodal entries)."""
    if model_type in _UNBUILDABLE:
        raise Unbuildable(_UNBUILDABLE[model_type])
    if model_type in _REQUIRES and importlib.util.find_spec(_REQUIRES[model_type][0]) is None:
        package, why = _REQUIRES[model_type]
        raise Unbuildable(f"needs the {package} package, which is not installed ({why})")
    cfg = _default_config(model_type)
    return type(cfg)(**_tiny_kwargs(cfg, (model_type,), vocab_size, window))


def build_tiny(
    model_type: str, vocab_size: int, *, window: int = 8, seed: int = 0, attn: str = "eager"
):
    """A tiny random-weight model of `model_type`'s causal-LM class, float32, in eval mode.

    `attn` is the attention implementation; a class that does not support it (e.g. "sdpa" for Bloom,
    GPT-Neo, Gemma2, gpt-oss, ...) gets its default one: check `model.config._attn_implementation`.
    Raises Unbuildable (with the reason) for the architectures listed in _UNBUILDABLE / _REQUIRES.
    """
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])

    def config_for_class():
        config = tiny_config(model_type, vocab_size, window=window)
        if not isinstance(config, cls.config_class):
            # a composite config mapped to its text model's class (as AutoModelForCausalLM does)
            subs = [_get(config, k) for k in getattr(type(config), "sub_configs", {}) or {}]
            config = next((c for c in subs if isinstance(c, cls.config_class)), config)
        return config

    config = config_for_class()
    torch.manual_seed(seed)
    try:
        model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    except ValueError as e:
        if "does not support" not in str(e):
            raise
        config = config_for_class()  # the failed attempt marked the config with `attn`
        torch.manual_seed(seed)
        model = cls._from_config(
            config, dtype=torch.float32
        )  # no `attn` support: the class's default
    if model_type in _POST_BUILD:
        _POST_BUILD[model_type](model)
    return model.float().eval()


def path_table() -> str:
    """A markdown table: every architecture, its class, and the engine path `auto` picks for its
    tiny model with the reason (or why it cannot be built or run)."""
    import logging

    from eqtools.engine import EngineError, Generator

    tok = char_tokenizer()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("eqtools.engine").addHandler(handler)
    logging.getLogger("eqtools.engine").setLevel(logging.INFO)
    rows = ["| model type | class | path | why |", "|---|---|---|---|"]
    for model_type in ARCHITECTURES:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        try:
            model = build_tiny(model_type, len(tok))
            Generator(model, tok, max_new_tokens=4)
            path, why = (
                records[-1].split(" path for ", 1)[0].rsplit(" ", 1)[-1],
                records[-1].split(" (", 1)[1][:-1],
            )
        except Unbuildable as e:
            path, why = "not checked", str(e)
        except EngineError as e:
            path, why = "refused", str(e)
        rows.append(f"| {model_type} | {cls} | {path} | {why.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/archs.py > table.md
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
    torch.set_num_threads(1)
    print(path_table())
