"""vLLM's MoE method for a BitsMoE layer.

Parameters are sized from quantization_config before any tensor is read, filled by vLLM's own
per-expert name mapping (FORMAT.md names route to `w13_*` for gate (shard w1) and up (w3), `w2_*`
for down), checked against FORMAT.md as they arrive, and handed to one op, `torch.ops.bitsmoe.moe`.

Parameters of a layer holding experts L (local) with tensor-parallel slice I_tp of I:
    w13_codes  [sum_L planes_gate + sum_L planes_up, I_tp/32] int32    gate experts, then up experts
    w13_scales [sum_L rows_gate + sum_L rows_up, I_tp/G] float16
    w13_bits   [|L|, R_gate + R_up] uint8
    w13_basis  [R_gate + R_up, H]  (+ w13_basis_scale [R_gate + R_up] for int8)
    w2_codes, w2_scales, w2_bits [|L|, R_down], w2_basis [H, R_down] (+ w2_basis_scale [H])
    w13_bias [|L|, 2 I_tp], w2_bias [|L|, H] float32                   with expert biases (gpt-oss)
No basis parameters for an identity basis.
"""

from dataclasses import dataclass
from functools import partial

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from bitsmoe_vllm import backend, ops
from bitsmoe_vllm.format import (
    BASIS_DTYPES,
    BIAS_DTYPE,
    BITS_DTYPE,
    CODES_DTYPE,
    SCALES_DTYPE,
    LayerLayout,
    QuantConfig,
    basis_name,
    basis_scale_name,
    check_bits,
    expert_tensor_name,
    layer_tensor_specs,
)
from bitsmoe_vllm.packing import WORD_BITS
from bitsmoe_vllm.reference import Basis, Biases, Factors, MoELayer

SHARD_PROJECTION = {"w1": "gate", "w3": "up", "w2": "down"}
PARAM_OF = {"gate": "w13", "up": "w13", "down": "w2"}


@dataclass(frozen=True)
class Region:
    """Where one projection's pieces sit in its w13_/w2_ parameters."""

    plane_at: dict[int, int]  # global expert -> first row in *_codes
    row_at: dict[int, int]  # global expert -> first row in *_scales
    rank_at: int  # first column of *_bits, first row of a gate/up basis
    planes: int
    rows: int


