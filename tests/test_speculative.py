"""Decoding over the static cache and MTP speculative decoding (model.decode, 5.4.3; sample.py).

The static-cache decode must give today's tokens (Transformer.generate, greedy); speculative decoding
must give the plain decoder's tokens when greedy and the plain sampler's distribution when sampling;
a rejected proposal must leave the caches as plain decoding would at every slot that is read.
"""

import math
import re

import pytest
import torch

import model
import sample
import test_model
from model import ModelArgs, Transformer
from test_cli import script
from test_train import run


def tiny(**kw):
    """test_model's tiny model with a vocabulary of 16 (proposals are accepted often) and 40 positions."""
    return test_model.tiny(**{"vocab_size": 16, "max_seq_len": 40, **kw})


def make(args, dtype=torch.float64):
    """A fresh random model: the weights are seeded by name, so the seed itself is drawn here."""
    m = Transformer(args, seed=int(torch.randint(1 << 30, ()))).to(dtype)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.bias.normal_(std=0.05)
    return m.eval()


def plain_greedy(m, prompts, n, eot=None):
    """generate()'s greedy tokens for each prompt, prompts of one length batched together."""
    out = [None] * len(prompts)
    for length in {len(p) for p in prompts}:
        which = [i for i, p in enumerate(prompts) if len(p) == length]
        idx = torch.tensor([prompts[i] for i in which])
        with torch.no_grad():
            toks = torch.stack(list(m.generate(idx, n, temperature=0, eot=eot)), 1).tolist()  # (B, <= n)
        for i, row in zip(which, toks):
            out[i] = row[:row.index(eot) + 1] if eot in row else row
    return out


