"""bitsmoe-quantize, stage by stage: calibrate and cost every MoE layer, allocate bits over all of them,
export the checkpoint, finish (config, index, files, report, validation, move into place).
Every stage saves its result in OUT.partial/work, so --resume continues after a crash."""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from bitsmoe_vllm.checkpoint import validate_checkpoint
from bitsmoe_vllm.format import PROJECTIONS, stored_bits
from offline.allocate import allocate_in_parts, lp_bound
from offline.calibrate import embed, read_texts, token_sequences, walk_layers
from offline.cost import importance, unit_losses
from offline.decompose import basis_of, decompose, project
from offline.encode import encode_layer
from offline.export import copied_tensors, copy_side_files, shard_files, write_config, write_index, write_shard
from offline.modules import return_freed_memory, skeleton
from offline.plan import Options, Plan, make_plan
from offline.report import StageTimer, histograms, plot_allocation, write_report
from offline.rundir import RunDir


def quantize(options: Options) -> Path:
    plan = make_plan(options)
    if options.budget_scope == "all" and plan.full_rank_basis_bits() > options.bits / 2:
        print(f"bitsmoe-quantize: warning: the shared bases would cost {plan.full_rank_basis_bits():.2f} bits per "
              f"routed-expert weight at full rank ({plan.basis_dtype}, H {plan.hidden_size}, E x I "
              f"{plan.num_experts} x {plan.intermediate_size}), more than half of --bits {options.bits}; the rank will "
              "be cut hard. --basis-dtype identity stores no basis.", file=sys.stderr)  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan.source.dir)
    tokens = token_sequences(tokenizer, read_texts(list(options.calib)), options.calib_tokens, options.calib_seq_len)  # [S, L]
    run = RunDir(Path(options.out), options.run_identity(), options.resume, options.overwrite)
    timer = StageTimer()
    with timer("calibrate_and_cost"):
        losses, routed_tokens, energy = calibrate_and_cost(plan, run, tokens)  # [U, J], [L, E], [L]
    with timer("allocate"):
        plan, choice, stats = allocate_bits(plan, run, losses)
    with timer("export"):
        files = export_shards(plan, run, row_bits(plan, choice))
    finish(plan, run, choice, losses, routed_tokens, energy, stats, files, timer)
    return run.finish()


