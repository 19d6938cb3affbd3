"""The model configuration: one typed dataclass, named presets, and Hugging Face `config.json` I/O.

Field names are those of the Hugging Face DeepSeek-V3 `config.json`, so a released checkpoint's config
reads in without a translation table. A few fields that config.json does not carry (the routing score
function, the balancing and MTP loss coefficients) have DeepSeek-V3's values as defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Self

from nanoseek.errors import NanoseekError


class ConfigError(NanoseekError, ValueError):
    """An invalid configuration; the message names the offending field."""


def require(config: Any, ok: bool, name: str, why: str, kind: str = "config field") -> None:
    """Unless ok, raise a ConfigError naming the field `name` of config, its value, and why it is wrong."""
    if not ok:
        raise ConfigError(f"invalid {kind} '{name}' = {getattr(config, name)!r}: {why}")


@dataclass
class YarnScaling:
    """YaRN context extension as DeepSeek-V2/V3 configure it (`rope_scaling` with type "yarn")."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


class ConfigFile:
    """config.json I/O shared by the model configs: save (to_hf_dict), load (from_hf_dict, errors naming the file),
    replace."""

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Self:
        path, d = _read_config_json(path)
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


@dataclass
class ModelConfig(ConfigFile):
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # FFN width of the first `first_k_dense_replace` (dense) layers
    moe_intermediate_size: int = 2048  # FFN width of one routed or shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # Multi-head Latent Attention
    q_lora_rank: int | None = 1536  # None: queries are projected directly, without compression
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    # Multi-Token Prediction depth D (0 switches MTP off)
    num_nextn_predict_layers: int = 1
    # Positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = field(default_factory=YarnScaling)
    rope_interleave: bool = True  # released V3 weights rotate interleaved pairs (x0, x1), (x2, x3), ...
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1
    # Training coefficients: the sequence-wise balance loss alpha (0.0001 in the V3 paper), and two that
    # config.json does not carry: the bias update speed gamma of auxiliary-loss-free balancing and the MTP
    # loss weight lambda.
    aux_loss_alpha: float = 0.0001
    bias_update_speed: float = 0.001
    mtp_loss_weight: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _yarn_from_dict(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace) if self.n_routed_experts else 0

    def is_moe_layer(self, layer_id: int) -> bool:
        """MTP blocks (layer_id >= num_hidden_layers) are MoE too, as in DeepSeek-V3."""
        return self.n_routed_experts > 0 and layer_id >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 (the attention-entropy correction for long context)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        need = partial(require, self)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("intermediate_size", "moe_intermediate_size", "qk_nope_head_dim", "n_routed_experts",
                     "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an integer >= 0")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be a positive integer, or null for uncompressed queries")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "RoPE rotates pairs, so it must be even")
        need(self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"more dense layers than num_hidden_layers={self.num_hidden_layers}")
        has_dense = self.first_k_dense_replace > 0 or self.n_routed_experts == 0
        need(not has_dense or self.intermediate_size > 0, "intermediate_size", "dense layers need a positive width")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", "must be 'sigmoid' or 'softmax'")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        if self.n_routed_experts:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "experts need a positive width")
            need(isinstance(self.num_experts_per_tok, int) and 1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 "num_experts_per_tok", f"top-k must be between 1 and n_routed_experts={self.n_routed_experts}")
            need(isinstance(self.n_group, int) and self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 "n_group", f"the groups must divide n_routed_experts={self.n_routed_experts}")
            need(isinstance(self.topk_group, int) and 1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be between 1 and n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                 f"{self.topk_group} groups of {per_group} experts hold fewer than top-k={self.num_experts_per_tok}")
            need(self.scoring_func == "softmax" or self.n_group == 1 or per_group >= 2, "n_group",
                 "sigmoid routing scores a group by its top-2 experts, so each group needs at least 2")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0")
        need(0 <= self.bos_token_id < self.vocab_size, "bos_token_id", f"must be a token id below {self.vocab_size}")
        need(0 <= self.eos_token_id < self.vocab_size, "eos_token_id", f"must be a token id below {self.vocab_size}")
        if self.rope_scaling is not None:
            y = self.rope_scaling
            if y.factor <= 0:
                raise ConfigError(f"invalid config field 'rope_scaling.factor' = {y.factor!r}: must be > 0")
            if y.original_max_position_embeddings <= 0:
                raise ConfigError("invalid config field 'rope_scaling.original_max_position_embeddings' = "
                                  f"{y.original_max_position_embeddings!r}: must be > 0")
            if y.beta_fast <= y.beta_slow:
                raise ConfigError(f"invalid config field 'rope_scaling.beta_fast' = {y.beta_fast!r}: must exceed "
                                  f"beta_slow={y.beta_slow}")

    # ------------------------------------------------------------------ Hugging Face config.json
    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
        }
        for f in dataclasses.fields(self):
            if f.name in _NOT_IN_HF_CONFIG:
                continue
            d[f.name] = getattr(self, f.name)
        d["num_key_value_heads"] = self.num_attention_heads
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        # What DeepSeek's own config.json files carry and vLLM's and SGLang's loaders read: the routing method
        # (noaux_tc = sigmoid scores with the balancing bias e_score_correction_bias, group-limited), that every
        # layer past first_k_dense_replace is MoE, and the sequence-wise balance loss.
        d["topk_method"] = ("noaux_tc" if self.scoring_func == "sigmoid"
                            else "group_limited_greedy" if self.n_group > 1 else "greedy")
        d["moe_layer_freq"] = 1
        d["seq_aux"] = True
        d["ep_size"] = 1
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        else:
            d.pop("rope_scaling")
        # nanoseek's own fields travel under a namespaced key so that a round trip keeps them.
        d["nanoseek"] = {name: getattr(self, name) for name in _NOT_IN_HF_CONFIG}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in DEEPSEEK_MODEL_TYPES:
            raise ConfigError(f"config.json has model_type {model_type!r}; ModelConfig reads "
                              f"{', '.join(DEEPSEEK_MODEL_TYPES)} (all that nanoseek reads: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}; load_config picks the config class)")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"invalid config field 'hidden_act' = {d['hidden_act']!r}: only 'silu' is supported")
        if d.get("attention_bias", False):
            raise ConfigError("invalid config field 'attention_bias' = True: DeepSeek MLA has no biases")
        if d.get("mlp_bias", False):
            raise ConfigError("invalid config field 'mlp_bias' = True: DeepSeek's FFNs have no biases")
        missing = [name for name in _SHAPE_FIELDS if name not in d]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}: the model's shape, which every DeepSeek "
                              "config.json states (nanoseek does not guess it)")
        if model_type == "deepseek_v2":
            d.setdefault("scoring_func", "softmax")  # V2 routes by softmax; its config.json may not say so
            d.setdefault("num_nextn_predict_layers", 0)  # and has no MTP
            if d.get("topk_method", "greedy") == "greedy":
                d["n_group"], d["topk_group"] = 1, 1
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key in names and key not in _NOT_IN_HF_CONFIG:
                kwargs[key] = value
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        kwargs["rope_scaling"] = None
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
            if kind == "yarn":
                kwargs["rope_scaling"] = _yarn_from_dict(rope)
            elif kind != "default":
                raise ConfigError(f"invalid config field 'rope_scaling.type' = {kind!r}: only 'yarn' is supported")
        kwargs.update(d.get("nanoseek", {}))
        # Ints that HF configs write as null for "not used".
        for key, unused in (("n_group", 1), ("topk_group", 1), ("n_routed_experts", 0), ("first_k_dense_replace", 0)):
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = unused
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)