def random_prompts(count, V, max_len):
    return [torch.randint(0, V, (int(torch.randint(1, max_len + 1, ())),)).tolist() for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_static_decode_gives_the_tokens_of_generate(dtype, monkeypatch):
    """The static-cache step (every slot read, per-row positions) against today's decode (the cache
    read up to the position), greedy, batched and batch 1; and the logits of both paths agree."""
    m = make(tiny(vocab_size=97), dtype)
    for B in (1, 5):
        prompt = torch.randint(0, 97, (B, 7))
        with torch.no_grad():
            expected = torch.stack(list(m.generate(prompt, 25, temperature=0)), 1)  # (B, 25)
        got = model.collect(model.decode(m, prompt, 25, temperature=0))
        assert got == expected.tolist()
    # the two cache paths' logits, absorbed and naive: the twin test of the static path
    idx = torch.randint(0, 97, (3, 12))
    for impl in ("absorb", "naive"):
        monkeypatch.setattr(model, "attn_impl", impl)
        with torch.no_grad():
            cache, static = m.new_cache(3, 12), m.new_cache(3, 20)
            dynamic = torch.cat([m(idx[:, :8], cache=cache), m(idx[:, 8:], start_pos=8, cache=cache)], 1)
            pos = torch.zeros(3, dtype=torch.long)
            steps = [m(idx[:, :8], start_pos=pos, cache=static)]
            steps += [m(idx[:, t:t + 2], start_pos=pos + t, cache=static) for t in (8, 10)]
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(torch.cat(steps, 1), dynamic, rtol=tol, atol=tol)


def test_compiled_decode_gives_the_tokens_of_the_eager_one():
    """compile=True (torch.compile of each step's model part, the twin of the eager step): the same
    greedy tokens, plain and speculative, batched with prompts of different lengths."""
    m = make(tiny(), torch.float32)
    prompts = random_prompts(6, 16, 10)
    for speculative in (False, True):
        eager = model.collect(model.decode(m, prompts, 12, temperature=0, speculative=speculative))
        stats = {}
        got = model.collect(model.decode(m, prompts, 12, temperature=0, speculative=speculative, compile=True,
                                         stats=stats))
        assert got == eager and stats["steps"] > 0


def test_prompts_of_different_lengths_share_a_batch():
    """Right-padded prompts, each row at its own position: every row gets the tokens it gets alone,
    up to the end of max_seq_len (a prompt that fills it gets one token, as with generate)."""
    m = make(tiny())
    L = m.args.max_seq_len
    prompts = random_prompts(12, 16, 15) + [torch.randint(0, 16, (n,)).tolist() for n in (L - 3, L - 1, L)]
    got = model.collect(model.decode(m, prompts, 20, temperature=0))
    assert got == plain_greedy(m, prompts, 20)
    assert [len(g) for g in got[-3:]] == [4, 2, 1]
    with pytest.raises(ValueError, match=r"a token in each; got prompt lengths \[3, 0\]"):
        next(model.decode(m, [[1, 2, 3], []], 5))


def train_mtp(m, steps=40):
    """A few Adam steps on the MTP module alone, on the main model's own greedy continuations, so
    that its proposals are accepted about half of the time (an untrained one: about 1/V)."""
    prompts = torch.randint(0, m.args.vocab_size, (64, 4))
    seqs = torch.cat([prompts, torch.tensor(model.collect(model.decode(m, prompts, 28, temperature=0)))], 1)
    m.float()
    opt = torch.optim.Adam(m.mtp.parameters(), lr=3e-3)
    for _ in range(steps):
        _, losses = m(seqs[:, :-1], seqs[:, 1:])
        opt.zero_grad()
        losses["mtp"].backward()
        opt.step()
    return m.double().eval()


def test_greedy_speculative_equals_greedy_plain():
    """48 prompts of random lengths (some reaching max_seq_len), batched: the rows accept different
    numbers of proposals and each keeps its own position; then batch 1 with an end-of-text token."""
    m = train_mtp(make(tiny()))
    L = m.args.max_seq_len
    prompts = random_prompts(44, 16, 12) + [torch.randint(0, 16, (n,)).tolist() for n in (L - 4, L - 2, L - 1, L)]
    stats = {}
    got = model.collect(model.decode(m, prompts, 24, temperature=0, speculative=True, stats=stats))
    assert got == plain_greedy(m, prompts, 24)
    rejected = stats["proposed"] - stats["accepted"]
    assert stats["accepted"] > 50 and rejected > 50, stats  # both paths, many times
    eot = got[0][3]  # a token the model does produce
    for p in prompts[:8]:
        alone = model.collect(model.decode(m, [p], 24, temperature=0, eot=eot, speculative=True))
        assert alone == plain_greedy(m, [p], 24, eot=eot)


def plain_caches(m, seq, n):
    """The main model's and the MTP block's caches as plain decoding leaves them after the first n
    tokens of seq (1, n + 1): slot i of the MTP block holds [h_i; Emb(t_{i+1})]."""
    main, mtp = m.new_cache(1, n), m.new_cache(1, n, mtp=True)
    with torch.no_grad():
        _, h, cos, sin = m.trunk(seq[:, :n], 0, main)
        m.mtp[0](h, m.embed(seq[:, 1:n + 1]), cos, sin, 0, mtp[0])
    return main + mtp[:1]


def assert_caches_equal(dec, m, seq, n):
    for ours, ref in zip(dec.cache + dec.mtp_cache, plain_caches(m, seq, n)):
        for key in ("c_kv", "k_rope"):
            torch.testing.assert_close(ours[key][:, :n], ref[key], rtol=1e-12, atol=1e-12)


def test_rejected_proposal_leaves_the_cache_as_plain_decoding():
    """After a rejection the caches hold at every slot before the row's position what plain decoding
    of the same tokens holds; the slot at the position holds the rejected proposal's latents, and it
    is overwritten before it is read (NaN put there changes nothing)."""
    for _ in range(20):  # an untrained MTP: most proposals are rejected, unless greedy decoding
        m = make(tiny(vocab_size=97))  # settles into a repetition the MTP happens to propose; then draw again
        prompt = torch.randint(0, 97, (1, 6))
        dec = model.Decoder(m, prompt, 30, temperature=0, speculative=True)
        out = dec.prefill()[0][0].tolist()
        while not dec.done[0]:
            new, count = dec.step()
            out += new[0, :count[0]].tolist()
            if not dec.accepted[0]:
                break
        if not dec.done[0] and len(out) < 20:  # rejected, with room for one more step
            break
    assert not dec.done[0] and not dec.accepted[0]
    pos = int(dec.pos[0])
    seq = torch.cat([prompt, torch.tensor([out])], 1)
    assert seq.shape[1] == pos + 1  # the last token, at pos, is not in the cache yet
    assert_caches_equal(dec, m, seq, pos)
    # slot pos: the rejected proposal's latents (layer 0's c_kv depends on that slot's token alone)
    plain = m.new_cache(1, pos + 1)
    with torch.no_grad():
        m(seq, cache=plain)
    assert not torch.allclose(dec.cache[0]["c_kv"][:, pos], plain[0]["c_kv"][:, pos])
    for c in dec.cache + dec.mtp_cache:
        c["c_kv"][:, pos] = float("nan")
        c["k_rope"][:, pos] = float("nan")
    with torch.no_grad():
        new, count = dec.step()
    out += new[0, :count[0]].tolist()
    seq = torch.cat([prompt, torch.tensor([out])], 1)
    assert int(dec.pos[0]) == seq.shape[1] - 1 > pos
    assert_caches_equal(dec, m, seq, int(dec.pos[0]))
    assert out == plain_greedy(m, [prompt[0].tolist()], len(out))[0]


# -----------------------------------------------------------------------------
# Sampling: the speculative-sampling rule keeps the plain sampler's distribution

def chi_square(counts, P, N):
    """Pearson's statistic of counts against N * P over the cells expected at least 5 times (the rest
    pooled, so that the chi-square law holds), its degrees of freedom, and the draws that fell in
    cells of probability 0."""
    E = N * P
    keep, small = E >= 5, (E < 5) & (P > 0)
    obs, exp = counts[keep], E[keep]
    if small.any():
        obs, exp = torch.cat([obs, counts[small].sum()[None]]), torch.cat([exp, E[small].sum()[None]])
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1, int(counts[P == 0].sum())


def chi_square_quantile(df, tail):
    """x with P(chi2_df > x) = tail, by bisection on the regularized upper incomplete gamma."""
    lo, hi = 0.0, df + 100.0 * math.sqrt(df) + 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(mid / 2)) > tail else (lo, mid)
    return hi


