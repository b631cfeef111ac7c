"""The model to quantize: a local Hugging Face checkpoint read lazily, one tensor at a time."""

import json
from pathlib import Path

import torch

from bitsmoe_vllm.checkpoint import TensorFiles
from bitsmoe_vllm.format import QUANT_METHOD

from .architectures import ARCHITECTURES, Architecture, architecture

# Experts stacked in 3-D tensors, as transformers 5 holds them in memory and checkpoints it writes from such a model
# store them: gate_up_proj [E, 2I, H] (each expert's gate rows, then its up rows) and down_proj [E, H, I].
FUSED_EXPERTS = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}
# expert weights read in one of these dtypes are kept in it (float32 holds each of their values exactly: the quantizer
# converts a batch of experts at a time), others are read as float32
EXACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_model_dir(model: str) -> Path:
    """A directory, or a model id already in the local Hugging Face cache (nothing is downloaded)."""
    path = Path(model)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except (ValueError, OSError) as err:  # an invalid id, or one not in the cache
        raise FileNotFoundError(
            f"model {model!r} is neither a directory nor a model id in the local Hugging Face cache "
            f"({err.__class__.__name__}); "
            "pass the checkpoint's directory, or download it first"
        ) from None


def fp8_weight_block(config: dict) -> tuple[int, int] | None:
    """[rows, columns] of the blocks of an fp8 block-quantized checkpoint (DeepSeek-V3's: float8_e4m3fn weights, each
    block scaled by its entry of `{name}_scale_inv`), or of a BitsMoE checkpoint that kept such weights; None for any
    other checkpoint."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == QUANT_METHOD:
        qc = qc.get("linear_quantization") or {}
    block = qc.get("weight_block_size") or ()
    if qc.get("quant_method") == "fp8" and qc.get("fmt", "e4m3") == "e4m3" and len(block) == 2:
        return tuple(block)
    return None


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 weights of fp8 `w` [N, K] with one scale per [block] block, `scale_inv` [ceil(N/b0), ceil(K/b1)]."""
    expected = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
    if w.dim() != 2 or tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"fp8 weight of shape {list(w.shape)} with scales of shape {list(scale_inv.shape)}: expected scales "
            f"{list(expected)} for blocks of {list(block)}"
        )
    rows = scale_inv.float().repeat_interleave(block[0], 0)[: w.shape[0]]
    return w.float() * rows.repeat_interleave(block[1], 1)[:, : w.shape[1]]


def is_mxfp4(config: dict) -> bool:
    """gpt-oss's released checkpoints: each expert weight as MXFP4 `{name}_blocks` and `{name}_scales`."""
    return (config.get("quantization_config") or {}).get("quant_method") == "mxfp4"