_NOT_IN_HF_CONFIG = ("bias_update_speed", "mtp_loss_weight")
# The fields that set the weights' shapes: released DeepSeek-V2/V3 config.json files and transformers' configs all
# write them, so a config.json without one is not read with DeepSeek-V3's value in its place.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
                 "first_k_dense_replace")


def _yarn_from_dict(d: dict[str, Any]) -> YarnScaling:
    known = {f.name for f in dataclasses.fields(YarnScaling)}
    values = {k: v for k, v in d.items() if k in known and v is not None}
    if "factor" not in values:
        raise ConfigError("invalid config field 'rope_scaling': YaRN needs a 'factor'")
    return YarnScaling(**values)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _read_config_json(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A config.json (or a directory holding one) -> its path and contents."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object of config fields")
    return path, d


# ---------------------------------------------------------------------- dense students (R1's distillation targets)
@dataclass
class Llama3Scaling:
    """Llama 3.1's RoPE frequency scaling (`rope_scaling` with rope_type "llama3"): wavelengths shorter than
    original_max_position_embeddings / high_freq_factor are kept, those longer than .../low_freq_factor are divided
    by `factor`, and the ones between are interpolated smoothly (nanoseek/model/rope.py)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


DENSE_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
DENSE_MODEL_TYPES = tuple(DENSE_ARCHITECTURES)
DEEPSEEK_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
SUPPORTED_MODEL_TYPES = DEEPSEEK_MODEL_TYPES + DENSE_MODEL_TYPES


@dataclass
class DenseConfig(ConfigFile):
    """A dense decoder of the Qwen2 or Llama family: the students DeepSeek-R1 was distilled into
    (DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B on Qwen2.5, -Llama-8B/70B on Llama 3.1/3.3).

    Pre-norm blocks of grouped-query attention (RoPE on whole heads, rotate-half layout) and a SwiGLU FFN.
    The two families differ only in their biases: Qwen2 has q/k/v biases and none on o_proj (always; its
    config.json has no switch), Llama has `attention_bias` on all four projections (off in every released Llama).

    Field names are those of transformers' Qwen2Config/LlamaConfig. head_dim and num_key_value_heads default
    from the others (hidden_size / num_attention_heads, and multi-head attention) and are stored resolved, as
    transformers does; attention_bias None means the family's own (Qwen2 on, Llama off).
    """

    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool | None = None  # q/k/v biases (Llama: and o_proj's)
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Llama3Scaling | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # What the shared training code (DeepSeekV3's forward and losses, the Trainer) reads of a config: a dense
    # student has no MTP modules, no MoE layers, and so no balancing terms.
    num_nextn_predict_layers = 0
    num_moe_layers = 0
    n_routed_experts = 0
    mtp_loss_weight = 0.0
    aux_loss_alpha = 0.0
    bias_update_speed = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _llama3_from_dict(self.rope_scaling)
        need = partial(require, self)
        need(self.model_type in DENSE_MODEL_TYPES, "model_type",
             f"unsupported; the dense families nanoseek builds are {', '.join(DENSE_MODEL_TYPES)} "
             f"(config.json model_types nanoseek reads: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            for name in ("hidden_size", "num_attention_heads"):
                need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                     "must be a positive integer")
            need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                 f"must divide hidden_size={self.hidden_size} when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.validate()

    @property
    def architecture(self) -> str:
        """transformers' class of this family (config.json's `architectures`)."""
        return DENSE_ARCHITECTURES[self.model_type]

    @property
    def o_proj_bias(self) -> bool:
        """Whether the attention output projection has a bias: Llama's attention_bias covers it, Qwen2's does not."""
        return bool(self.attention_bias) and self.model_type == "llama"

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        need = partial(require, self)

        need(self.model_type in DENSE_MODEL_TYPES, "model_type",
             f"unsupported; the dense families nanoseek builds are {', '.join(DENSE_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 "must be a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads} (grouped-query attention shares each "
             "key/value head among a whole group of query heads)")
        need(self.head_dim % 2 == 0, "head_dim", "RoPE rotates pairs, so it must be even")
        need(isinstance(self.attention_bias, bool), "attention_bias", "must be true or false")
        need(self.model_type != "qwen2" or self.attention_bias, "attention_bias",
             "Qwen2 always has q/k/v biases (transformers' Qwen2 has no switch for them); a student without them "
             "is model_type 'llama'")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.initializer_range > 0, "initializer_range", "must be > 0")
        need(self.bos_token_id is None or 0 <= self.bos_token_id < self.vocab_size, "bos_token_id",
             f"must be a token id below {self.vocab_size} or null")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        need(all(e is None or (isinstance(e, int) and 0 <= e < self.vocab_size) for e in eos), "eos_token_id",
             f"must be token ids below {self.vocab_size} or null")
        if self.rope_scaling is not None:
            r = self.rope_scaling
            for name, ok, why in (
                    ("factor", r.factor >= 1, "must be >= 1 (it divides the low frequencies)"),
                    ("low_freq_factor", r.low_freq_factor > 0, "must be > 0"),
                    ("high_freq_factor", r.high_freq_factor > r.low_freq_factor,
                     f"must exceed low_freq_factor={r.low_freq_factor}"),
                    ("original_max_position_embeddings", isinstance(r.original_max_position_embeddings, int)
                     and r.original_max_position_embeddings > 0, "must be a positive integer")):
                if not ok:
                    raise ConfigError(f"invalid config field 'rope_scaling.{name}' = {getattr(r, name)!r}: {why}")

    # ------------------------------------------------------------------ Hugging Face config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as transformers' Qwen2Config/LlamaConfig and the released R1-Distill checkpoints write it."""
        d: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        for f in dataclasses.fields(self):
            if f.name not in ("model_type", "attention_bias", "rope_scaling"):
                d[f.name] = getattr(self, f.name)
        d["hidden_act"] = "silu"
        d["attention_dropout"] = 0.0
        d["use_cache"] = True
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        else:
            d["rope_scaling"] = None
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
            d["pretraining_tp"] = 1
        else:
            d["use_sliding_window"] = False
            d["max_window_layers"] = self.num_hidden_layers
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DenseConfig:
        model_type = d.get("model_type")
        if model_type not in DENSE_MODEL_TYPES:
            raise ConfigError(f"config.json has model_type {model_type!r}; DenseConfig reads "
                              f"{', '.join(DENSE_MODEL_TYPES)} (all that nanoseek reads: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"invalid config field 'hidden_act' = {d['hidden_act']!r}: only 'silu' is supported")
        if d.get("mlp_bias", False):
            raise ConfigError("invalid config field 'mlp_bias' = True: nanoseek's SwiGLU FFN has no biases")
        if d.get("use_sliding_window", False):
            raise ConfigError("invalid config field 'use_sliding_window' = True: sliding-window attention is not "
                              "implemented (no released R1-Distill model uses it)")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"invalid config field 'partial_rotary_factor' = {d['partial_rotary_factor']!r}: "
                              "RoPE rotates whole heads here")
        missing = [name for name in _DENSE_SHAPE_FIELDS if name not in d]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}: the model's shape (nanoseek does not guess it)")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta", "attention_bias"}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in names}
        if model_type == "llama":
            kwargs["attention_bias"] = d.get("attention_bias", False)
        # transformers 4.x and the released checkpoints: rope_theta + rope_scaling; transformers 5.x: rope_parameters.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            kwargs["rope_theta"] = theta
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "llama3":
            kwargs["rope_scaling"] = _llama3_from_dict(rope)
        elif kind != "default":
            raise ConfigError(f"invalid config field 'rope_scaling.rope_type' = {kind!r}: supported are 'default' "
                              "and 'llama3'")
        return cls(**kwargs)



