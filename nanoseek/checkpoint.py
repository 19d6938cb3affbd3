"""Hugging Face DeepSeek-V3 checkpoints: load (bf16/fp32 or block-wise FP8, MTP layers kept) and save.

On disk (the released DeepSeek-V3 layout, which transformers reads):
  config.json, model.safetensors or model-0000i-of-0000n.safetensors + model.safetensors.index.json
  model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight
  routed experts one by one: model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
  MTP depth k as model.layers.{num_hidden_layers + k - 1}: enorm, hnorm, eh_proj, shared_head.norm, the block's
  own tensors, and copies of the shared embedding (embed_tokens) and head (shared_head.head)
In memory (nanoseek): the same names without "model.", experts stacked (mlp.experts.gate_up_proj (E, 2F, H),
down_proj (E, H, F)), MTP depth k under mtp.{k-1} (block tensors under mtp.{k-1}.block).

Dense students (Qwen2ForCausalLM, LlamaForCausalLM: R1's distillation targets) are read and written in their own
Hugging Face layout, one name table per family (DENSE_NAME_MAPS); load_pretrained picks the family by config.json's
model_type. Their tokenizer files travel with them: save_pretrained copies those of the directory a student was
loaded from (or of tokenizer_from).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.atomic import replace_directory
from nanoseek.config import DenseConfig, ModelConfig, load_config
from nanoseek.errors import NanoseekError
from nanoseek.model.dense import DenseTransformer
from nanoseek.model.quant import BLOCK, dequantize_blockwise, quantize_blockwise
from nanoseek.model.rope import RotaryEmbedding
from nanoseek.model.transformer import DeepSeekV3

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # older remote-code checkpoints store this buffer
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "shared_head.norm.weight": "norm.weight"}
_MTP_SHARED = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
# What an FP8 export quantizes: the linear weights the FP8 recipe trains in FP8 (attention, FFN, shared and routed
# experts, in the main and the MTP blocks). Embedding, head, norms, router and eh_proj stay as they are.
_FP8_EXPORTED = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\..*_proj\.weight$")
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
                           "activation_scheme": "dynamic"}  # as in DeepSeek-V3's released config.json

# Hugging Face name -> nanoseek name of a dense student's tensors, one table per family ("{i}": a layer's index).
# A bias the config leaves out (Llama with attention_bias off) is in neither the checkpoint nor the model.
_QWEN2_NAMES = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.self_attn.q_proj.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.self_attn.k_proj.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.self_attn.v_proj.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.self_attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",  # absent from a tied checkpoint (the embedding is the head)
}
_LLAMA_NAMES = {**_QWEN2_NAMES, "model.layers.{i}.self_attn.o_proj.bias": "layers.{i}.self_attn.o_proj.bias"}
DENSE_NAME_MAPS: dict[str, dict[str, str]] = {"qwen2": _QWEN2_NAMES, "llama": _LLAMA_NAMES}
# What a Hugging Face model directory holds besides config.json and the weights, copied through on save.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def tokenizer_files(directory: str | Path) -> dict[str, Path]:
    """The TOKENIZER_FILES a directory has, name -> path: what a model made from it carries along (the tokenizer,
    and a Hugging Face checkpoint's chat template and generation settings)."""
    return {name: Path(directory) / name for name in TOKENIZER_FILES if (Path(directory) / name).is_file()}


class CheckpointError(NanoseekError, ValueError):
    """A checkpoint directory that cannot be loaded; the message says which file or tensor and why."""


# ---------------------------------------------------------------------- reading
class _TensorFiles:
    """Lazy access to the tensors of a checkpoint directory, whatever its sharding."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no safetensors files in {directory}")
            weight_map = None
        self.handles = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{path} is listed in {INDEX_FILE} but does not exist")
            try:
                self.handles[name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path} cannot be read as safetensors ({e}); is it truncated?") from None
        self.location = {}
        for name, handle in self.handles.items():
            for key in handle.keys():
                self.location[key] = name
        if weight_map is not None:
            absent = [k for k, f in weight_map.items() if self.location.get(k) != f]
            if absent:
                raise CheckpointError(f"{len(absent)} tensors listed in {INDEX_FILE} are not in their files, "
                                      f"e.g. {absent[0]!r} in {weight_map[absent[0]]}")

    def keys(self) -> list[str]:
        return list(self.location)

    def get(self, key: str) -> torch.Tensor:
        name = self.location[key]
        try:
            return self.handles[name].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.directory / name}: tensor {key!r} cannot be read ({e}); "
                                  "is the file truncated?") from None


def _hf_to_nanoseek_name(key: str, config: ModelConfig) -> tuple[str | None, str | None]:
    """-> (nanoseek name, or None when ignored) and, for MTP copies of shared tensors, the tensor they copy."""
    if key == "lm_head.weight":
        return key, None
    if key in ("model.embed_tokens.weight", "model.norm.weight"):
        return key.removeprefix("model."), None
    m = _LAYER.match(key)
    if not m:
        return key, None  # reported as unexpected
    layer, rest = int(m.group(1)), m.group(2)
    if layer < config.num_hidden_layers:
        return f"layers.{layer}.{rest}", None
    depth = layer - config.num_hidden_layers
    if rest in _MTP_OWN:
        return f"mtp.{depth}.{_MTP_OWN[rest]}", None
    if rest in _MTP_SHARED:
        return None, _MTP_SHARED[rest]
    return f"mtp.{depth}.block.{rest}", None


def _mtp_depths_present(keys: list[str], config: ModelConfig) -> int:
    depths = {int(m.group(1)) - config.num_hidden_layers for k in keys if (m := _LAYER.match(k))}
    return len([d for d in depths if d >= 0])


def read_state_dict(files: _TensorFiles, config: ModelConfig,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a HF-layout checkpoint into nanoseek names (experts stacked, FP8 dequantized), checking shapes."""
    directory = files.directory
    keys = files.keys()
    with torch.device("meta"):
        expected = dict(DeepSeekV3(config).state_dict())

    def load(key: str) -> torch.Tensor:
        tensor = files.get(key)
        scale_key = key.removesuffix("weight") + "weight_scale_inv"
        if tensor.dtype == torch.float8_e4m3fn:
            if scale_key not in files.location:
                raise CheckpointError(f"{key} is FP8 but the checkpoint has no {scale_key}")
            try:
                return dequantize_blockwise(tensor, files.get(scale_key), BLOCK, dtype or torch.bfloat16)
            except ValueError as e:
                raise CheckpointError(f"{key}: {e}") from None
        if dtype is not None and tensor.is_floating_point() and not key.endswith("e_score_correction_bias"):
            tensor = tensor.to(dtype)
        return tensor

    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    copies: list[tuple[str, str]] = []
    unexpected = []
    for key in keys:
        if key.endswith("weight_scale_inv") or _IGNORED.search(key):
            continue
        name, copy_of = _hf_to_nanoseek_name(key, config)
        if copy_of is not None:
            copies.append((key, copy_of))
            continue
        e = _EXPERT.match(name)
        if e:
            experts.setdefault(e.group(1), {}).setdefault(int(e.group(2)), {})[e.group(3)] = load(key)
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        state[name] = load(key)

    for prefix, by_expert in experts.items():
        if f"{prefix}.gate_up_proj" not in expected:
            unexpected.extend(f"model.{prefix}.{i}.*" for i in sorted(by_expert)[:1])
            continue
        n = config.n_routed_experts
        missing = [f"{prefix}.{i}.{p}" for i in range(n) for p in ("gate_proj", "up_proj", "down_proj")
                   if p not in by_expert.get(i, {})]
        extra = [i for i in by_expert if i >= n]
        if extra:
            unexpected.append(f"{prefix}.{extra[0]}.* (expert {extra[0]} of {n})")
        if missing:
            raise CheckpointError(f"checkpoint {directory} is missing {len(missing)} expert tensors, "
                                  f"e.g. {missing[0]}.weight")
        state[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_expert[i]["gate_proj"], by_expert[i]["up_proj"]]) for i in range(n)])
        state[f"{prefix}.down_proj"] = torch.stack([by_expert[i]["down_proj"] for i in range(n)])

    if unexpected:
        raise CheckpointError(f"checkpoint {directory} has {len(unexpected)} tensors this config does not use, "
                              f"e.g. {unexpected[0]!r} (does config.json match the weights?)")
    _tie_embeddings(state, config.tie_word_embeddings)
    if config.scoring_func == "softmax":
        # DeepSeek-V2 checkpoints predate auxiliary-loss-free balancing: their biases start at zero.
        for name in expected:
            if name.endswith("e_score_correction_bias") and name not in state:
                state[name] = torch.zeros(config.n_routed_experts)
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is missing {len(missing)} tensors, e.g. {missing[0]!r}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint but the "
                                  f"config expects {tuple(expected[name].shape)}")
    for key, copy_of in copies:
        target = state["embed_tokens.weight"] if copy_of == "embed_tokens.weight" or config.tie_word_embeddings \
            else state["lm_head.weight"]
        if not torch.equal(load(key).to(target.dtype), target):
            raise CheckpointError(f"{key} differs from the main model's {copy_of}; nanoseek's MTP modules share "
                                  "the embedding and output head, so it cannot hold this checkpoint")
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or for a training run's directory its latest checkpoint's model: the EMA of
    its weights (ema/) when the run kept one (--ema-decay), else its weights (model/)."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        checkpoint = path / "checkpoints" / latest.read_text().strip()
        return checkpoint / "ema" if (checkpoint / "ema").is_dir() else checkpoint / "model"
    return path