# MXFP4 (OCP microscaling): 4-bit E2M1 codes, two per byte (low nibble first), 32 per block with a power-of-two scale
# stored as its biased exponent (E8M0, bias 127)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_BLOCK = 32


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., N, K/32, 16] uint8, scales [..., N, K/32] uint8 -> [..., N, K] in `dtype` (exact in bfloat16 and
    float32: every value is a 2-bit significand times a power of two)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks of shape {list(blocks.shape)} with scales of shape {list(scales.shape)}: expected blocks "
            f"[..., K/32, 16] and scales [..., K/32]"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * MXFP4_BLOCK, dtype=dtype)
    rows_out, rows_blocks, rows_scales = out.flatten(0, -2), blocks.flatten(0, -3), scales.flatten(0, -2)
    step = max(1, (1 << 24) // out.shape[-1])  # rows at a time: the int64 codes of a whole layer would be GBs
    for r in range(0, len(rows_out), step):
        b = rows_blocks[r : r + step]
        codes = torch.stack([b & 0x0F, b >> 4], -1).long()  # [n, K/32, 16, 2]: low nibble first
        values = lut[codes].flatten(-2) * torch.exp2(rows_scales[r : r + step].float() - 127)[..., None]
        rows_out[r : r + step] = values.flatten(-2)
    return out


class SourceCheckpoint:
    """config.json, tokenizer files and safetensors tensors of a Hugging Face checkpoint."""

    def __init__(self, model: str):
        self.dir = resolve_model_dir(model)
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not a Hugging Face checkpoint directory")
        self.file_config = json.loads(config_path.read_text())  # config.json as it is (written back with the output)
        # what the quantizer reads (sizes, layers, the skeleton's model type): of a multimodal checkpoint, the text
        # model's config, with whether the top level ties the embeddings
        self.config = self.file_config
        arch = ARCHITECTURES.get(self.file_config.get("model_type"))
        if arch is not None and arch.text_config:
            text = self.file_config.get("text_config", {})
            tied = self.file_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            self.config = {**text, "tie_word_embeddings": tied}
        try:
            self.tensors = TensorFiles(self.dir)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; BitsMoE reads safetensors checkpoints only") from None
        self.fp8_block = fp8_weight_block(self.file_config)
        self.mxfp4 = is_mxfp4(self.file_config)
        # what an fp8 weight is read as, outside the experts: the checkpoint's own dtype
        dtype = self.file_config.get("dtype") or self.file_config.get("torch_dtype") or "bfloat16"
        self.dtype = getattr(torch, dtype)

    @property
    def architecture(self) -> Architecture:
        return architecture(self.file_config.get("model_type", "<missing model_type>"))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor as stored; an fp8 block-quantized weight dequantized, to `dtype` (default: the checkpoint's)."""
        if (
            self.mxfp4 and name not in self.tensors.shard_of and f"{name}_blocks" in self.tensors.shard_of
        ):  # stored [E, N, K], held
            w = dequantize_mxfp4(self.tensors[f"{name}_blocks"], self.tensors[f"{name}_scales"], dtype or self.dtype)
            return w.transpose(-1, -2)  # [E, K, N], as transformers holds gpt-oss's experts
        t = self.tensors[name]
        if self.fp8_block and t.dtype == torch.float8_e4m3fn:
            t = dequantize_fp8_blocks(t, self.tensors[f"{name}_scale_inv"], self.fp8_block).to(dtype or self.dtype)
        return t

    def tensor_names(self) -> list[str]:
        """The names of the checkpoint's tensors, fp8 weights' scales left out (`get` applies them; MXFP4 blocks and
        scales are the experts', SourceCheckpoint.expert_tensor_names)."""
        return [n for n in self.tensors if not (self.fp8_block and n.endswith("_scale_inv"))]

    def fused_experts(self, module: str) -> bool:
        """Whether the checkpoint stores `module`'s experts stacked (FUSED_EXPERTS) rather than one tensor each."""
        return (
            set(self.stored_names(self.architecture.fused_name(module, "gate_up_proj"))) <= self.tensors.shard_of.keys()
        )

    def stored_names(self, name: str) -> list[str]:
        """The checkpoint's tensors behind tensor `name`: itself, or its MXFP4 blocks and scales."""
        return [f"{name}_blocks", f"{name}_scales"] if self.mxfp4 and name not in self.tensors.shard_of else [name]

    def expert_tensor_names(self, module: str) -> set[str]:
        """The names of `module`'s routed-expert weights (and biases) in the checkpoint, in whichever layout it uses."""
        if self.fused_experts(module):
            names = [self.architecture.fused_name(module, leaf) for leaf in FUSED_EXPERTS]
            biases = {f"{n}_bias" for n in names} if self.architecture.expert_bias else set()
            return {stored for n in names for stored in self.stored_names(n)} | biases
        E, names = self.architecture.num_experts(self.config), self.architecture.projection_names.values()
        return {f"{module}.{e}.{name}.weight" for e in range(E) for name in names}

    def moe_layers(self) -> list[int]:
        """Decoder layers whose routed experts are in the checkpoint."""
        arch, names = self.architecture, self.tensors.shard_of
        gate = arch.projection_names["gate"]
        return [
            i
            for i in range(self.config["num_hidden_layers"])
            if f"{arch.experts_module.format(layer=i)}.0.{gate}.weight" in names
            or self.fused_experts(arch.experts_module.format(layer=i))
        ]

    def check_expert_shapes(self, module: str) -> None:
        """Refuse, naming the shapes, expert weights that do not match config.json's E, I and H (read from the headers:
        before any work is done)."""
        arch, config = self.architecture, self.config
        E, I, H = arch.num_experts(config), arch.intermediate_size(config), config["hidden_size"]
        if self.fused_experts(module) and arch.fused_layout == "gpt_oss":
            gate_up, down = arch.fused_name(module, "gate_up_proj"), arch.fused_name(module, "down_proj")
            expected = {f"{gate_up}_bias": [E, 2 * I], f"{down}_bias": [E, H]}
            if self.mxfp4:  # stored [E, out, in / 32, 16] and [E, out, in / 32]
                for name, (n, k) in ((gate_up, (2 * I, H)), (down, (H, I))):
                    blocks = k // MXFP4_BLOCK
                    expected |= {f"{name}_blocks": [E, n, blocks, MXFP4_BLOCK // 2], f"{name}_scales": [E, n, blocks]}
            else:
                expected |= {gate_up: [E, H, 2 * I], down: [E, I, H]}
            layout = (
                "gpt-oss's experts are gate_up_proj [E, H, 2I] and down_proj [E, I, H] (in MXFP4, _blocks [E, 2I, "
                "H/32, 16] and [E, H, I/32, 16] with their _scales), with their biases"
            )
        elif self.fused_experts(module):
            expected = {
                arch.fused_name(module, "gate_up_proj"): [E, 2 * I, H],
                arch.fused_name(module, "down_proj"): [E, H, I],
            }
            layout = (
                "stacked experts are read as transformers 5 holds them, gate_up_proj [E, 2I, H] with the gate rows "
                "first and down_proj [E, H, I]; other layouts are not supported"
            )
        else:
            names = arch.projection_names
            expected = {f"{module}.{e}.{names[p]}.weight": [I, H] for e in range(E) for p in ("gate", "up")}
            expected |= {f"{module}.{e}.{names['down']}.weight": [H, I] for e in range(E)}
            layout = "per-expert weights are [I, H] (gate, up) and [H, I] (down)"
        for name, shape in expected.items():
            if name not in self.tensors.shard_of:
                raise ValueError(f"{name} is missing from {self.dir}: the experts of {module} are incomplete")
            if (found := list(self.tensors.header(name)[1])) != shape:
                raise ValueError(
                    f"{name} has shape {found}; expected {shape} from config.json (E {E}, I {I}, H {H}): {layout}"
                )

    def stacked_experts(self, module: str, leaf: str) -> torch.Tensor:
        """A FUSED_EXPERTS tensor of `module` as transformers 5 holds it: read as stored, or assembled from the
        per-expert tensors."""
        if self.fused_experts(module):
            return self.get(self.architecture.fused_name(module, leaf))
        arch = self.architecture
        names = [arch.projection_names[p] for p in FUSED_EXPERTS[leaf]]
        E = arch.num_experts(self.config)
        return torch.stack([torch.cat([self.get(f"{module}.{e}.{n}.weight") for n in names]) for e in range(E)])

    def expert_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """Projection -> [E, I, H] (gate and up as stored; down transposed from [E, H, I]) in the checkpoint's dtype
        where that is float32, bfloat16 or float16 (a big layer's experts are GBs, twice that in float32: users of
        them convert a batch of experts at a time), else float32; each made in one allocation, not a list stacked or
        a copy transposed. A family with expert biases also has "{p}_bias" (_gpt_oss_expert_weights)."""
        module = self.architecture.experts_module.format(layer=layer)
        if self.architecture.fused_layout == "gpt_oss":
            return self._gpt_oss_expert_weights(module)
        if self.fused_experts(module):
            gate_up, down = self.stacked_experts(module, "gate_up_proj"), self.stacked_experts(module, "down_proj")
            I, dtype = gate_up.shape[1] // 2, kept_dtype(gate_up)
            return {
                "gate": gate_up[:, :I].to(dtype, copy=True),  # a copy even in its own dtype: not a view of the map
                "up": gate_up[:, I:].to(dtype, copy=True),
                "down": torch.empty(down.shape[0], down.shape[2], down.shape[1], dtype=dtype).copy_(down.mT),
            }
        E, out = self.architecture.num_experts(self.config), {}
        for p, name in self.architecture.projection_names.items():
            for e in range(E):
                stored = self.tensors[f"{module}.{e}.{name}.weight"]
                w = stored if stored.dtype in EXACT_DTYPES else self.get(f"{module}.{e}.{name}.weight", torch.float32)
                w = w.T if p == "down" else w
                if e == 0:
                    out[p] = torch.empty(E, *w.shape, dtype=w.dtype)
                elif w.dtype != out[p].dtype:
                    raise ValueError(
                        f"{module}.{e}.{name}.weight is {w.dtype} where expert 0's is {out[p].dtype}: BitsMoE reads "
                        "a layer's experts in one dtype"
                    )
                out[p][e] = w
        return out

    def _gpt_oss_expert_weights(self, module: str) -> dict[str, torch.Tensor]:
        """expert_weights of gpt-oss's layout (Architecture.fused_layout), with the biases: "{p}_bias" [E, I] for gate
        and up, [E, H] for down, float32."""
        gate_up = self.stacked_experts(module, "gate_up_proj")
        E, H, I = gate_up.shape[0], gate_up.shape[1], gate_up.shape[2] // 2
        bias = self.get(self.architecture.fused_name(module, "gate_up_proj") + "_bias")
        dtype = kept_dtype(gate_up)
        out = {
            "gate": torch.empty(E, I, H, dtype=dtype).copy_(gate_up[..., 0::2].transpose(1, 2)),
            "up": torch.empty(E, I, H, dtype=dtype).copy_(gate_up[..., 1::2].transpose(1, 2)),
            "gate_bias": bias[:, 0::2].float().contiguous(),  # strided: a copy, not a view of the map
            "up_bias": bias[:, 1::2].float().contiguous(),
        }
        del gate_up  # (dequantized from MXFP4 it is a tensor of its own: not held while down is read)
        down = self.stacked_experts(module, "down_proj")
        out["down"] = down.to(kept_dtype(down), copy=True)  # [E, I, H]: D_e^T
        out["down_bias"] = self.get(self.architecture.fused_name(module, "down_proj") + "_bias").to(
            torch.float32, copy=True
        )
        return out


def kept_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype expert weights read as `t` are kept in (EXACT_DTYPES)."""
    return t.dtype if t.dtype in EXACT_DTYPES else torch.float32
