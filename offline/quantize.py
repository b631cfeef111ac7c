"""bitsmoe-quantize, stage by stage: calibrate and cost every MoE layer, choose the basis and allocate bits over all
of them, export the checkpoint (each MoE layer rounded on the inputs the layers already quantized give it; config,
index, files, validation), check every layer's error on held-out tokens, write the report and move the checkpoint
into place. Every stage saves its result in OUT.partial/work, so --resume continues after a crash."""

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from bitsmoe_vllm.checkpoint import validate_checkpoint
from bitsmoe_vllm.format import PROJECTIONS, LayerLayout, QuantConfig, expert_tensor_name, stored_bits
from bitsmoe_vllm.reference import gather_layer, moe_forward

from . import guard, selection
from .allocate import allocate_in_parts
from .calibrate import Routed, embed, read_texts, token_sequences, walk_layers
from .cost_files import CostFiles
from .decompose import decompose
from .encode import encode_layer
from .export import copied_tensors, copy_side_files, shard_files, write_config, write_index, write_shard
from .feedback import feedback_rounding
from .layer_cost import basis_key, layer_costs, residual_energy, shared_bases
from .modules import return_freed_memory, skeleton
from .plan import Options, Plan, make_plan
from .report import StageTimer, plot_allocation, report, write_report
from .rundir import RunDir
from .workers import Workers