# ---------------------------------------------------------------------- dense students
def _name_table(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(source).replace(r"\{i\}", r"(\d+)")), target) for source, target in table.items()]


def _translate(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        m = pattern.fullmatch(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target
    return None


def read_dense_state_dict(files: _TensorFiles, config: DenseConfig,
                          dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a Qwen2/Llama checkpoint into nanoseek names (DENSE_NAME_MAPS), checking names and shapes."""
    directory = files.directory
    table = _name_table(DENSE_NAME_MAPS[config.model_type])
    with torch.device("meta"):
        expected = dict(DenseTransformer(config).state_dict())
    state: dict[str, torch.Tensor] = {}
    hf_names: dict[str, str] = {}
    unexpected = []
    for key in files.keys():
        if _IGNORED.search(key):
            continue
        name = _translate(key, table)
        if name is None or name not in expected:
            unexpected.append(key)
            continue
        hf_names[name] = key
        tensor = files.get(key)
        state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    if unexpected:
        hint = (" (a bias: does config.json's attention_bias match the weights?)" if unexpected[0].endswith(".bias")
                else " (does config.json match the weights?)")
        raise CheckpointError(f"checkpoint {directory} has {len(unexpected)} tensors a {config.architecture} of this "
                              f"config does not have, e.g. {unexpected[0]!r}{hint}")
    _tie_embeddings(state, config.tie_word_embeddings)
    missing = [k for k in expected if k not in state]
    if missing:
        hf_name = _translate(missing[0], _name_table({v: k for k, v in DENSE_NAME_MAPS[config.model_type].items()}))
        raise CheckpointError(f"checkpoint {directory} is missing {len(missing)} tensors, e.g. {hf_name!r}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"tensor {hf_names.get(name, name)!r} has shape {tuple(tensor.shape)} in "
                                  f"{directory} but config.json makes it {tuple(expected[name].shape)}")
    return state


def _load_dense(directory: Path, config: DenseConfig, dtype: torch.dtype | None,
                device: str | torch.device | None) -> DenseTransformer:
    model = _model_of(DenseTransformer, config, read_dense_state_dict(_TensorFiles(directory), config, dtype), device)
    model.loaded_from = directory  # its tokenizer files are copied into what the model is saved as
    return model


def _model_of(model_class: type, config: ModelConfig | DenseConfig, state: dict[str, torch.Tensor],
              device: str | torch.device | None) -> DeepSeekV3 | DenseTransformer:
    """model_class(config) holding state's tensors themselves (built on the meta device: no init, no copy), its
    embeddings tied where the config says, on device (None: where the tensors are)."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(config)  # non-persistent buffers are not in the checkpoint
    return model.to(device) if device is not None else model


def _dense_hf_state_dict(model: DenseTransformer) -> Iterator[tuple[str, torch.Tensor]]:
    config = model.config
    table = _name_table({v: k for k, v in DENSE_NAME_MAPS[config.model_type].items()})
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # as transformers saves a tied model
        hf = _translate(name, table)
        if hf is None:
            raise CheckpointError(f"{config.architecture} has no checkpoint name for nanoseek's {name!r}")
        yield hf, tensor


# ---------------------------------------------------------------------- loading
def _tie_embeddings(state: dict[str, torch.Tensor], tied: bool) -> None:
    """With tied embeddings the output head is the embedding (a checkpoint may omit lm_head.weight, or hold a copy
    that must equal it)."""
    if tied and "embed_tokens.weight" in state:
        if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["embed_tokens.weight"]):
            raise CheckpointError("config.json ties the embeddings but lm_head.weight differs from embed_tokens")
        state["lm_head.weight"] = state["embed_tokens.weight"]


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> DeepSeekV3:
    """A checkpoint directory -> its model: a DeepSeekV3 (deepseek_v3/v2, kimi_k2), or a DenseTransformer (qwen2,
    llama), by config.json's model_type. dtype: cast the weights (default: as stored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config = load_config(directory)
    if isinstance(config, DenseConfig):
        return _load_dense(directory, config, dtype, device)
    files = _TensorFiles(directory)
    present = _mtp_depths_present(files.keys(), config)
    if present < config.num_nextn_predict_layers and present == 0:
        warnings.warn(f"{directory} has no MTP layers (config asks for {config.num_nextn_predict_layers}); "
                      "loading without MTP", stacklevel=2)
        config = config.replace(num_nextn_predict_layers=0)
    return _model_of(DeepSeekV3, config, read_state_dict(files, config, dtype), device)


# ---------------------------------------------------------------------- writing
def to_hf_state_dict(model: DeepSeekV3) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every tensor of the released DeepSeek-V3 layout (a dense student's: its family's)."""
    if isinstance(model.config, DenseConfig):
        yield from _dense_hf_state_dict(model)
        return
    config = model.config
    state = model.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.startswith("mtp."):
            _, depth, rest = name.split(".", 2)
            prefix = f"model.layers.{config.num_hidden_layers + int(depth)}"
            own = {v: k for k, v in _MTP_OWN.items()}
            hf = f"{prefix}.{own[rest]}" if rest in own else f"{prefix}.{rest.removeprefix('block.')}"
        elif name == "lm_head.weight":
            hf = name
        else:
            hf = f"model.{name}"
        if hf.endswith("mlp.experts.gate_up_proj"):
            base = hf.removesuffix("gate_up_proj")
            for e, (gate, up) in enumerate(zip(*tensor.chunk(2, dim=1), strict=True)):
                yield f"{base}{e}.gate_proj.weight", gate
                yield f"{base}{e}.up_proj.weight", up
        elif hf.endswith("mlp.experts.down_proj"):
            base = hf.removesuffix("down_proj")
            for e, down in enumerate(tensor):
                yield f"{base}{e}.down_proj.weight", down
        else:
            yield hf, tensor
    for depth in range(len(model.mtp)):
        prefix = f"model.layers.{config.num_hidden_layers + depth}"
        yield f"{prefix}.embed_tokens.weight", state["embed_tokens.weight"]
        yield f"{prefix}.shared_head.head.weight", state.get("lm_head.weight", state["embed_tokens.weight"])


def _quantized(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    ragged = []
    for name, tensor in tensors:
        if not _FP8_EXPORTED.match(name):
            yield name, tensor
            continue
        weight, scale_inv = quantize_blockwise(tensor.detach())
        yield name, weight
        yield name.removesuffix("weight") + "weight_scale_inv", scale_inv
        if any(d > BLOCK and d % BLOCK for d in tensor.shape):
            ragged.append(f"{name} {tuple(tensor.shape)}")
    if ragged:
        # Its CPU dequantization takes the block size as rows // scale rows, not 128, for a partial last block.
        warnings.warn(f"{len(ragged)} FP8 weights have a dimension above 128 that is not a multiple of 128, e.g. "
                      f"{ragged[0]}: nanoseek reads them right, transformers 5.x dequantizes them wrongly",
                      stacklevel=3)


def save_pretrained(model: DeepSeekV3, directory: str | Path, max_shard_bytes: int = 4 << 30,
                    fp8: bool = False, tokenizer_from: str | Path | None = None) -> None:
    """Write config.json and safetensors shards, atomically: a crash leaves the old directory (if any) intact.

    fp8: DeepSeek-V3's FP8 format: the linear weights of the blocks in float8_e4m3fn with a float32
    weight_scale_inv per 128x128 block, and config.json's quantization_config (see _FP8_EXPORTED).
    tokenizer_from: a directory whose TOKENIZER_FILES (those it has) are copied in; for a dense student loaded
    by load_pretrained, the directory it was loaded from unless given.
    """
    dense = isinstance(model.config, DenseConfig)
    if dense and fp8:
        raise ValueError("fp8 export is DeepSeek-V3's block-wise format; a dense student is saved unquantized")
    if tokenizer_from is None and dense:
        tokenizer_from = getattr(model, "loaded_from", None)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in _quantized(to_hf_state_dict(model)) if fp8 else to_hf_state_dict(model):
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensor.detach().to("cpu").clone()  # clone: safetensors refuses shared storage
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(staging / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
            (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                          "weight_map": weight_map}, indent=2))
        hf_config = model.config.to_hf_dict()
        hf_config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        if fp8:
            hf_config["quantization_config"] = FP8_QUANTIZATION_CONFIG
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer_from is not None:
            for name, source in tokenizer_files(tokenizer_from).items():
                shutil.copyfile(source, staging / name)
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
