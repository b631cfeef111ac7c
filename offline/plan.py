"""What a quantization run will do, settled before any heavy work: shapes, units, the budget and
whether it is feasible."""

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bitsmoe_vllm.activation import Activation
from bitsmoe_vllm.format import (
    BASIS_BITS,
    BIT_WIDTHS,
    FORMAT_VERSION,
    FP8_VERSION,
    PROJECTIONS,
    READABLE_VERSIONS,
    LayerLayout,
    ProjectionLayout,
    QuantConfig,
    odd_codes,
    stored_bits,
)

from .cost import unit_costs
from .rounding import REFINE_STEPS
from .source import SourceCheckpoint

# 2: the costs carry "nearest-*" (the cost model counting the error feedback); 3: "basis-*" files; 4: the costs of
# one basis per layer ("loss-layer"); 5: the layers after the first costed for its kind of basis only ("screen")
RUN_FORMAT = 5

# a basis per projection, or (-layer) one per layer that the gate, up and down projections share (FORMAT.md section 3)
BASIS_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "int8": "int8", "identity": "identity"}
BASIS_DTYPES |= {f"{k}-layer": v for k, v in BASIS_DTYPES.items() if k != "identity"}
# what --basis-dtype auto chooses from (bf16 rounds a basis, whose entries are below 1, coarser than fp16)
AUTO_BASES = ("int8-layer", "fp16-layer", "int8", "fp16", "identity")
GROUP_SIZES = (128, 96, 64, 32)  # tried in this order when --group-size is not given


def factor_kind(basis: str) -> str:
    """ "identity", "shared" (a basis per projection) or "layer" (one per layer): the factors' cost measurements,
    which every basis dtype of a kind has in common."""
    return "identity" if basis == "identity" else "layer" if basis.endswith("-layer") else "shared"


@dataclass(frozen=True)
class Options:
    """The command line of bitsmoe-quantize."""

    model: str
    out: str
    bits: float
    calib: tuple[str, ...]
    calib_tokens: int = 16384
    calib_seq_len: int = 512
    budget_scope: str = "all"
    allocation: str = "global"
    basis_dtype: str = "auto"  # or a key of BASIS_DTYPES
    rank: int | None = None  # None: chosen per run from Plan.rank_candidates
    candidate_bits: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8)
    unit_rows: int | None = None  # None: 8 with a shared basis, 1 with an identity basis (Plan.unit_rows)
    allow_high_error: bool = False  # write the checkpoint even when a layer's measured error marks a broken model
    scale_steps: int = REFINE_STEPS
    rounding: str = "gptq"  # or "nearest": each factor row rounded on its own (offline.gptq)
    # what gptq's Hessians are measured on: "quantized": each layer's inputs with the layers before it quantized
    # (as inference sees them), "original": the original model's
    feedback_inputs: str = "quantized"
    # what gptq's rounding of the down projection aims at: "layer": the expert's original output, on the inputs of
    # the gate and up as rounded (it compensates their errors); "projection": its own output on the original gate
    # and up's (GPTQ's objective, projection by projection)
    feedback_target: str = "layer"
    # None: 3 where the source stores fp8 linear weights (kept as stored), else 2; 1: even codes, for readers of
    # version 1; 2 with an fp8 source: its linear weights dequantized (FORMAT.md section 9)
    format_version: int | None = None
    group_size: int | None = None
    device: str = "cpu"
    workers: int = 1  # processes costing (and, where layers are independent, exporting) layers side by side
    resume: bool = False
    overwrite: bool = False

    def run_identity(self) -> dict:
        """The options that decide the output; a resumed run must have the same ones."""
        d = asdict(self)
        for key in ("resume", "overwrite", "out", "allow_high_error", "workers"):
            d.pop(key)
        d["calib"] = [str(Path(p).resolve()) for p in self.calib]
        d["run_format"] = RUN_FORMAT  # what a run directory holds changes with the code, not only with the options
        return d