class BitsMoEMoEMethod(FusedMoEMethodBase):
    def __init__(self, moe, spec: QuantConfig, layout: LayerLayout):
        super().__init__(moe)
        self.spec, self.layout = spec, layout
        self.specs = layer_tensor_specs(spec, layout)  # checkpoint name -> unsharded spec
        self.arrived: set[str] = set()
        self.layer: MoELayer | None = None
        self.kernel: ops.Kernel = None  # what the backend oracle chose at load (bitsmoe_vllm/backend.py)

    def create_weights(
        self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int, params_dtype, **extra
    ):
        self._refuse_unsupported(layer, hidden_size, intermediate_size_per_partition)
        spec, I_tp = self.spec, intermediate_size_per_partition
        local_id = {g: layer._map_global_expert_id_to_local_expert_id(g) for g in range(spec.num_experts)}
        # the experts held here, in local-id order
        self.local = sorted((g for g, i in local_id.items() if i >= 0), key=local_id.get)
        self.regions = self._regions()
        sizes = {"w13": self._totals(("gate", "up")), "w2": self._totals(("down",))}
        R = {p: self.layout.projection(p).rank for p in ("gate", "up", "down")}
        basis_dtype = BASIS_DTYPES[spec.basis_dtype]
        shapes = {
            "w13_codes": ((sizes["w13"][0], I_tp // WORD_BITS), CODES_DTYPE),
            "w13_scales": ((sizes["w13"][1], I_tp // spec.group_size), SCALES_DTYPE),
            "w13_bits": ((len(self.local), R["gate"] + R["up"]), BITS_DTYPE),
            "w2_codes": ((sizes["w2"][0], I_tp // WORD_BITS), CODES_DTYPE),
            "w2_scales": ((sizes["w2"][1], I_tp // spec.group_size), SCALES_DTYPE),
            "w2_bits": ((len(self.local), R["down"]), BITS_DTYPE),
        }
        if basis_dtype is not None:  # not an identity basis
            shapes |= {
                "w13_basis": ((R["gate"] + R["up"], hidden_size), basis_dtype),
                "w2_basis": ((hidden_size, R["down"]), basis_dtype),
            }
        if spec.basis_dtype == "int8":
            shapes |= {
                "w13_basis_scale": ((R["gate"] + R["up"],), SCALES_DTYPE),
                "w2_basis_scale": ((hidden_size,), SCALES_DTYPE),
            }
        if spec.expert_bias:  # gate's then up's columns of this rank; down's added by rank 0 only (FORMAT.md 7)
            shapes |= {
                "w13_bias": ((len(self.local), 2 * I_tp), BIAS_DTYPE),
                "w2_bias": ((len(self.local), hidden_size), BIAS_DTYPE),
            }
        if spec.basis_sharing == "layer":  # filled from the gate's basis: vLLM wants every parameter named in the file
            shape, dtype = shapes.pop("w2_basis")
            layer.w2_basis = torch.zeros(shape, dtype=dtype)
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(param, {"weight_loader": partial(self._load, layer, name.partition("_")[2])})

    def _refuse_unsupported(self, layer, hidden_size: int, I_tp: int) -> None:
        spec, where = self.spec, f"BitsMoE layer {self.layout.module}"
        tp = self.moe.moe_parallel_config.tp_size
        problems = [
            (
                hidden_size != spec.hidden_size,
                f"hidden size {hidden_size} in vLLM, {spec.hidden_size} in quantization_config",
            ),
            (
                layer.global_num_experts != spec.num_experts,
                f"{layer.global_num_experts} experts in vLLM (redundant experts included), "
                f"{spec.num_experts} in the checkpoint",
            ),
            (
                I_tp * tp != spec.intermediate_size,
                f"intermediate size {I_tp} x {tp} tensor-parallel ranks in vLLM, "
                f"{spec.intermediate_size} in the checkpoint",
            ),
            (
                I_tp % spec.group_size != 0,
                (
                    f"each of {tp} tensor-parallel ranks holds {I_tp} of the {spec.intermediate_size} intermediate "
                    f"columns, not a multiple of the checkpoint's group_size {spec.group_size}; serve with fewer "
                    "tensor-parallel ranks or with expert parallelism (--enable-expert-parallel)"
                    + (f", or quantize with a --group-size that divides {I_tp}" if I_tp % WORD_BITS == 0 else "")
                ),
            ),
            (
                self.moe.activation.value != spec.activation,
                f"activation {self.moe.activation.value} in vLLM, {spec.activation} in the checkpoint",
            ),
            (
                self.moe.has_bias != spec.expert_bias,
                f"expert biases {'in vLLM' if self.moe.has_bias else 'in the checkpoint'} but not in "
                f"{'the checkpoint' if self.moe.has_bias else 'vLLM'}",
            ),
            (
                layer.apply_router_weight_on_input,
                "routing weights applied to the input, which BitsMoE does not support",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"{where}: unsupported configuration: {message}")

    def _regions(self) -> dict[str, Region]:
        regions, plane, row = {}, {"w13": 0, "w2": 0}, {"w13": 0, "w2": 0}
        rank_at = 0
        for p in ("gate", "up", "down"):
            pl, param = self.layout.projection(p), PARAM_OF[p]
            plane_at, row_at = {}, {}
            for g in self.local:
                plane_at[g], row_at[g] = plane[param], row[param]
                plane[param] += pl.planes[g]
                row[param] += pl.rows[g]
            regions[p] = Region(
                plane_at,
                row_at,
                0 if p == "down" else rank_at,
                sum(pl.planes[g] for g in self.local),
                sum(pl.rows[g] for g in self.local),
            )
            rank_at += pl.rank if p != "down" else 0
        return regions

    def _totals(self, projections: tuple[str, ...]) -> tuple[int, int]:
        return sum(self.regions[p].planes for p in projections), sum(self.regions[p].rows for p in projections)

    def _load(
        self, layer, kind: str, param, loaded_weight, weight_name, shard_id=None, expert_id=None, return_success=False
    ):
        """vLLM's per-expert weight loader for parameter kind `kind` (codes, scales, bits, basis, basis_scale)."""
        p = SHARD_PROJECTION[shard_id]
        checkpoint_name = self.checkpoint_name(kind, p, expert_id)
        region, pl = self.regions[p], self.layout.projection(p)
        self._check(checkpoint_name, loaded_weight)
        if kind == "bits":
            check_bits(self.spec, checkpoint_name, loaded_weight, pl.rows[expert_id], pl.planes[expert_id])
        if kind.startswith("basis") and self.spec.basis_sharing == "layer":  # the gate's serves all three
            self._load_layer_basis(layer, kind, p, loaded_weight)
            self.arrived.add(checkpoint_name)
            return True if return_success else None
        if kind.startswith("basis"):  # the layer's, whatever experts this rank holds
            target = param.data if p == "down" else param.data[region.rank_at : region.rank_at + pl.rank]
        else:
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local < 0:
                return False if return_success else None
            loaded_weight = self._tp_slice(kind, loaded_weight, p)
            if kind == "bias":
                I_tp = param.shape[1] // 2
                target = param.data[local] if p == "down" else param.data[local].narrow(0, (p == "up") * I_tp, I_tp)
                if p == "down" and self.moe.moe_parallel_config.tp_rank != 0:  # summed over ranks: added once
                    loaded_weight = torch.zeros_like(loaded_weight)
            elif kind == "bits":
                target = param.data[local, region.rank_at : region.rank_at + pl.rank]
            elif kind == "codes":
                target = param.data.narrow(0, region.plane_at[expert_id], pl.planes[expert_id])
            else:
                target = param.data.narrow(0, region.row_at[expert_id], pl.rows[expert_id])
        target.copy_(loaded_weight)
        self.arrived.add(checkpoint_name)
        return True if return_success else None

    def _load_layer_basis(self, layer, kind: str, projection: str, loaded: torch.Tensor) -> None:
        """One basis per layer (basis_sharing "layer"): into the gate's and up's rows of w13 and, transposed, w2;
        the gate's scales into both halves of w13's, down's one scale into every row of w2's (reference.layer_bases)."""
        if kind == "basis":
            layer.w13_basis.data.copy_(torch.cat([loaded, loaded]))
            layer.w2_basis.data.copy_(loaded.T)
        elif projection == "down":
            layer.w2_basis_scale.data.copy_(loaded.expand_as(layer.w2_basis_scale))
        else:
            layer.w13_basis_scale.data.copy_(torch.cat([loaded, loaded]))

    def checkpoint_name(self, kind: str, projection: str, expert: int) -> str:
        name = self.spec.projection_names[projection]
        if kind == "basis":
            return basis_name(self.layout.module, name)
        if kind == "basis_scale":
            return basis_scale_name(self.layout.module, name)
        return expert_tensor_name(self.layout.module, expert, name, kind)

    def _check(self, name: str, t: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(
                f"unexpected tensor '{name}' in a BitsMoE checkpoint (FORMAT.md section 3 has no such tensor)"
            )
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ValueError(
                f"tensor '{name}': expected {spec.dtype} {list(spec.shape)}, found {t.dtype} {list(t.shape)}"
            )
        if t.dtype.is_floating_point and not torch.isfinite(t).all():
            raise ValueError(f"tensor '{name}': holds NaN or Inf")

    def _tp_slice(self, kind: str, t: torch.Tensor, projection: str) -> torch.Tensor:
        """This rank's columns of a codes or scales tensor, its entries of a gate or up bias (FORMAT.md section 7)."""
        parallel = self.moe.moe_parallel_config
        if kind == "bits" or parallel.tp_size == 1 or (kind == "bias" and projection == "down"):
            return t  # (down's bias [H]: replicated)
        if kind == "bias":  # gate's or up's [I]
            width = self.spec.intermediate_size // parallel.tp_size
            return t.narrow(0, parallel.tp_rank * width, width)
        per_column = WORD_BITS if kind == "codes" else self.spec.group_size
        width = self.spec.intermediate_size // parallel.tp_size // per_column
        return t.narrow(1, parallel.tp_rank * width, width)

    def process_weights_after_loading(self, layer) -> None:
        expected = {
            self.checkpoint_name(k, p, g)
            for p in ("gate", "up", "down")
            for g in self.local
            for k in ("codes", "scales", "bits") + ("bias",) * self.spec.expert_bias
        }
        expected |= {n for n in self.specs if ".basis" in n}
        missing = sorted(expected - self.arrived)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"BitsMoE checkpoint is missing tensor '{missing[0]}'{more}")
        R = {p: self.layout.projection(p).rank for p in ("gate", "up", "down")}
        g = self.regions["gate"]
        scale = getattr(layer, "w13_basis_scale", None)

        def rows(t, start, n):
            return None if t is None else t[start : start + n]

        if self.spec.basis_dtype == "identity":
            bases = (None, None, None)
        else:
            bases = (
                Basis(layer.w13_basis[: R["gate"]], rows(scale, 0, R["gate"])),
                Basis(layer.w13_basis[R["gate"] :], rows(scale, R["gate"], R["up"])),
                Basis(layer.w2_basis, getattr(layer, "w2_basis_scale", None)),
            )
        odd = self.spec.odd_codes
        self.layer = MoELayer(
            *bases,
            Factors(
                layer.w13_codes[: g.planes],
                layer.w13_scales[: g.rows],
                layer.w13_bits[:, : R["gate"]].contiguous(),
                odd,
            ),
            Factors(
                layer.w13_codes[g.planes :],
                layer.w13_scales[g.rows :],
                layer.w13_bits[:, R["gate"] :].contiguous(),
                odd,
            ),
            Factors(layer.w2_codes, layer.w2_scales, layer.w2_bits, odd),
            self.spec.group_size,
            self.spec.act,
            # gate's and up's made contiguous once: the kernels would copy the strided halves at every call
            Biases(*(b.contiguous() for b in layer.w13_bias.chunk(2, dim=1)), layer.w2_bias)
            if self.spec.expert_bias
            else None,
        )
        self.kernel, choice = backend.prepare(self.layer, self.layout.module)
        if choice.backend is backend.Backend.CPU_INT:  # the factors and int8 bases now live in the CPU layout
            self.layer = None
            for name in ("w13_codes", "w13_scales", "w2_codes", "w2_scales", "w13_basis", "w2_basis"):
                if hasattr(layer, name):  # no bases with basis_dtype identity
                    getattr(layer, name).data = getattr(layer, name).data.new_empty(0)

    def get_fused_moe_quant_config(self, layer):
        return None

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        """Routed-expert output [T, H]; shared experts are run by vLLM's runner."""
        ids = topk_ids if layer.expert_map is None else layer.expert_map[topk_ids.long()]
        return ops.moe_layer(x, topk_weights, ids, self.layer, self.kernel)