def quantize(options: Options) -> Path:
    plan = make_plan(options)
    explicit_shared = options.basis_dtype not in ("auto", "identity")
    if explicit_shared and options.budget_scope == "all" and plan.full_rank_basis_bits() > options.bits / 2:
        print(
            f"bitsmoe-quantize: warning: the shared bases would cost {plan.full_rank_basis_bits():.2f} bits per "
            f"routed-expert weight at full rank ({plan.basis_dtype}, H {plan.hidden_size}, E x I "
            f"{plan.num_experts} x {plan.intermediate_size}), more than half of --bits {options.bits}; the rank will "
            "be cut hard. --basis-dtype auto chooses between shared and identity bases.",
            file=sys.stderr,
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(plan.source.dir)
    texts = read_texts(list(options.calib))
    held_out = guard.held_out_count(-(-options.calib_tokens // options.calib_seq_len))
    tokens = token_sequences(tokenizer, texts, options.calib_tokens, options.calib_seq_len, held_out)  # [S, L]
    held = guard.held_out_mask(len(tokens), held_out)  # [S]
    run = RunDir(Path(options.out), plan.options.run_identity(), options.resume, options.overwrite)
    timer = StageTimer()
    pool = Workers(options, run, options.workers) if options.workers > 1 else None
    try:
        with timer("calibrate_and_cost"):
            # the layers' cost files, [L, E], [L]
            costs, routed_tokens, energy = calibrate_and_cost(plan, run, tokens, held, pool)
        with timer("allocate"):
            plan, choice, stats = allocate_bits(screened(plan, run), run, costs)
            losses = costs.chosen(f"loss-{plan.factor_kind}", choice)  # each unit's loss at its width, for the report
        with timer("export"):
            files = export_shards(plan, run, row_bits(plan, choice), tokens, held, pool)
    finally:
        if pool:
            pool.close()
    # the workers' memory is not in the main process's peak: the largest of theirs (VmHWM after each job)
    workers = {"count": options.workers} | ({"peak_rss_mb_largest": pool.peak_rss_mb} if pool else {})
    cfg, written = write_checkpoint(plan, run, choice, files)
    with timer("check"):
        records = {module: run.load(f"held-out-{i:05d}")[0] for i, module in module_of(plan).items()}
        errors = guard.relative_errors(run.checkpoint, records)
    bits, modules = row_bits(plan, choice), list(module_of(plan).values())
    summary = report(plan, cfg, bits, modules, losses, routed_tokens, energy, stats, errors, timer)
    summary |= {"workers": workers}
    write_report(run.checkpoint / "quantization_report.json", summary | {"files": written})
    if not options.allow_high_error:
        try:
            guard.check(errors, options.bits, plan.basis)
        except guard.QualityError:
            run.discard()
            raise
    return run.finish()


ROUTED_FIELDS = tuple(f.name for f in dataclasses.fields(Routed))


def module_of(plan: Plan) -> dict[int, str]:
    return {i: plan.source.architecture.experts_module.format(layer=i) for i in plan.moe_layers}


def calibrate_and_cost(
    plan: Plan, run: RunDir, tokens: torch.Tensor, held: torch.Tensor, pool: Workers | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Costs of every MoE layer (offline.layer_cost.layer_costs, concatenated over the layers), routed tokens per
    expert [L, E] and the residual energy [L], layer after layer from the sequences `tokens` [S, L] not `held` [S];
    each layer's are saved as it completes, with the held-out sequences' record for the quality guard. With `pool`,
    the workers cost the layers (cost_layer) while this process walks on."""
    calib_tokens = int((~held).sum()) * tokens.shape[1]
    missing = [i for i in plan.moe_layers if not run.has(f"layer-{i:05d}")]

    def cost(i: int, walked: dict | None = None) -> None:
        if pool and not (screens(plan) and i == plan.moe_layers[0]):
            pool.submit(cost_layer, i, calib_tokens)
        else:  # the first layer in this process when it screens the kinds of basis: the later layers wait on it
            cost_layer(plan, run, i, calib_tokens, walked)

    for i in (i for i in missing if run.has(f"walked-{i:05d}")):  # walked before an interruption, not costed
        cost(i)
    if missing:
        with pool.main_share() if pool else contextlib.nullcontext():
            for i, after, routed in walk(plan, run, tokens, "hidden"):
                if routed is None:
                    continue
                calib, held_out = split_held_out(routed, held, tokens.shape[1])
                routed_tokens = torch.bincount(calib.ids.flatten().cpu(), minlength=plan.num_experts)  # [E]
                if (routed_tokens == 0).any():
                    unused = (routed_tokens == 0).nonzero().flatten().tolist()
                    warning = (
                        f"bitsmoe-quantize: warning: layer {i}: experts {unused} got no calibration token; their "
                        "costs come from the layer's tokens (a prior); pass more calibration text to measure them"
                    )
                    print(warning, file=sys.stderr)
                walked = {
                    **{f"calib-{k}": getattr(calib, k).cpu() for k in ROUTED_FIELDS},
                    **{f"held-{k}": getattr(held_out, k).cpu() for k in ROUTED_FIELDS},
                    "energy": torch.tensor(residual_energy(after[~held]), dtype=torch.float64),
                }
                if pool:  # a worker reads them from the run directory
                    run.save(f"walked-{i:05d}", walked)
                cost(i, None if pool else walked)
                del walked, calib, held_out
            if pool:
                pool.wait("cost")
    costs = CostFiles([run.path(f"layer-{i:05d}") for i in plan.moe_layers])
    return costs, costs.stacked("routed_tokens"), costs.stacked("residual_energy")


def cost_layer(plan: Plan, run: RunDir, i: int, calib_tokens: int, walked: dict | None = None) -> None:
    """MoE layer i's costs, its shared bases and its held-out record, from what the walk gave it (`walked`, else
    saved in the run as walked-i), saved in the run."""
    saved = walked is None
    walked = run.load(f"walked-{i:05d}")[0] if saved else walked
    plan = screened(plan, run) if i != plan.moe_layers[0] else plan
    calib, held_out = (Routed(*(walked[f"{part}-{k}"] for k in ROUTED_FIELDS)) for part in ("calib", "held"))
    energy = float(walked["energy"])
    device = torch.device(plan.options.device)
    weights = expert_weights(plan, i, device)
    bases = shared_bases(plan, weights)
    if bases:
        run.save(f"basis-{i:05d}", {k: v.cpu() for k, v in bases.items()})
    costs = {k: v / energy for k, v in layer_costs(plan, weights, calib, calib_tokens, bases).items()}
    run.save(
        f"held-out-{i:05d}",
        {k: v.cpu() for k, v in guard.held_out_record(weights, held_out, plan.activation).items()},
    )
    if plan.options.rounding == "gptq" and not plan.feedback_on_quantized_inputs:
        # bf16: the Hessians need no more, and a big model's are GBs
        run.save(
            f"routed-{i:05d}",
            {"x": calib.x.bfloat16().cpu(), "ids": calib.ids.cpu(), "weights": calib.weights.cpu()},
        )
    del weights
    routed_tokens = torch.bincount(calib.ids.flatten().cpu(), minlength=plan.num_experts)
    costs |= {"routed_tokens": routed_tokens, "residual_energy": walked["energy"]}
    run.save(f"layer-{i:05d}", costs)
    if saved:
        run.remove(f"walked-{i:05d}")
    if i == plan.moe_layers[0]:
        screened(plan, run)


def screens(plan: Plan) -> bool:
    """Whether the MoE layers after the first are costed only for the kind of basis the first one's costs choose
    (offline.selection.screen)."""
    return len(plan.candidates_by_kind()) > 1 and len(plan.moe_layers) > 1


def screened(plan: Plan, run: RunDir) -> Plan:
    """plan, keeping only the kind of basis screened on the first MoE layer's costs (saved in the run as "screen"
    once they are), where it screens."""
    if not screens(plan):
        return plan
    if not run.has("screen"):
        info = selection.screen(plan, CostFiles([run.path(f"layer-{plan.moe_layers[0]:05d}")]))
        run.save("screen", {}, {"screen": json.dumps(info)})
    return plan.with_kinds((screen_info(run)["kind"],))


def screen_info(run: RunDir) -> dict:
    return json.loads(run.load("screen")[1]["screen"])


def walk(plan: Plan, run: RunDir, tokens: torch.Tensor, saved_as: str, replace=None, desc="calibrate") -> Iterator:
    """offline.calibrate.walk_layers over `tokens` [S, L] up to the last MoE layer, from the hidden states last saved
    in the run as `saved_as` (else from the embeddings); the hidden states after each layer are saved so once the
    caller is done with it."""
    device = torch.device(plan.options.device)
    model = skeleton(plan.source, device)
    saved = run.load(saved_as)
    if saved is not None:
        hidden, first = saved[0]["hidden"], int(saved[1]["layer"]) + 1
    else:
        hidden, first = embed(model, plan.source, tokens, device), 0
    layers = walk_layers(model, plan.source, hidden, first, set(plan.moe_layers), device, replace=replace, desc=desc)
    del hidden  # the walk holds the hidden states; one copy in memory, not two
    for i, after, routed in layers:
        yield i, after, routed
        run.save(saved_as, {"hidden": after}, {"layer": str(i)})
        plan.source.tensors.close()
        return_freed_memory()
        if i >= plan.moe_layers[-1]:
            return


def split_held_out(routed: Routed, held: torch.Tensor, seq_len: int) -> tuple[Routed, Routed]:
    """A layer's routed tokens -> those of the calibration sequences and those of the `held` [S] ones."""
    # routed rows are sequence-major: a sequence's tokens are consecutive
    token_held = held.repeat_interleave(seq_len).to(routed.x.device)
    return tuple(Routed(routed.x[m], routed.ids[m], routed.weights[m]) for m in (~token_held, token_held))


def expert_weights(plan: Plan, layer: int, device: torch.device) -> dict[str, torch.Tensor]:
    weights = {p: w.to(device) for p, w in plan.source.expert_weights(layer).items()}
    plan.source.tensors.close()  # the pages of the checkpoint read count in the RSS until its maps are dropped
    return weights


def allocate_bits(plan: Plan, run: RunDir, costs: CostFiles) -> tuple[Plan, torch.Tensor, dict]:
    """The plan at its final basis and rank; the chosen option (index into plan.widths) of every unit of that
    basis's cost measurement [U] (units past the rank at width 0); and the solver's statistics."""
    saved = run.load("allocation")
    if saved is None:
        full, choice_info = selection.choose(plan, costs)
        rank = choice_info["rank"]
        kept = selection.kept_units(full, rank)
        final = full.with_rank(rank)
        loss = selection.masked(costs[f"loss-{full.factor_kind}"], kept).numpy()
        cost = selection.masked(selection.unit_costs_of(full), kept).numpy()
        parts = 1 if plan.options.allocation == "global" else len(plan.moe_layers)
        result = allocate_in_parts(loss, cost, final.budget_bits, parts)
        del loss, cost
        choice = torch.zeros(len(kept), dtype=torch.long)  # plan.widths starts at 0 whenever rows are dropped
        choice[kept] = torch.from_numpy(result.choice)
        stats = {k: v for k, v in dataclasses.asdict(result).items() if k != "choice"}
        stats |= {
            "units": int(kept.sum()),
            "unit_rows": full.unit_rows,
            "budget_bits": final.budget_bits,
            "dropped_rows_loss": float(selection.dropped_loss(costs, full.factor_kind)[~kept].sum()),
        } | choice_info
        if plan.kinds is not None:  # what the first layer's costs chose, for the report
            stats["screen"] = screen_info(run)
        run.save("allocation", {"choice": choice}, {"stats": json.dumps(stats)})
        saved = run.load("allocation")
    stats = json.loads(saved[1]["stats"])
    return plan.with_basis(stats["basis"]).with_rank(stats["rank"]), saved[0]["choice"], stats


def row_bits(plan: Plan, choice: torch.Tensor) -> dict[int, torch.Tensor]:
    """MoE layer -> the width of every rank row [3, E, R]."""
    widths = torch.tensor(plan.widths)[choice].reshape(len(plan.moe_layers), len(PROJECTIONS), plan.num_experts, -1)
    rows = widths.repeat_interleave(plan.unit_rows, dim=-1)[..., : plan.rank]
    return dict(zip(plan.moe_layers, rows))


def export_shards(
    plan: Plan,
    run: RunDir,
    bits: dict[int, torch.Tensor],
    tokens: torch.Tensor,
    held: torch.Tensor,
    pool: Workers | None,
) -> list[str]:
    """Write each decoder layer's shard (BitsMoE tensors + its other tensors, unchanged) and the rest. With `pool`,
    the workers encode the MoE layers whose rounding does not wait on the layers before them (export_layer)."""
    n_layers = plan.source.config["num_hidden_layers"]
    files = shard_files(n_layers)
    walked = quantized_walk(plan, run, bits, tokens, held) if plan.feedback_on_quantized_inputs else None
    for i in tqdm(range(n_layers + 1), desc="export", unit="shard"):
        if (run.checkpoint / files[i]).is_file():
            continue
        if i not in bits:
            write_layer(plan, run, i, {})
        elif walked:
            write_layer(plan, run, i, next(tensors for j, tensors in walked if j == i))
        elif pool:
            pool.submit(export_layer, i, bits[i], plan.basis, plan.rank)
        else:
            export_layer(plan, run, i, bits[i])
    if pool:
        pool.wait("export")
    return files


def export_layer(plan: Plan, run: RunDir, i: int, widths: torch.Tensor, basis: str = "", rank: int = 0) -> None:
    """MoE layer i encoded with the rows' `widths` [3, E, R] without the quantized walk (on the tokens the original
    model routed to it, or to nearest) and its shard written; `basis` and `rank`: the allocation's, for a worker's
    plan (made before it)."""
    plan = plan.with_basis(basis).with_rank(rank) if basis else plan
    routed = None
    if plan.options.rounding == "gptq":
        saved = run.load(f"routed-{i:05d}")[0]  # gptq.hessians moves them to the weights' device, in float32
        routed = Routed(saved["x"], saved["ids"], saved["weights"])
    write_layer(plan, run, i, encode_moe_layer(plan, run, i, widths, routed)[1])


def write_layer(plan: Plan, run: RunDir, i: int, encoded: dict[str, torch.Tensor]) -> None:
    """Decoder layer i's shard (i = the number of layers: the tensors outside the layers): its tensors as stored,
    the routed experts' replaced by `encoded`."""
    n_layers = plan.source.config["num_hidden_layers"]
    path = run.checkpoint / shard_files(n_layers)[i]
    if i == n_layers:
        write_shard(path, copied_tensors(plan.source, None, None, plan.keeps_fp8))
        return
    module = plan.source.architecture.experts_module.format(layer=i) if encoded else None
    write_shard(path, copied_tensors(plan.source, f"model.layers.{i}.", module, plan.keeps_fp8) | encoded)
    plan.source.tensors.close()
    return_freed_memory()


def quantized_walk(
    plan: Plan, run: RunDir, bits: dict[int, torch.Tensor], tokens: torch.Tensor, held: torch.Tensor
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(MoE layer, its encoded tensors), layer after layer, each rounded with error feedback on the inputs it gets
    when the MoE layers before it are already quantized: the walk runs each layer's experts as encoded."""
    encoded = {}

    def replace(i: int, routed: Routed) -> Callable[[Routed], torch.Tensor]:
        layout, encoded[i] = encode_moe_layer(plan, run, i, bits[i], split_held_out(routed, held, tokens.shape[1])[0])
        cfg = plan.quant_config([layout])
        device = routed.x.device
        layer = gather_layer(cfg, layout.module, {name: t.to(device) for name, t in encoded[i].items()})
        # the layer as served (bitsmoe_vllm.reference), an expert's factors decoded at a time: no dense copy of it
        return lambda r: moe_forward(r.x, r.weights, r.ids, layer)

    for i, _, _ in walk(plan, run, tokens, "quantized-hidden", replace, "quantized inputs"):
        if i in encoded:
            yield i, encoded.pop(i)


def encode_moe_layer(
    plan: Plan, run: RunDir, layer: int, widths: torch.Tensor, routed: Routed | None
) -> tuple[LayerLayout, dict[str, torch.Tensor]]:
    """One MoE layer decomposed (with the shared bases calibration saved) and encoded with the rows' `widths`
    [3, E, R]: rounded with error feedback on the tokens `routed` to it (offline.gptq), or to nearest without them;
    its layout and tensors (on the CPU)."""
    device = torch.device(plan.options.device)
    weights = expert_weights(plan, layer, device)
    bases = dict.fromkeys(PROJECTIONS)
    if plan.factor_kind != "identity":
        saved = run.load(f"basis-{layer:05d}")[0]
        key = {p: basis_key(plan.factor_kind, p) for p in PROJECTIONS}
        bases = {p: (saved[key[p]].to(device), saved[f"energy-{key[p]}"].to(device)) for p in PROJECTIONS}
    decompositions = {p: decompose(weights[p], plan.rank, plan.basis_dtype, bases[p]) for p in PROJECTIONS}
    widths = dict(zip(PROJECTIONS, widths))
    encoded = None if routed is None else feedback_rounding(plan, routed, weights, decompositions, widths)
    biases = {p: weights[f"{p}_bias"].cpu() for p in PROJECTIONS if f"{p}_bias" in weights}  # float32, as stored
    del weights
    layout, encoded = encode_layer(
        plan.source.architecture.experts_module.format(layer=layer),
        decompositions,
        widths,
        group_size=plan.group_size,
        basis_dtype=plan.basis_dtype,
        basis_sharing=plan.basis_sharing,
        projection_names=plan.source.architecture.projection_names,
        scale_steps=plan.options.scale_steps,
        encoded=encoded,
        odd=plan.odd_codes,
    )
    names = plan.source.architecture.projection_names
    for p, b in biases.items():
        encoded |= {expert_tensor_name(layout.module, e, names[p], "bias"): b[e].clone() for e in range(len(b))}
    return layout, {name: t.cpu() for name, t in encoded.items()}


def write_checkpoint(plan: Plan, run: RunDir, choice: torch.Tensor, files: list[str]) -> tuple[QuantConfig, list[str]]:
    """config.json, the index, tokenizer and other files, validation by re-reading, and the plots; the config and
    the files written besides the weights."""
    layouts = [
        plan.layout(
            i,
            {p: tuple((b[j] > 0).sum(1).tolist()) for j, p in enumerate(PROJECTIONS)},
            {p: tuple(b[j].sum(1).tolist()) for j, p in enumerate(PROJECTIONS)},
        )
        for i, b in row_bits(plan, choice).items()
    ]
    draft = plan.quant_config(layouts)
    cfg = dataclasses.replace(draft, achieved_bits=stored_bits(draft))
    cfg.validate()
    write_config(run.checkpoint, plan.source, cfg)
    write_index(run.checkpoint, files)
    copied = copy_side_files(plan.source, run.checkpoint)
    validate_checkpoint(run.checkpoint)
    return cfg, copied + plot_allocation(run.checkpoint, row_bits(plan, choice))
