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
from typing import Any

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


@dataclass
class ModelConfig:
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
        if model_type not in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            raise ConfigError(f"config.json has model_type {model_type!r}; nanoseek reads deepseek_v3/deepseek_v2")
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

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


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


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, ModelConfig] = {
    # Test-sized: every feature on (query compression, groups, a dense first layer, MTP), ~0.5M params.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=1024, rope_scaling=None,
    ),
    # The CPU demo model: about 7M params, trains at a few thousand tokens/s on 2 cores.
    "small": ModelConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=2,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=2048, rope_scaling=None,
        bias_update_speed=0.01,  # a few hundred steps, not V3's hundreds of thousands: balance faster
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


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