@dataclass(frozen=True)
class Plan:
    source: SourceCheckpoint
    options: Options
    basis: str  # the basis this plan stores: a key of BASIS_DTYPES
    moe_layers: tuple[int, ...]
    hidden_size: int
    intermediate_size: int
    num_experts: int
    rank: int
    group_size: int
    widths: tuple[int, ...]
    unit_cost: torch.Tensor  # [units, J] bits of one expert's unit per width
    fixed_bits: float  # bits stored whatever the allocation (bases, bits tensors) in the budget's scope
    total_weights: int  # original routed-expert weights
    budget_bits: float  # for the factors' codes and scales: what the allocation may spend
    kinds: tuple[str, ...] | None = None  # the kinds of factors --basis-dtype auto keeps (selection.screen); None: all

    @property
    def basis_dtype(self) -> str:
        return BASIS_DTYPES[self.basis]

    @property
    def basis_sharing(self) -> str:
        """ "layer": one basis per layer for the gate, up and down projections; "projection": one each."""
        return "layer" if factor_kind(self.basis) == "layer" else "projection"

    @property
    def factor_kind(self) -> str:
        return factor_kind(self.basis)

    def basis_candidates(self) -> tuple[str, ...]:
        """The bases --basis-dtype allows; an identity basis has full rank, so not with a lower --rank."""
        if self.options.basis_dtype != "auto":
            return (self.options.basis_dtype,)
        full_rank = self.options.rank in (None, self.hidden_size)
        kept = tuple(b for b in AUTO_BASES if self.kinds is None or factor_kind(b) in self.kinds)
        return tuple(b for b in kept if b != "identity" or full_rank)

    def candidates_by_kind(self) -> dict[str, tuple[str, ...]]:
        """basis_candidates() grouped by factor_kind (the cost measurements they share), each in its order."""
        out: dict[str, tuple[str, ...]] = {}
        for b in self.basis_candidates():
            out[factor_kind(b)] = (*out.get(factor_kind(b), ()), b)
        return out

    def with_basis(self, basis: str) -> "Plan":
        """This plan storing `basis`, at --rank or full rank (--rank auto chooses at allocation)."""
        return replace(self, basis=basis).with_rank(self.options.rank or self.hidden_size)

    def with_kinds(self, kinds: tuple[str, ...]) -> "Plan":
        """This plan choosing among the bases of these kinds of factors only."""
        return replace(self, kinds=kinds)

    def for_layers(self, layers: tuple[int, ...]) -> "Plan":
        """This plan over some of its MoE layers, at their share of the budget."""
        weights = self.total_weights // len(self.moe_layers) * len(layers)
        return replace(self, moe_layers=tuple(layers), total_weights=weights).with_rank(self.rank)

    @property
    def odd_codes(self) -> bool:
        return odd_codes(self.options.format_version)

    @property
    def keeps_fp8(self) -> bool:
        """The source's fp8 linear weights are written as stored, with their scales (format version 3)."""
        return self.options.format_version >= FP8_VERSION

    @property
    def activation(self) -> Activation:
        return self.source.architecture.activation(self.source.config)

    @property
    def feedback_on_quantized_inputs(self) -> bool:
        """The export walks the model again so that each MoE layer's error feedback uses the quantized model's
        inputs; otherwise it uses the original model's, saved by calibration."""
        return self.options.rounding == "gptq" and self.options.feedback_inputs == "quantized"

    @property
    def unit_rows(self) -> int:
        """Rank rows per allocation unit. A shared basis orders its rows by energy, so neighbours are alike and
        can share a width: units of 8 rows lose little against one row each (an eighth of the units for the allocation
        to solve), where units of 32 had 26-30 % more KL on the trained MoE (benchmarks/README.md); the
        channels of an identity basis are in no order, so each row is its own unit."""
        return self.options.unit_rows or (1 if self.basis == "identity" else 8)

    def full_rank_basis_bits(self) -> float:
        """Bits per routed-expert weight the bases would cost at full rank: basis_bits * H / (E * I) for three, a
        third of it for one per layer."""
        bases = 1 if self.basis_sharing == "layer" else len(PROJECTIONS)
        return BASIS_BITS[self.basis_dtype] * self.hidden_size * bases / (3 * self.num_experts * self.intermediate_size)

    def feasible_bits(self) -> tuple[float, float]:
        """The feasible --bits over every rank this plan may choose."""
        return self.with_rank(min(self.rank_candidates())).bits_range()[0], self.bits_range()[1]

    def bits_range(self) -> tuple[float, float]:
        """Feasible --bits in the budget's scope: every unit at its cheapest width, every one at its widest."""
        per_layer = len(PROJECTIONS) * self.num_experts
        low = self.unit_cost.min(1).values.sum() * per_layer * len(self.moe_layers)
        high = self.unit_cost.max(1).values.sum() * per_layer * len(self.moe_layers)
        return float((low + self.fixed_bits) / self.total_weights), float((high + self.fixed_bits) / self.total_weights)

    def with_rank(self, rank: int) -> "Plan":
        """This plan with shared rank `rank`: its unit costs, the bits stored whatever the allocation, the budget."""
        o = self.options
        cost = unit_costs(rank, self.intermediate_size, list(self.widths), self.unit_rows, self.group_size)
        plan = replace(self, rank=rank, unit_cost=cost)
        empty = tuple([0] * self.num_experts)
        nothing = plan.quant_config(
            [
                plan.layout(i, dict.fromkeys(PROJECTIONS, empty), dict.fromkeys(PROJECTIONS, empty))
                for i in self.moe_layers
            ]
        )
        fixed = stored_bits(nothing)[o.budget_scope] * self.total_weights
        return replace(plan, fixed_bits=fixed, budget_bits=o.bits * self.total_weights - fixed)

    def rank_candidates(self) -> list[int]:
        """Ranks --rank auto chooses from: up to 16 multiples of --unit-rows, evenly spaced, ending at the hidden
        size; only the hidden size when 0 bits (dropping a row) is not a candidate width or the basis is the
        identity."""
        H, step = self.hidden_size, self.unit_rows
        if self.options.rank or 0 not in self.widths or step >= H or self.basis_dtype == "identity":
            return [self.options.rank or H]
        multiples = H // step
        return sorted({step * max(1, round(multiples * k / 16)) for k in range(1, 17)} | {H})

    def layout(self, layer: int, rows: dict[str, tuple[int, ...]], planes: dict[str, tuple[int, ...]]) -> LayerLayout:
        module = self.source.architecture.experts_module.format(layer=layer)
        return LayerLayout(module, **{p: ProjectionLayout(self.rank, rows[p], planes[p]) for p in PROJECTIONS})

    def quant_config(self, layouts: list[LayerLayout], achieved: dict[str, float] | None = None) -> QuantConfig:
        return QuantConfig(
            bits=self.options.bits,
            budget_scope=self.options.budget_scope,
            achieved_bits=achieved or {"all": 0.0, "factors": 0.0},
            candidate_bits=self.widths,
            group_size=self.group_size,
            basis_dtype=self.basis_dtype,
            basis_sharing=self.basis_sharing,
            activation=self.activation.name,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_experts=self.num_experts,
            projection_names=self.source.architecture.projection_names,
            layers=tuple(layouts),
            format_version=self.options.format_version,
            linear_quantization=self.source.file_config["quantization_config"] if self.keeps_fp8 else None,
            swiglu_alpha=self.activation.alpha,
            swiglu_limit=self.activation.limit,
            expert_bias=self.source.architecture.expert_bias,
        )


