"""The benchmarks' own machinery on tiny inputs: MoEfication, the corpus split, the RTN peer, the CPU MoE baseline,
the serving benchmark's prompts."""

import json

import pytest
import torch
import transformers

from benchmarks.make_moe_model import balanced_kmeans, moefy
from benchmarks.peers import rtn


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_balanced_kmeans_gives_equal_clusters_and_finds_planted_ones():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1)
    truth = torch.arange(4).repeat_interleave(8)[torch.randperm(32, generator=g)]
    points = torch.nn.functional.normalize(centers[truth] + 0.05 * torch.randn(32, 16, generator=g), dim=1)
    assign = balanced_kmeans(points, 4, steps=15)
    assert torch.bincount(assign, minlength=4).tolist() == [8, 8, 8, 8]
    # the same partition as the planted one, up to the clusters' names
    assert len({(int(t), int(a)) for t, a in zip(truth, assign)}) == 4


@torch.no_grad()
def test_moefied_model_with_every_expert_selected_is_the_dense_model(dense):
    tokens = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(1))
    moe = moefy(dense, tokens, experts=4, top_k=4)
    assert moe.config.num_local_experts == 4 and moe.config.intermediate_size == 32
    x = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(2))
    want, got = dense(x).logits, moe(x).logits
    assert (got - want).abs().max() < 1e-2 * want.abs().max()  # routing weights are 1/k to 0.1 %
    sparse = moefy(dense, tokens, experts=4, top_k=2)(x).logits
    assert (sparse - want).abs().max() > 10 * (got - want).abs().max()  # dropping experts is visible


def test_moefy_refuses_bad_shapes(dense):
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="--experts 5 does not divide the FFN width 128"):
        moefy(dense, tokens, experts=5, top_k=2)
    with pytest.raises(ValueError, match="--top-k 5 must be between 1 and --experts 4"):
        moefy(dense, tokens, experts=4, top_k=5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_is_min_max_round_to_nearest_per_group(bits):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(bits))
    q = rtn(w, bits, 64)
    for group in q.reshape(6, 2, 64).flatten(0, 1):
        assert len(group.unique()) <= 2**bits
    # each value moved at most half a step (plus the float16 rounding of the scale)
    g = w.reshape(6, 2, 64)
    step = (g.amax(-1) - g.amin(-1)) / (2**bits - 1)
    assert ((q.reshape(6, 2, 64) - g).abs() <= step[..., None] * 0.5 * 1.01 + 1e-6).all()


def test_corpus_split_is_disjoint_and_deterministic(tmp_path, monkeypatch):
    from benchmarks import corpus

    articles = {f"Title {i}": {"extract": f"Text of article {i}."} for i in range(300)}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "summaries_en-us.json").write_text(json.dumps(articles))
    monkeypatch.setattr(corpus, "summaries_file", lambda: tmp_path / "data" / "summaries_en-us.json")
    a, b = corpus.split_articles(), corpus.split_articles()
    assert a == b and not set(a["calib"]) & set(a["eval"])
    assert len(a["calib"]) + len(a["eval"]) == 300 and 10 <= len(a["eval"]) <= 60


