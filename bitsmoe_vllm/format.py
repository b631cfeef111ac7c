"""BitsMoE checkpoint format (versions 1 to 3): the executable twin of FORMAT.md.

`QuantConfig.from_dict` reads and validates a checkpoint's `quantization_config`;
`tensor_specs` gives every tensor's name, dtype, shape and tensor-parallel shard dimension;
`check_tensors` validates a checkpoint's tensors against them. Imports neither vLLM nor offline/.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from bitsmoe_vllm.activation import ACTIVATIONS, Activation
from bitsmoe_vllm.packing import SUPPORTED_WIDTHS, WORD_BITS
from bitsmoe_vllm.typed_json import Reader

FORMAT_VERSION = 2  # what the quantizer writes, unless it keeps fp8 linear weights (version 3)
# version 1: codes with a zero level at every width above 1; version 3: fp8 linear weights kept (FORMAT.md section 9)
READABLE_VERSIONS = (1, 2, 3)
FP8_VERSION = 3  # the first version with `linear_quantization`
QUANT_METHOD = "bitsmoe"
BIT_WIDTHS = (0,) + SUPPORTED_WIDTHS
PROJECTIONS = ("gate", "up", "down")
BUDGET_SCOPES = ("all", "factors")


def odd_codes(format_version: int) -> bool:
    """Codes of 2 to 6 bits are odd (FORMAT.md section 4) from version 2 on; in version 1 they are not."""
    return format_version >= 2


# "identity": no basis is stored, B = the identity and every rank is H (for layers where E * I is not much larger
# than H, a shared basis costs more bits than it saves).
BASIS_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8, "identity": None}
BASIS_BITS = {"float16": 16, "bfloat16": 16, "int8": 8, "identity": 0}
# "projection": each projection of a layer has its own basis; "layer": one basis [R, H] per layer serves the gate and
# up (as stored) and the down projection (transposed), all three reading and writing the same residual stream; int8
# with the gate's scale per row, and down's one scale [1] for the transposed codes (FORMAT.md section 3)
BASIS_SHARINGS = ("projection", "layer")
CODES_DTYPE, SCALES_DTYPE, BITS_DTYPE, BIAS_DTYPE = torch.int32, torch.float16, torch.uint8, torch.float32
SCALE_BITS, BITS_ENTRY_BITS, BIAS_BITS = 16, 8, 32
BITS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ProjectionLayout:
    """One projection of one MoE layer: basis rank R and, per expert, stored rows and planes."""

    rank: int  # R: rows of the shared basis (gate, up) or its columns (down)
    rows: tuple[int, ...]  # [E] rank rows with bits > 0
    planes: tuple[int, ...]  # [E] sum of bits over rank rows

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "rows": list(self.rows), "planes": list(self.planes)}


@dataclass(frozen=True)
class LayerLayout:
    module: str  # checkpoint path of the layer's experts, e.g. "model.layers.3.mlp.experts"
    gate: ProjectionLayout
    up: ProjectionLayout
    down: ProjectionLayout

    def projection(self, name: str) -> ProjectionLayout:
        return getattr(self, name)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard_dim: int | None  # dimension split under tensor parallelism; None = replicated


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's `quantization_config` (FORMAT.md, "config.json")."""

    bits: float
    budget_scope: str
    achieved_bits: Mapping[str, float]  # {"all": ..., "factors": ...}
    candidate_bits: tuple[int, ...]
    group_size: int
    basis_dtype: str
    activation: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    projection_names: Mapping[str, str]  # "gate"/"up"/"down" -> checkpoint name
    layers: tuple[LayerLayout, ...]
    format_version: int = FORMAT_VERSION
    swiglu_alpha: float | None = None  # activation "swigluoai" only (gpt-oss)
    swiglu_limit: float | None = None
    expert_bias: bool = False  # every expert's gate, up and down carry a bias (gpt-oss)
    # the source's quantization_config of the linear weights kept as it stored them (fp8 blocks, DeepSeek-V3)
    linear_quantization: Mapping[str, Any] | None = None
    basis_sharing: str = "projection"  # a key of BASIS_SHARINGS

    @property
    def odd_codes(self) -> bool:
        return odd_codes(self.format_version)

    @property
    def act(self) -> Activation:
        return Activation(self.activation, self.swiglu_alpha, self.swiglu_limit)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        r = Reader(d, "quantization_config")
        if r.get("quant_method", str) != QUANT_METHOD:
            raise ValueError(
                f"quantization_config.quant_method: expected '{QUANT_METHOD}', found {d['quant_method']!r}"
            )
        version = r.get("format_version", int)
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"quantization_config.format_version: unknown version {version}; this bitsmoe-vllm reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade bitsmoe-vllm or re-export the checkpoint."
            )
        achieved, names, layers = r.child("achieved_bits"), r.child("projection_names"), r.child("layers")
        activation = r.choice("activation", ACTIVATIONS)
        swiglu = {k: float(r.get(k, (int, float))) for k in ("swiglu_alpha", "swiglu_limit") if activation != "silu"}
        cfg = cls(
            bits=float(r.get("bits", (int, float))),
            budget_scope=r.choice("budget_scope", BUDGET_SCOPES),
            achieved_bits={scope: float(achieved.get(scope, (int, float))) for scope in BUDGET_SCOPES},
            candidate_bits=tuple(r.int_list("candidate_bits", allowed=BIT_WIDTHS)),
            group_size=r.positive_int("group_size"),
            basis_dtype=r.choice("basis_dtype", tuple(BASIS_DTYPES)),
            activation=activation,
            hidden_size=r.positive_int("hidden_size"),
            intermediate_size=r.positive_int("intermediate_size"),
            num_experts=r.positive_int("num_experts"),
            projection_names={p: names.get(p, str) for p in PROJECTIONS},
            layers=tuple(_read_layer(module, layers.child(module)) for module in layers.d),
            format_version=version,
            expert_bias=r.get("expert_bias", bool) if "expert_bias" in r.d else False,
            linear_quantization=_read_linear_quantization(r) if "linear_quantization" in r.d else None,
            basis_sharing=r.choice("basis_sharing", BASIS_SHARINGS) if "basis_sharing" in r.d else "projection",
            **swiglu,
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        swiglu = self.swiglu_alpha is not None
        extra = {"swiglu_alpha": self.swiglu_alpha, "swiglu_limit": self.swiglu_limit} if swiglu else {}
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "bits": self.bits,
            "budget_scope": self.budget_scope,
            "achieved_bits": dict(self.achieved_bits),
            "candidate_bits": list(self.candidate_bits),
            "group_size": self.group_size,
            "basis_dtype": self.basis_dtype,
            **({"basis_sharing": self.basis_sharing} if self.basis_sharing != "projection" else {}),
            "activation": self.activation,
            **extra,
            **({"expert_bias": True} if self.expert_bias else {}),
            **({"linear_quantization": dict(self.linear_quantization)} if self.linear_quantization else {}),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_experts": self.num_experts,
            "projection_names": dict(self.projection_names),
            "layers": {layer.module: {p: layer.projection(p).to_dict() for p in PROJECTIONS} for layer in self.layers},
        }

    def validate(self) -> None:
        """Check the invariants between fields (FORMAT.md section 8); raise ValueError naming the key."""
        G, I = self.group_size, self.intermediate_size
        self.act  # noqa: B018 (raises on an activation without its parameters, or with another's)
        for key in ("swiglu_alpha", "swiglu_limit"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"quantization_config.{key}: expected a positive number, found {getattr(self, key)}")
        if (self.linear_quantization is not None) != (self.format_version >= FP8_VERSION):
            raise ValueError(
                f"quantization_config.linear_quantization: present in format version {FP8_VERSION} and only there; "
                f"format_version is {self.format_version} and the key is "
                f"{'present' if self.linear_quantization is not None else 'missing'}"
            )
        if G % WORD_BITS or I % G:
            raise ValueError(
                f"quantization_config.group_size: {G} must be a multiple of {WORD_BITS} that divides "
                f"intermediate_size {I}"
            )
        widths = [b for b in self.candidate_bits if b > 0]
        if not widths or len(set(self.candidate_bits)) != len(self.candidate_bits):
            raise ValueError(
                f"quantization_config.candidate_bits: expected distinct widths with at least one above 0, "
                f"found {list(self.candidate_bits)}"
            )
        if not self.layers:
            raise ValueError("quantization_config.layers: no MoE layer listed")
        if self.basis_sharing == "layer":
            if self.basis_dtype == "identity":
                raise ValueError(
                    "quantization_config.basis_sharing: 'layer' shares a stored basis; basis_dtype is identity"
                )
            for layer in self.layers:
                ranks = [layer.projection(p).rank for p in PROJECTIONS]
                if len(set(ranks)) > 1:
                    raise ValueError(
                        f"quantization_config.layers[{layer.module!r}]: the gate, up and down ranks {ranks} differ, "
                        "and basis_sharing 'layer' gives them one basis"
                    )
        for layer in self.layers:
            for p in PROJECTIONS:
                self._validate_projection(
                    layer.projection(p), f"quantization_config.layers[{layer.module!r}].{p}", widths
                )
        measured = stored_bits(self)
        for scope in BUDGET_SCOPES:
            if abs(measured[scope] - self.achieved_bits[scope]) > BITS_TOLERANCE:
                raise ValueError(
                    f"quantization_config.achieved_bits.{scope}: the layout stores {measured[scope]:.6f} bits per "
                    f"weight, found {self.achieved_bits[scope]}"
                )
        if self.achieved_bits[self.budget_scope] > self.bits + BITS_TOLERANCE:
            raise ValueError(
                f"quantization_config.achieved_bits.{self.budget_scope}: {self.achieved_bits[self.budget_scope]:.6f} "
                f"exceeds the budget bits={self.bits}"
            )

    def _validate_projection(self, pl: ProjectionLayout, key: str, widths: list[int]) -> None:
        H, E = self.hidden_size, self.num_experts
        if not 1 <= pl.rank <= H:
            raise ValueError(f"{key}.rank: expected 1..hidden_size ({H}), found {pl.rank}")
        if self.basis_dtype == "identity" and pl.rank != H:
            raise ValueError(f"{key}.rank: an identity basis has rank hidden_size ({H}), found {pl.rank}")
        for field, values in (("rows", pl.rows), ("planes", pl.planes)):
            if len(values) != E:
                raise ValueError(f"{key}.{field}: expected {E} entries (num_experts), found {len(values)}")
        for e, (rows, planes) in enumerate(zip(pl.rows, pl.planes)):
            low, high = rows * min(widths), rows * max(widths)
            if not (rows <= pl.rank and low <= planes <= high):
                raise ValueError(
                    f"{key}: expert {e} has rows={rows}, planes={planes}; expected rows <= rank ({pl.rank}) "
                    f"and {low} <= planes <= {high} for candidate_bits {list(self.candidate_bits)}"
                )

    def layer(self, module: str) -> LayerLayout:
        for layer in self.layers:
            if layer.module == module:
                return layer
        raise KeyError(f"no BitsMoE layer '{module}' in quantization_config.layers")