def distribution_model(V):
    """A tiny model with peaked distributions (a large head) whose MTP module proposes from a q far
    from the main model's p (its final norm redrawn), so that a biased rule shows."""
    args = ModelArgs(vocab_size=V, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
                     q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                     n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
                     n_limited_groups=1, n_mtp=1, max_seq_len=16, init_std=0.1)
    m = make(args)
    with torch.no_grad():
        m.head.weight.normal_(std=0.4)
        m.mtp[0].norm.weight.normal_(std=1.0)
    return m


@torch.no_grad()
def exact_two_tokens(m, prompt, top):
    """P(t_T = a, t_{T+1} = b) of the plain sampler, (V*V,), and the same under a rule that always
    accepts the MTP module's proposal: p(a) q(b | a)."""
    V, T = m.args.vocab_size, prompt.shape[1]
    seqs = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], 1)  # (V, T+1): the prompt, then a
    _, h, cos, sin = m.trunk(seqs)
    logits = m.head(m.norm(h))
    p1 = model.sampling_probs(logits[:1, -2], **top)[0]  # (V,)
    p2 = model.sampling_probs(logits[:, -1], **top)  # (V, V): row a, the next token's distribution
    mtp = m.mtp[0](h[:, :T], m.embed(seqs[:, 1:]), cos[:T], sin[:T])  # position T-1 sees h_{T-1}, Emb(a)
    q2 = model.sampling_probs(m.head(m.mtp[0].norm(mtp[:, -1])), **top)
    return (p1[:, None] * p2).flatten(), (p1[:, None] * q2).flatten()


def first_two(m, prompt, N, top, speculative):
    """The cell a * V + b of (t_T, t_{T+1}) for N independent draws, all in one batch."""
    if speculative:
        out = torch.tensor(model.collect(model.decode(m, prompt.expand(N, -1), 2, speculative=True, **top)))
    else:
        with torch.no_grad():
            out = torch.stack(list(m.generate(prompt.expand(N, -1), 2, **top)), 1)
    V = m.args.vocab_size
    return torch.bincount(out[:, 0] * V + out[:, 1], minlength=V * V).double()