def make_plan(options: Options) -> Plan:
    """Check the options against the model and work out the budget; errors say what to change."""
    source = SourceCheckpoint(options.model)
    arch, config = source.architecture, source.config
    mxfp4 = source.mxfp4 and arch.fused_layout == "gpt_oss"
    method = (source.file_config.get("quantization_config") or {}).get("quant_method", "unknown")
    if "quantization_config" in source.file_config and (source.fp8_block is None or method != "fp8") and not mxfp4:
        raise ValueError(
            f"{source.dir} is already quantized (quant_method {method!r}); BitsMoE starts from the original weights, "
            "from fp8 block-quantized ones (DeepSeek-V3's quant_method 'fp8' with a weight_block_size) or from "
            "gpt-oss's MXFP4 experts"
        )
    moe_layers = tuple(source.moe_layers())
    if not moe_layers:
        raise ValueError(
            f"{source.dir} has no routed experts (looked for {arch.experts_module.format(layer='N')}.0.*): not an "
            "MoE model"
        )
    for i in moe_layers:
        source.check_expert_shapes(arch.experts_module.format(layer=i))
    H, I, E = config["hidden_size"], arch.intermediate_size(config), arch.num_experts(config)
    rank = options.rank or H  # None (auto): costs are measured at full rank, the rank is chosen at allocation
    if not 1 <= rank <= H:
        raise ValueError(f"--rank {rank}: must be between 1 and the hidden size {H}")
    widths = tuple(sorted(set(options.candidate_bits)))
    if not set(widths) <= set(BIT_WIDTHS) or not any(widths):
        raise ValueError(
            f"--candidate-bits {list(options.candidate_bits)}: expected widths from {list(BIT_WIDTHS)}, one above 0"
        )
    if options.basis_dtype not in ("auto", *BASIS_DTYPES):
        raise ValueError(f"--basis-dtype {options.basis_dtype}: expected one of {['auto', *BASIS_DTYPES]}")
    if options.basis_dtype == "identity" and rank != H:
        raise ValueError(f"--rank {rank}: an identity basis has rank {H} (the hidden size); leave --rank out")
    if options.allocation not in ("global", "per-layer"):
        raise ValueError(f"--allocation {options.allocation}: expected global or per-layer")
    if options.format_version is None:
        options = replace(options, format_version=FP8_VERSION if source.fp8_block else FORMAT_VERSION)
    if options.format_version not in READABLE_VERSIONS:
        raise ValueError(f"--format-version {options.format_version}: expected one of {list(READABLE_VERSIONS)}")
    if options.format_version >= FP8_VERSION and not source.fp8_block:
        raise ValueError(
            f"--format-version {options.format_version} keeps a source's fp8 linear weights as stored, and "
            f"{source.dir} has none: leave the option out"
        )
    if options.scale_steps < 0:
        raise ValueError(f"--scale-steps {options.scale_steps}: must be 0 or more")
    if options.unit_rows is not None and options.unit_rows < 1:
        raise ValueError(f"--unit-rows {options.unit_rows}: must be at least 1")
    group_size = choose_group_size(I, options.group_size)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is available to torch {torch.__version__}")
    first = "int8" if options.basis_dtype == "auto" else options.basis_dtype
    plan = Plan(
        source,
        options,
        first,
        moe_layers,
        H,
        I,
        E,
        H,
        group_size,
        widths,
        unit_cost=torch.zeros(0),
        fixed_bits=0.0,
        total_weights=len(moe_layers) * 3 * E * I * H,
        budget_bits=0.0,
    ).with_rank(rank)
    ranges = {basis: plan.with_basis(basis).feasible_bits() for basis in plan.basis_candidates()}
    low, high = min(r[0] for r in ranges.values()), max(r[1] for r in ranges.values())
    if not low - 1e-9 <= options.bits <= high + 1e-9:
        ranks = f"rank {rank}" if options.rank else f"ranks {min(plan.rank_candidates())}-{H}"
        bases = " or ".join(ranges)
        raise ValueError(
            f"--bits {options.bits} is outside the feasible range [{low:.4f}, {high:.4f}] ({options.budget_scope} "
            f"bits per routed-expert weight) for this model with {ranks}, group size {group_size}, {bases} bases "
            f"and candidate widths {list(widths)}"
        )
    return plan


def choose_group_size(intermediate_size: int, requested: int | None) -> int:
    if requested is not None:
        if requested % 32 or intermediate_size % requested:
            raise ValueError(
                f"--group-size {requested}: must be a multiple of 32 that divides the experts' intermediate size "
                f"{intermediate_size}"
            )
        return requested
    for g in GROUP_SIZES:
        if intermediate_size % g == 0:
            return g
    raise ValueError(
        f"the experts' intermediate size {intermediate_size} is not a multiple of 32; FORMAT.md v1 cannot store it"
    )