def _read_linear_quantization(r: Reader) -> dict[str, Any]:
    """fp8 block quantization as DeepSeek-V3 states it: quant_method "fp8", weight_block_size [rows, columns]; the
    other keys (fmt, activation_scheme) are kept for vLLM's reader of that config."""
    lq = r.child("linear_quantization")
    if lq.get("quant_method", str) != "fp8" or lq.d.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"{lq.where}: expected fp8 (e4m3) block quantization, found {dict(lq.d)}")
    block = lq.int_list("weight_block_size")
    if len(block) != 2 or 0 in block:
        raise ValueError(f"{lq.path('weight_block_size')}: expected two positive integers, found {block}")
    return dict(lq.d)


def expert_tensor_name(module: str, expert: int, checkpoint_projection: str, kind: str) -> str:
    """checkpoint_projection is the checkpoint's name (projection_names[p]); kind is "codes", "scales", "bits" or
    "bias"."""
    return f"{module}.{expert}.{checkpoint_projection}.{kind}"


def basis_name(module: str, checkpoint_projection: str) -> str:
    """A layer's shared basis travels under expert 0's names (FORMAT.md section 3)."""
    return expert_tensor_name(module, 0, checkpoint_projection, "basis")


def basis_scale_name(module: str, checkpoint_projection: str) -> str:
    return expert_tensor_name(module, 0, checkpoint_projection, "basis_scale")