@pytest.mark.parametrize("top", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                 dict(temperature=1.3, top_p=0.8)], ids=["t1", "top-k", "top-p"])
def test_sampling_keeps_the_plain_samplers_distribution(top, monkeypatch):
    """(t_T, t_{T+1}) over 8 x 8 cells, N = 20,000 draws each of the speculative and the plain sampler,
    against the exact distribution: Pearson's chi-square below its 1 - 1e-6 quantile (a correct
    sampler fails once in a million runs) and no draw in a cell of probability 0. A rule that always
    accepts the proposal must fail: its exact distribution gives the noncentrality lam = N sum (P_b -
    P)^2 / P, and the test first asserts that the statistic's mean df + lam lies 6 standard
    deviations (sqrt(2 (df + 2 lam))) above the threshold, or that P_b puts 20 expected draws where P
    has none; either way the biased rule passes with a probability below 1e-8."""
    V, N = 8, 20_000
    m = distribution_model(V)
    prompt = torch.randint(0, V, (1, 3))
    P, P_biased = exact_two_tokens(m, prompt, top)
    for speculative in (True, False):
        stat, df, outside = chi_square(first_two(m, prompt, N, top, speculative), P, N)
        assert outside == 0 and stat < chi_square_quantile(df, 1e-6), (speculative, stat, df, outside)
    # the test's power against always accepting: Pearson's statistic of the biased rule's expected
    # counts is the noncentrality lam
    lam, df, _ = chi_square(N * P_biased, P, N)
    threshold = chi_square_quantile(df, 1e-6)
    assert N * P_biased[P == 0].sum() > 20 or df + lam - 6 * math.sqrt(2 * (df + 2 * lam)) > threshold, (lam, df)
    monkeypatch.setattr(model, "speculative_token", lambda d, q, p: (d, torch.ones_like(d, dtype=torch.bool)))
    stat, df, outside = chi_square(first_two(m, prompt, N, top, True), P, N)
    assert outside > 0 or stat > threshold, (stat, df)


def test_speculative_token_is_distributed_as_p():
    """The rule alone, 200,000 draws of one (p, q) pair over 6 tokens: the tokens follow p (chi-square
    at 1 - 1e-6) and the acceptance rate is sum min(p, q), within 6 binomial standard deviations."""
    V, N = 6, 200_000
    p, q = (torch.randn(V) * 2).softmax(0).double(), (torch.randn(V) * 2).softmax(0).double()
    draft = torch.multinomial(q, N, replacement=True)
    tok, accepted = model.speculative_token(draft, q.expand(N, -1), p.expand(N, -1))
    stat, df, outside = chi_square(torch.bincount(tok, minlength=V).double(), p, N)
    assert outside == 0 and stat < chi_square_quantile(df, 1e-6)
    rate = float(torch.minimum(p, q).sum())
    assert abs(accepted.double().mean() - rate) < 6 * math.sqrt(rate * (1 - rate) / N)
    assert torch.equal(tok[accepted], draft[accepted])


def test_decode_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="MTP module; this model has n_mtp=0"):
        next(model.decode(make(tiny(n_mtp=0)), torch.zeros(1, 3, dtype=torch.long), 4, speculative=True))
    with pytest.raises(ValueError, match="max_new_tokens=0: expected at least 1"):
        next(model.decode(make(tiny()), torch.zeros(1, 3, dtype=torch.long), 0))
    with pytest.raises(ValueError, match="sequence of 41 tokens exceeds max_seq_len=40"):
        next(model.decode(make(tiny()), torch.zeros(1, 41, dtype=torch.long), 4))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True captures CUDA graphs; the model is on cpu"):
            next(model.decode(make(tiny()), torch.zeros(1, 3, dtype=torch.long), 4, cuda_graph=True))


# -----------------------------------------------------------------------------
# sample.py

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """A tiny train.py checkpoint with its MTP module, 40 steps."""
    out = tmp_path_factory.mktemp("trained")
    run(out, corpus, "--max_iters=40", "--eval_interval=40", "--lr=3e-3")
    return out