def test_training_corpus_splits_whole_documents_three_ways(tmp_path, monkeypatch):
    """Addresses, chapters, Bible chapters and articles each land whole in one of train / calib / eval."""
    from benchmarks import corpus

    for name in ("sotu", "moby"):
        (tmp_path / name).mkdir()
        for i in range(100):
            (tmp_path / name / f"{name}_{i}.txt").write_text(f"{name} document {i}.")
            (tmp_path / name / f"{name}_{i}.json").write_text("{}")  # the same text as JSON: not read
    verses = [
        {"book": f"Book{b}", "chapter": c, "text": f"Verse {v} of {b}:{c}."}
        for b in range(5)
        for c in range(20)
        for v in range(3)
    ]
    (tmp_path / "kjv.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verses))
    articles = {f"Title {i}": {"extract": f"Text of article {i}."} for i in range(300)}
    (tmp_path / "wiki.json").write_text(json.dumps(articles))
    sources = {"sotu": tmp_path / "sotu", "moby": tmp_path / "moby", "kjv": tmp_path / "kjv.jsonl"}
    monkeypatch.setattr(corpus, "fetch_packages", lambda cache: sources)
    monkeypatch.setattr(corpus, "summaries_file", lambda: tmp_path / "wiki.json")
    a, b = corpus.split_mixed(tmp_path), corpus.split_mixed(tmp_path)
    assert a == b
    every = [t for part in a.values() for t in part]
    assert len(every) == len(set(every)) == 100 + 100 + 100 + 300  # each document once, in one split
    assert "Verse 0 of 3:7. Verse 1 of 3:7. Verse 2 of 3:7." in every  # a Bible chapter is one document
    assert len(a["train"]) > 3 * (len(a["calib"]) + len(a["eval"])) and min(len(a["calib"]), len(a["eval"])) > 20


@pytest.mark.parametrize("gpt_oss", [False, True], ids=["silu", "gpt-oss"])
def test_cpu_moe_bench_gives_the_bf16_baseline_the_same_layer(gpt_oss):
    """bench_cpu_moe times vLLM's cpu_fused_moe on the BitsMoE layer multiplied out: same outputs up to bf16. For
    gpt-oss, with its biases and activation as vLLM's gpt-oss passes them (an independent check of BitsMoE's
    swigluoai against vLLM's)."""
    from vllm import _custom_ops as vllm_ops

    from benchmarks.bench_cpu_moe import GPT_OSS, GROUP, dense_weights, random_basis, random_biases, random_factors
    from bitsmoe_vllm import ops
    from bitsmoe_vllm.activation import SILU
    from bitsmoe_vllm.reference import MoELayer

    g = torch.Generator().manual_seed(0)
    H, I, E, K = 64, GROUP, 4, 2
    biases = random_biases(E, I, H, g) if gpt_oss else None
    layer = MoELayer(
        *(random_basis(H, H, "int8", g) for _ in range(3)),
        *(random_factors(E, H, I, (2, 3), g) for _ in range(3)),
        GROUP,
        GPT_OSS if gpt_oss else SILU,
        biases,
    )
    w13, w2 = (vllm_ops.cpu_prepack_moe_weight(w, "vec") for w in dense_weights(layer))
    b13 = torch.stack([biases.gate, biases.up], 2).flatten(1).bfloat16() if gpt_oss else None
    b2 = biases.down.bfloat16() if gpt_oss else None
    x = torch.randn(5, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(5)]).to(torch.int32)
    w = torch.softmax(torch.randn(5, K, generator=g), -1)
    out = torch.empty_like(x)
    vllm_ops.cpu_fused_moe(out, x, w13, w2, b13, b2, w, ids, layer.activation.name, "vec")
    want = ops.moe_layer(x, w, ids, layer).float()
    assert (out.float() - want).norm() < 1e-2 * want.norm()
    if gpt_oss:  # the teeth: without the biases the outputs part
        vllm_ops.cpu_fused_moe(out, x, w13, w2, None, None, w, ids, "swigluoai", "vec")
        assert (out.float() - want).norm() > 5e-2 * want.norm()


def test_serve_bench_gives_each_stream_a_prompt_of_its_own(monkeypatch):
    """With one prompt for all, greedy decoding makes 8 copies of one sequence and every token of a step picks the
    same experts: the 8-stream figure would measure 2 experts per layer. And a round's requests are all in flight at
    once (from a pool of threads some started only as others ended)."""
    import asyncio
    from types import SimpleNamespace

    from benchmarks import bench_serve
    from benchmarks.bench_serve import PROMPTS, ROUNDS, decode_rate

    prompts, in_flight, most = [], [0], [0]

    async def create(**kw):
        prompts.append(kw["prompt"])
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await asyncio.sleep(0.01)
        in_flight[0] -= 1
        return SimpleNamespace(usage=SimpleNamespace(completion_tokens=kw["max_tokens"]))

    async def close():
        pass

    client = SimpleNamespace(completions=SimpleNamespace(create=create), close=close)
    monkeypatch.setattr(bench_serve, "AsyncOpenAI", lambda **kw: client)
    assert decode_rate("http://server", "m", streams=8, tokens=5, rounds=2) > 0
    assert len(prompts) == 16 and len(set(prompts)) == 8
    assert most[0] == 8
    assert len(set(PROMPTS)) == max(ROUNDS)  # one for each of the most streams measured