def stored_bases(cfg: QuantConfig) -> tuple[str, ...]:
    """The projections whose basis is stored: all three, the gate's alone (one basis per layer), or none."""
    if cfg.basis_dtype == "identity":
        return ()
    return ("gate",) if cfg.basis_sharing == "layer" else PROJECTIONS


def layer_tensor_specs(cfg: QuantConfig, layer: LayerLayout) -> dict[str, TensorSpec]:
    """Name -> spec of every tensor of one MoE layer, in checkpoint order."""
    H, I, G = cfg.hidden_size, cfg.intermediate_size, cfg.group_size
    specs = {}
    for p in stored_bases(cfg):
        R, name = layer.projection(p).rank, cfg.projection_names[p]
        shape = (H, R) if p == "down" else (R, H)
        specs[basis_name(layer.module, name)] = TensorSpec(shape, BASIS_DTYPES[cfg.basis_dtype], None)
        if cfg.basis_dtype == "int8":
            specs[basis_scale_name(layer.module, name)] = TensorSpec((shape[0],), SCALES_DTYPE, None)
    if cfg.basis_sharing == "layer" and cfg.basis_dtype == "int8":
        specs[basis_scale_name(layer.module, cfg.projection_names["down"])] = TensorSpec((1,), SCALES_DTYPE, None)
    for e in range(cfg.num_experts):
        for p in PROJECTIONS:
            pl, name = layer.projection(p), cfg.projection_names[p]
            specs[expert_tensor_name(layer.module, e, name, "codes")] = TensorSpec(
                (pl.planes[e], I // WORD_BITS), CODES_DTYPE, 1
            )
            specs[expert_tensor_name(layer.module, e, name, "scales")] = TensorSpec(
                (pl.rows[e], I // G), SCALES_DTYPE, 1
            )
            specs[expert_tensor_name(layer.module, e, name, "bits")] = TensorSpec((pl.rank,), BITS_DTYPE, None)
            if cfg.expert_bias:  # down's is added once, by tensor-parallel rank 0 (FORMAT.md section 7)
                shape, shard = ((H,), None) if p == "down" else ((I,), 0)
                specs[expert_tensor_name(layer.module, e, name, "bias")] = TensorSpec(shape, BIAS_DTYPE, shard)
    return specs


def tensor_specs(cfg: QuantConfig) -> dict[str, TensorSpec]:
    return {name: spec for layer in cfg.layers for name, spec in layer_tensor_specs(cfg, layer).items()}


def factor_row_bits(width: int, intermediate_size: int, group_size: int) -> int:
    """Bits one stored factor row of `width` bits costs: its codes and its scales (0 for width 0)."""
    return width * intermediate_size + (width > 0) * (intermediate_size // group_size) * SCALE_BITS


def stored_bits(cfg: QuantConfig) -> dict[str, float]:
    """Stored bits per original routed-expert weight (FORMAT.md, "Budget accounting").

    "factors": factor codes + scales. "all": that + per-rank bit-widths + shared bases (+ their scales).
    """
    H, I, G = cfg.hidden_size, cfg.intermediate_size, cfg.group_size
    basis_bits = BASIS_BITS[cfg.basis_dtype]
    factors = everything = 0
    for layer in cfg.layers:
        for p in PROJECTIONS:
            pl = layer.projection(p)
            factor_bits = sum(pl.planes) * I + sum(pl.rows) * (I // G) * SCALE_BITS
            factors += factor_bits
            everything += factor_bits + cfg.num_experts * pl.rank * BITS_ENTRY_BITS
            if p in stored_bases(cfg):
                everything += pl.rank * H * basis_bits
            if cfg.basis_dtype == "int8" and p in stored_bases(cfg):
                everything += (H if p == "down" else pl.rank) * SCALE_BITS
            elif cfg.basis_dtype == "int8" and p == "down" and cfg.basis_sharing == "layer":
                everything += SCALE_BITS  # down's one scale
            if cfg.expert_bias:
                everything += cfg.num_experts * (H if p == "down" else I) * BIAS_BITS
    weights = len(cfg.layers) * 3 * cfg.num_experts * I * H
    return {"all": everything / weights, "factors": factors / weights}


def check_tensors(cfg: QuantConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Validate a checkpoint's tensors (name -> tensor) against `cfg`; raise ValueError naming the tensor."""
    for layer in cfg.layers:
        check_layer_tensors(cfg, layer, tensors)


def check_layer_tensors(cfg: QuantConfig, layer: LayerLayout, tensors: Mapping[str, torch.Tensor]) -> None:
    """Validate one MoE layer's tensors: presence, dtype, shape, finite values, bit-widths."""
    specs = layer_tensor_specs(cfg, layer)
    for name, spec in specs.items():
        if name not in tensors:
            raise ValueError(f"missing tensor '{name}' (expected {spec.dtype} {list(spec.shape)})")
        t = tensors[name]
        if t.dtype != spec.dtype:
            raise ValueError(f"tensor '{name}': expected dtype {spec.dtype}, found {t.dtype}")
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"tensor '{name}': expected shape {list(spec.shape)}, found {list(t.shape)}")
        if t.dtype.is_floating_point and not torch.isfinite(t).all():
            raise ValueError(f"tensor '{name}': holds NaN or Inf")
    for name in tensors:
        if name.startswith(layer.module + ".") and name not in specs:
            raise ValueError(
                f"unexpected tensor '{name}' among the routed experts of '{layer.module}'; a BitsMoE checkpoint "
                "stores them only as bases, codes, scales, bits and biases (FORMAT.md)"
            )
    for p in PROJECTIONS:
        pl, name = layer.projection(p), cfg.projection_names[p]
        for e in range(cfg.num_experts):
            bits_name = expert_tensor_name(layer.module, e, name, "bits")
            check_bits(cfg, bits_name, tensors[bits_name], pl.rows[e], pl.planes[e])


def check_bits(cfg: QuantConfig, name: str, bits: torch.Tensor, rows: int, planes: int) -> None:
    """A bits tensor's widths are candidates and add up to the layout's rows and planes."""
    bits = bits.to(torch.int64)
    unknown = sorted(set(bits.unique().tolist()) - set(cfg.candidate_bits))
    if unknown:
        raise ValueError(f"tensor '{name}': bit-width {unknown[0]} is not in candidate_bits {list(cfg.candidate_bits)}")
    found_rows, found_planes = int((bits > 0).sum()), int(bits.sum())
    if (found_rows, found_planes) != (rows, planes):
        raise ValueError(
            f"tensor '{name}': holds {found_rows} stored rows and {found_planes} planes, but quantization_config "
            f"says rows={rows}, planes={planes}"
        )


def _read_layer(module: str, r: "Reader") -> LayerLayout:
    projections = {}
    for p in PROJECTIONS:
        pr = r.child(p)
        projections[p] = ProjectionLayout(
            rank=pr.positive_int("rank"), rows=tuple(pr.int_list("rows")), planes=tuple(pr.int_list("planes"))
        )
    return LayerLayout(module=module, **projections)