_DENSE_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _llama3_from_dict(d: dict[str, Any]) -> Llama3Scaling:
    kind = d.get("rope_type", d.get("type", "llama3"))
    if kind != "llama3":
        raise ConfigError(f"invalid config field 'rope_scaling.rope_type' = {kind!r}: a dense student's scaling is "
                          "'llama3'")
    known = {f.name for f in dataclasses.fields(Llama3Scaling)}
    values = {k: v for k, v in d.items() if k in known and v is not None}
    absent = sorted(known - set(values))
    if absent:
        raise ConfigError(f"invalid config field 'rope_scaling': llama3 scaling needs {', '.join(absent)}")
    return Llama3Scaling(**values)


AnyConfig = ModelConfig | DenseConfig


def config_from_hf_dict(d: dict[str, Any]) -> AnyConfig:
    """config.json's contents -> the config of its family, by model_type (DeepSeek's, or a dense student's)."""
    model_type = d.get("model_type", "deepseek_v3")
    if model_type in DENSE_MODEL_TYPES:
        return DenseConfig.from_hf_dict(d)
    if model_type in DEEPSEEK_MODEL_TYPES:
        return ModelConfig.from_hf_dict(d)
    raise ConfigError(f"config.json has model_type {model_type!r}, which nanoseek does not support; supported are "
                      f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def load_config(path: str | Path) -> AnyConfig:
    """The config.json at path (or in directory path), read as the config class of its model_type."""
    path, d = _read_config_json(path)
    try:
        return config_from_hf_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, ModelConfig] = {
    # Test-sized: every feature on (query compression, groups, a dense first layer, MTP), ~0.5M params.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=1024, rope_scaling=None,
    ),
    # The CPU benchmark model (the speed comparisons with transformers and vLLM): about 7M params.
    "small": ModelConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=2048, rope_scaling=None,
        bias_update_speed=0.01,  # a few hundred steps, not V3's hundreds of thousands: balance faster
    ),
    # The embedded default's model (`nanoseek pretrain`, `nanoseek pipeline`): `small` at three quarters of its
    # width (hidden 192, head dims 24), 3.9M params with MTP. A step costs 0.6-0.8 of small's on a 2-core CPU, and
    # at this budget the model is far from trained: 2,200 steps of it (12.2-12.9 minutes in the pipeline) gave bases
    # of 34-43% pass@1 where small's 1,400 gave 24-26% (docs/pretraining.md, "A narrower model", issue 17). The
    # default is 1,600 steps, to keep the pipeline well under 25 minutes ("The acceptance round").
    "narrow": ModelConfig(
        vocab_size=2048, hidden_size=192, intermediate_size=576, moe_intermediate_size=144, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=96, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=16,
        v_head_dim=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=2048, rope_scaling=None,
        bias_update_speed=0.01,
    ),
    # The benchmark model of ../shared/anchors (1235.3M total, 231.8M activated without MTP).
    "bench-1b": ModelConfig(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=12,
        num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=4096, rope_scaling=None,
    ),
    # DeepSeek-V2-Lite: no query compression, 64 routed + 2 shared experts, top-6, softmax routing.
    "v2-lite-16b": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=1,
        num_nextn_predict_layers=0, max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
        rope_scaling=YarnScaling(factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                                 mscale=0.707, mscale_all_dim=0.707),
        aux_loss_alpha=0.001,
    ),
    # The released DeepSeek-V3 config (MTP depth 1).
    "v3-671b": ModelConfig(),
}