def expert_weights(plan: Plan, layer: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {p: w.to(device) for p, w in plan.source.expert_weights(layer).items()}


def layer_losses(plan: Plan, layer: int, routed, n_tokens: int, device: torch.device) -> torch.Tensor:
    """[3 * E * units, J] unit losses of one MoE layer; one projection's factors in memory at a time."""
    weights = expert_weights(plan, layer, device)
    bases = {p: basis_of(weights[p], plan.rank, plan.basis_dtype) for p in PROJECTIONS}
    weight, losses = importance(routed, weights, bases, n_tokens), []
    for p in PROJECTIONS:
        factors = project(weights[p], bases[p])
        loss = unit_losses(factors, weight.pop(p), list(plan.widths), plan.unit_rows, plan.group_size, plan.options.scale_steps)
        losses.append(loss.reshape(-1, len(plan.widths)).cpu())
        del factors
    return torch.cat(losses)


def residual_energy(hidden: torch.Tensor) -> float:
    """Median squared norm per token of the residual stream after a layer [S, L, H]. The next layers read the
    residual through RMS norms, so an output error matters relative to it: dividing each layer's losses by it
    makes them comparable across layers for the global budget (the median ignores attention-sink tokens)."""
    return float(hidden.float().pow(2).sum(-1).median())


def calibrate_and_cost(plan: Plan, run: RunDir, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit losses relative to the residual energy [units of all layers, J], routed tokens per expert [L, E] and
    the residual energy [L], layer after layer; each layer's are saved as it completes."""
    device = torch.device(plan.options.device)
    if any(run.load(f"layer-{i:05d}") is None for i in plan.moe_layers):
        model = skeleton(plan.source, device)
        saved = run.load("hidden")
        if saved is not None:
            hidden, first = saved[0]["hidden"], int(saved[1]["layer"]) + 1
        else:
            hidden, first = embed(model, plan.source, tokens, device), 0
        n_tokens = hidden.shape[0] * hidden.shape[1]
        walk = walk_layers(model, plan.source, hidden, first, set(plan.moe_layers), device)
        del hidden  # the walk holds the hidden states; one copy in memory, not two
        for i, after, routed in walk:
            if routed is not None:
                routed_tokens = torch.bincount(routed.ids.flatten().cpu(), minlength=plan.num_experts)  # [E]
                if (routed_tokens == 0).any():
                    unused = (routed_tokens == 0).nonzero().flatten().tolist()
                    print(f"bitsmoe-quantize: warning: layer {i}: experts {unused} got no calibration token; their "
                          "estimated loss is 0, so they will get 0 bits; pass more calibration text", file=sys.stderr)  # fmt: skip
                energy = residual_energy(after)
                losses = layer_losses(plan, i, routed, n_tokens, device) / energy
                run.save(f"layer-{i:05d}", {"loss": losses, "routed_tokens": routed_tokens, "residual_energy": torch.tensor(energy, dtype=torch.float64)})
            run.save("hidden", {"hidden": after}, {"layer": str(i)})
            plan.source.tensors.close()
            return_freed_memory()
            if i >= plan.moe_layers[-1]:
                break
    saved = [run.load(f"layer-{i:05d}")[0] for i in plan.moe_layers]
    return torch.cat([s["loss"] for s in saved]), torch.stack([s["routed_tokens"] for s in saved]), torch.stack([s["residual_energy"] for s in saved])


def allocate_bits(plan: Plan, run: RunDir, losses: torch.Tensor) -> tuple[Plan, torch.Tensor, dict]:
    """The plan at its final rank; the chosen option (index into plan.widths) of every unit of the cost
    measurement [U] (units past the rank at width 0); and the solver's statistics."""
    saved = run.load("allocation")
    if saved is None:
        rank, bounds = choose_rank(plan, losses)
        kept = kept_units(plan, rank)
        final = plan.with_rank(rank)
        loss, cost = losses[kept].numpy(), unit_costs_of(plan)[kept].numpy()
        parts = 1 if plan.options.allocation == "global" else len(plan.moe_layers)
        result = allocate_in_parts(loss, cost, final.budget_bits, parts)
        choice = torch.zeros(len(losses), dtype=torch.long)  # plan.widths starts at 0 whenever rows are dropped
        choice[kept] = torch.from_numpy(result.choice)
        stats = {k: v for k, v in dataclasses.asdict(result).items() if k != "choice"}
        stats |= {"units": int(kept.sum()), "unit_rows": plan.unit_rows, "budget_bits": final.budget_bits, "rank": rank,
                  "dropped_rows_loss": float(losses[~kept, 0].sum())}  # fmt: skip
        stats |= {"rank_lp_bounds": {str(r): b for r, b in bounds.items()}} if bounds else {}
        run.save("allocation", {"choice": choice}, {"stats": json.dumps(stats)})
        saved = run.load("allocation")
    stats = json.loads(saved[1]["stats"])
    return plan.with_rank(stats["rank"]), saved[0]["choice"], stats


def unit_costs_of(plan: Plan) -> torch.Tensor:
    """[U, J] bits of every unit of every layer, projection and expert, per width."""
    return plan.unit_cost.repeat(len(plan.moe_layers) * len(PROJECTIONS) * plan.num_experts, 1)


def kept_units(plan: Plan, rank: int) -> torch.Tensor:
    """[U] bool: the units (of plan's rank) whose rows lie below `rank`."""
    per_expert = len(plan.unit_cost)
    first_row = torch.arange(per_expert * len(plan.moe_layers) * len(PROJECTIONS) * plan.num_experts) % per_expert * plan.unit_rows
    return first_row < rank


def choose_rank(plan: Plan, losses: torch.Tensor) -> tuple[int, dict[int, float]]:
    """--rank auto: the candidate rank whose allocation has the least loss by the LP bound (rows past the rank
    lose their whole energy, the bases cost less); the given rank otherwise."""
    candidates = plan.rank_candidates()
    if len(candidates) == 1:
        return candidates[0], {}
    cost, bounds = unit_costs_of(plan), {}
    for rank in candidates:
        kept = kept_units(plan, rank)
        dropped = float(losses[~kept, 0].sum())
        bounds[rank] = lp_bound(losses[kept].numpy(), cost[kept].numpy(), plan.with_rank(rank).budget_bits) + dropped
    return min(bounds, key=lambda r: (bounds[r], r)), bounds


def row_bits(plan: Plan, choice: torch.Tensor) -> dict[int, torch.Tensor]:
    """MoE layer -> the width of every rank row [3, E, R]."""
    widths = torch.tensor(plan.widths)[choice].reshape(len(plan.moe_layers), len(PROJECTIONS), plan.num_experts, -1)
    rows = widths.repeat_interleave(plan.unit_rows, dim=-1)[..., : plan.rank]
    return dict(zip(plan.moe_layers, rows))


def export_shards(plan: Plan, run: RunDir, bits: dict[int, torch.Tensor]) -> list[str]:
    """Write each decoder layer's shard (BitsMoE tensors + its other tensors, unchanged) and the rest."""
    device = torch.device(plan.options.device)
    arch, n_layers = plan.source.architecture, plan.source.config["num_hidden_layers"]
    files = shard_files(n_layers)
    for i in tqdm(range(n_layers + 1), desc="export", unit="shard"):
        path = run.checkpoint / files[i]
        if path.is_file():
            continue
        if i == n_layers:
            write_shard(path, copied_tensors(plan.source, None, None))
            continue
        module = arch.experts_module.format(layer=i) if i in bits else None
        tensors = copied_tensors(plan.source, f"model.layers.{i}.", module)
        if module:
            weights = expert_weights(plan, i, device)
            decompositions = {p: decompose(weights.pop(p), plan.rank, plan.basis_dtype) for p in PROJECTIONS}
            widths = dict(zip(PROJECTIONS, bits[i]))
            _, encoded = encode_layer(module, decompositions, widths, group_size=plan.group_size,
                                      basis_dtype=plan.basis_dtype, projection_names=arch.projection_names,
                                      scale_steps=plan.options.scale_steps)  # fmt: skip
            tensors |= {name: t.cpu() for name, t in encoded.items()}
        write_shard(path, tensors)
        plan.source.tensors.close()
        return_freed_memory()
    return files


def finish(
    plan: Plan, run: RunDir, choice: torch.Tensor, losses: torch.Tensor, routed_tokens: torch.Tensor, energy: torch.Tensor, stats: dict,
    files: list[str], timer: StageTimer,
) -> None:
    """config.json, the index, tokenizer and other files, validation by re-reading, the report and plots."""
    bits = row_bits(plan, choice)
    layouts = [
        plan.layout(i, {p: tuple((b[j] > 0).sum(1).tolist()) for j, p in enumerate(PROJECTIONS)},
                    {p: tuple(b[j].sum(1).tolist()) for j, p in enumerate(PROJECTIONS)})
        for i, b in bits.items()
    ]  # fmt: skip
    draft = plan.quant_config(layouts)
    cfg = dataclasses.replace(draft, achieved_bits=stored_bits(draft))
    cfg.validate()
    write_config(run.checkpoint, plan.source, cfg)
    write_index(run.checkpoint, files)
    copied = copy_side_files(plan.source, run.checkpoint)
    validate_checkpoint(run.checkpoint)
    plots = plot_allocation(run.checkpoint, bits)
    relative = losses.gather(1, choice[:, None]).reshape(len(plan.moe_layers), len(PROJECTIONS), -1).sum(-1)  # [L, 3]
    chosen = relative * energy[:, None].to(relative.dtype)  # squared output error per token
    write_report(run.checkpoint / "quantization_report.json", {
        "model": str(plan.source.dir),
        "options": plan.options.run_identity(),
        "bits": {"budget": plan.options.bits, "budget_scope": plan.options.budget_scope,
                 "achieved_all": cfg.achieved_bits["all"], "achieved_factors": cfg.achieved_bits["factors"],
                 "routed_expert_weights": plan.total_weights, "non_expert_params": non_expert_params(plan)},
        "allocation": stats,
        "layers": {
            layout.module: {
                **{p: {"histogram": hist[p], "estimated_loss": float(chosen[k, j])} for j, p in enumerate(PROJECTIONS)},
                "routed_tokens_per_expert": routed_tokens[k].tolist(),
                "residual_energy": float(energy[k]),
            }
            for k, (layout, hist) in enumerate(zip(layouts, histograms(bits, plan.widths).values()))
        },
        "stages": timer.stages,
        "files": copied + plots,
    })  # fmt: skip


def non_expert_params(plan: Plan) -> int:
    """Parameters BitsMoE leaves as they are (attention, router, shared experts, embeddings...)."""
    experts = tuple(f"{plan.source.architecture.experts_module.format(layer=i)}." for i in plan.moe_layers)
    return sum(plan.source.tensors.numel(n) for n in plan.source.tensors if not n.startswith(experts))