def test_sample_speculative_end_to_end(tmp_path, corpus, trained, capsys):
    """A tiny checkpoint from train.py: --speculative=mtp (the default) prints the same greedy text as
    --speculative=none, and its acceptance rate (sampling: some proposals accepted, some not); a
    checkpoint without MTP refuses --speculative=mtp, and decodes plainly when it is not asked for."""
    run(tmp_path / "plain", corpus, "--max_iters=1", "--eval_interval=1", "--n_mtp=0")
    capsys.readouterr()
    outs = {}
    for spec in ("none", "mtp"):
        sample.main([f"--ckpt={trained}", "--prompt=KING:\\n", "--max_new_tokens=60", "--device=cpu",
                     "--temperature=0", f"--speculative={spec}"])
        outs[spec] = capsys.readouterr()
    assert outs["mtp"].out == outs["none"].out and len(outs["none"].out) > 60
    rate = re.compile(r"speculative decoding \(MTP\): (\d+) of (\d+) proposals accepted, acceptance rate ([\d.]+)%")
    accepted, proposed, percent = rate.search(outs["mtp"].err).groups()
    assert int(accepted) <= int(proposed) <= 59 and float(percent) == pytest.approx(100 * int(accepted) / int(proposed), abs=0.05)
    # each step gives one token, or two when accepted: the first (after the prompt) + proposals + accepted
    tokens = int(re.search(r"(\d+) tokens in [\d.]+s: [\d.]+ tokens/s", outs["mtp"].err)[1])
    assert 1 + int(proposed) + int(accepted) in (tokens, tokens + 1)  # + 1: the last step's second cut off
    assert "speculative" not in outs["none"].err
    sample.main([f"--ckpt={trained}", "--max_new_tokens=150", "--device=cpu", "--temperature=1.0"])
    accepted, proposed, _ = rate.search(capsys.readouterr().err).groups()
    assert 0 < int(accepted) < int(proposed)  # about 70% after these 40 steps
    plain = f"--ckpt={tmp_path / 'plain'}"
    with pytest.raises(SystemExit, match=re.escape("--speculative=mtp: the checkpoint has no MTP module (n_mtp=0); "
                                                   "use --speculative=none")):
        sample.main([plain, "--speculative=mtp", "--device=cpu"])
    sample.main([plain, "--max_new_tokens=5", "--device=cpu"])
    assert "acceptance rate" not in capsys.readouterr().err
    with pytest.raises(SystemExit, match=re.escape("--speculative=draft: expected one of mtp, none")):
        sample.main([plain, "--speculative=draft"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--cuda_graph: CUDA graphs need a CUDA device; this run is on cpu"):
            sample.main([plain, "--cuda_graph", "--device=cpu"])


def test_bench_decode_runs_on_the_cpu(trained):
    """bench.py decode with small sizes: a row per method and batch size, the CUDA-graph rows skipped
    with a note, every method's greedy tokens those of generate(), an acceptance rate for MTP."""
    code, out, err = script("bench.py", "decode", f"--ckpt={trained}", "--batch_sizes=1,3", "--prompt_len=5",
                            "--new_tokens=12")
    assert code == 0, err
    for B in (1, 3):
        for name in ("eager generate()", "static cache", "MTP speculative", "transformers generate()"):
            row = re.search(rf"{re.escape(name)} +{B} \| +([\d,]+) +([\d.]+) \| +(\S+) \| (.*)", out)
            assert row and float(row[1].replace(",", "")) > 0, (name, B, out)
            if name != "transformers generate()":  # its group-limited routing fills 0, not -inf: not a twin
                assert row[4] == f"{B} of {B} rows", (name, B, row[0])
            if name == "MTP speculative":
                assert 0 <= float(row[3].rstrip("%")) <= 100
        for name in ("static cache + CUDA graph", "static cache + compiled + CUDA graph",
                     "MTP speculative + CUDA graph", "MTP speculative + compiled + CUDA graph"):
            assert re.search(rf"{re.escape(name)} +{B} \| skipped: CUDA graphs need a GPU", out) or torch.cuda.is_available()