# Dense students (DenseConfig): R1's distillation targets. A registry of their own: what is built for DeepSeek-V3
# alone (`nanoseek plan`, the parallel trainer) offers PRESETS; get_preset and `nanoseek info` read both.
DENSE_PRESETS: dict[str, DenseConfig] = {
    # Test-sized Qwen2: biases, 2 query heads per key/value head, untied head (~0.1M params).
    "qwen2-tiny": DenseConfig(
        model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
    ),
    # The CPU demo student: a Qwen2.5-shaped model of the `small` preset's vocabulary (3.5M params): 4 query heads
    # of 32 per key/value head, tied embeddings as the small Qwen2.5 models have.
    "qwen2-small": DenseConfig(
        model_type="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=1,
    ),
    # The student of the distillation experiment (`nanoseek distill-vs-rl`): a third of the `small` teacher's
    # activated parameters, as R1 distilled into models much smaller than itself (32 dims per head as qwen2-small).
    "qwen2-mini": DenseConfig(
        model_type="qwen2", vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=1,
    ),
    # The released configs of the distilled students, as recalled (no network here to check them against
    # huggingface.co/deepseek-ai/DeepSeek-R1-Distill-*/config.json): the shapes are confirmed by the parameter
    # counts they give, which equal the released models' (1,777,088,000 and 8,030,261,248; tests/test_dense.py).
    # Not confirmed by a count: rope_theta, rms_norm_eps, max_position_embeddings and the bos/eos ids.
    # DeepSeek-R1-Distill-Qwen-1.5B (from Qwen2.5-Math-1.5B): untied head, q/k/v biases.
    "r1-distill-qwen-1.5b": DenseConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-6, max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643,
    ),
    # DeepSeek-R1-Distill-Llama-8B (from Llama-3.1-8B): Llama 3.1's RoPE scaling, no biases, untied head.
    "r1-distill-llama-8b": DenseConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, attention_bias=False, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling=Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
    ),
}


def get_preset(name: str) -> AnyConfig:
    """A copy of the preset `name`: DeepSeek's (PRESETS, a ModelConfig) or a dense student's (DENSE_PRESETS)."""
    presets = {**PRESETS, **DENSE_PRESETS}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return dataclasses.replace(presets[name])
