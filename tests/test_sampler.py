"""On-device sampling: greedy, top-k, top-p, temperature, seeds, all per row in one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampler import SamplingTensors, greedy, sample

sample_jit = jax.jit(sample)


def tensors(batch, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0, vocab=0, **kw):
    """SamplingTensors of ``batch`` rows; scalars broadcast, everything else at its neutral value."""
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (batch,)).copy()  # noqa: E731
    seeds = np.zeros((batch, 2), np.uint32)
    seeds[:, 1] = full(seed, np.uint32)
    fields = dict(
        temperature=full(temperature, np.float32), top_k=full(top_k, np.int32), top_p=full(top_p, np.float32),
        min_p=full(kw.pop("min_p", 0.0), np.float32),
        repetition_penalty=full(kw.pop("repetition_penalty", 1.0), np.float32),
        presence_penalty=full(kw.pop("presence_penalty", 0.0), np.float32),
        frequency_penalty=full(kw.pop("frequency_penalty", 0.0), np.float32),
        seed=seeds, step=full(step, np.int32),
        history=kw.pop("history", np.full((batch, 4), vocab, np.int32)),
        prompt_len=full(kw.pop("prompt_len", 0), np.int32),
        min_tokens=full(kw.pop("min_tokens", 0), np.int32),
        stop_ids=kw.pop("stop_ids", np.full((batch, 2), vocab, np.int32)),
        num_logprobs=full(kw.pop("num_logprobs", -1), np.int32),
        bias_ids=kw.pop("bias_ids", np.full((batch, 2), vocab, np.int32)),
        bias_values=kw.pop("bias_values", np.zeros((batch, 2), np.float32)),
        only_listed=full(kw.pop("only_listed", False), bool),
        guided=full(kw.pop("guided", False), bool),
        # wide enough for any vocabulary these tests use (read only where guided)
        token_mask=kw.pop("token_mask", np.full((batch, 4096), -1, np.int32)),
    )
    assert not kw, kw
    return SamplingTensors(**fields)


def kept_by_sorting(row, top_k, top_p):
    """The token ids top-k then top-p keep of one row of logits, by a float64 sort in numpy."""
    order = np.argsort(-row, kind="stable")
    p = np.exp(row[order].astype(np.float64) - row.max())
    nucleus = int(np.searchsorted(np.cumsum(p), top_p * p.sum())) + 1 if top_p < 1 else len(row)
    return order[: min(top_k or len(row), nucleus)]


def draws(logits, n, **kw):
    """Tokens of ``n`` independent draws (seeds 0..n-1) of each row of ``logits``: [n, batch].

    All draws run as one batch: row ``i * batch + r`` is row ``r`` with seed ``i``.
    """
    batch = logits.shape[0]
    tiled = jnp.tile(jnp.asarray(logits), (n, 1))
    seeds = np.repeat(np.arange(n), batch)
    out = sample_jit(tiled, tensors(n * batch, seed=seeds, vocab=logits.shape[1], **kw))
    return np.asarray(out.tokens).reshape(n, batch)


def test_greedy_is_first_argmax():
    logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]])
    np.testing.assert_array_equal(greedy(logits), [1, 0])
    np.testing.assert_array_equal(sample_jit(logits, tensors(2, temperature=0.0, vocab=4)).tokens, [1, 0])
    # Ties in different chunks, a tie inside one chunk, an all -inf row; vocab not a chunk multiple.
    big = np.random.default_rng(3).standard_normal((4, 1000)).astype(np.float32)
    big[0, [700, 300]] = 9.0
    big[1, [130, 131]] = 9.0
    big[2] = -np.inf
    big[3, 999] = 9.0
    np.testing.assert_array_equal(greedy(jnp.asarray(big)), [300, 130, 0, 999])
    big[1, 5] = np.nan
    assert 0 <= int(greedy(jnp.asarray(big))[1]) < 1000


def test_top_k_one_is_greedy_and_top_k_restricts():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 500)) * 2, jnp.float32)
    np.testing.assert_array_equal(draws(logits, 5, top_k=1)[0], np.argmax(logits, -1))
    got = draws(logits, 100, top_k=5)
    top5 = np.argsort(-np.asarray(logits), -1)[:, :5]
    for row in range(3):
        assert set(got[:, row]) <= set(top5[row])
        assert len(set(got[:, row])) > 1  # it does sample, not always the max


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05] + [1e-6] * 196]))
    got = draws(logits, 200, top_p=0.7)  # nucleus {0, 1}: 0.5 < 0.7 <= 0.8
    assert set(got[:, 0]) == {0, 1}
    got = draws(logits, 200, top_p=0.9)
    assert set(got[:, 0]) == {0, 1, 2}


def test_frequencies_follow_the_tempered_softmax():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(300).astype(np.float32)
    logits[[7, 150, 299]] += 4  # a few likely tokens in different CDF chunks
    n = 4000
    for temperature in (1.0, 0.5):
        got = draws(jnp.asarray(logits)[None], n, temperature=temperature)[:, 0]
        p = np.exp(logits / temperature - (logits / temperature).max())
        p /= p.sum()
        freq = np.bincount(got, minlength=300) / n
        # 5 sigma of a binomial proportion, per token
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-3)


def test_top_candidates_are_the_largest_values_and_their_ids():
    from jaxinfer.sampler import TOP_CANDIDATES, _top_candidates

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 20000)).astype(np.float32)
    x[1, 100:110] = 7.0  # the best ten in one chunk
    top, ids = jax.jit(_top_candidates)(jnp.asarray(x))
    want = -np.sort(-x, axis=-1)[:, :TOP_CANDIDATES]
    np.testing.assert_array_equal(top, want)
    np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(ids), axis=1), want)
    assert set(np.asarray(ids)[1, :10]) == set(range(100, 110))


@pytest.mark.parametrize("top_k, top_p, peaked", [(40, 1.0, True), (0, 0.9, True), (70, 0.99, True),
                                                  (0, 0.95, True), (100, 1.0, False)])
def test_filtered_frequencies_follow_the_kept_softmax(top_k, top_p, peaked):
    """Draws among the 64 largest values (top-k 40; a nucleus of 55 tokens) and over the whole
    vocabulary by rejection (top-k 70; a nucleus of 67; top-k 100 of a flat row, where most first
    draws are rejected) all follow the softmax of the kept tokens."""
    rng = np.random.default_rng(5)
    vocab = 10000
    logits = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
    if peaked:
        logits[rng.choice(vocab, 80, replace=False)] += np.linspace(8, 10, 80, dtype=np.float32)
    n = 4000
    got = draws(jnp.asarray(logits)[None], n, top_k=top_k, top_p=top_p)[:, 0]
    kept = kept_by_sorting(logits, top_k, top_p)
    want = np.zeros(vocab)
    want[kept] = np.exp(logits[kept] - logits.max())
    want /= want.sum()
    freq = np.bincount(got, minlength=vocab) / n
    assert set(np.flatnonzero(freq)) <= set(kept)
    assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1e-3)


def test_the_compiled_sampler_sorts_nothing():
    """XLA:CPU turns a top_k whose values are sliced into a full sort (18x the sampler's time at
    batch 32): every stage, compiled for a vocabulary of SmolLM2's size, keeps TopK calls only."""
    import re

    vocab = 49152
    t = tensors(4, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1, min_tokens=2,
                num_logprobs=5, vocab=vocab)
    hlo = sample_jit.lower(jnp.zeros((4, vocab)), t).compile().as_text()
    assert not re.findall(r"\ssort\(", hlo)
    assert 'custom_call_target="TopK"' in hlo


def test_masked_tokens_are_never_drawn():
    logits = np.full((2, 260), -np.inf, np.float32)
    logits[0, [3, 200]] = 0.0
    logits[1, 259] = 1.0
    got = draws(jnp.asarray(logits), 50)
    assert set(got[:, 0]) == {3, 200} and set(got[:, 1]) == {259}


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((4, 1000)), jnp.float32)
    t = tensors(4, top_p=0.95, seed=[11, 12, 13, 14], step=[3, 3, 3, 3], vocab=1000)
    batch = np.asarray(sample_jit(logits, t).tokens)
    alone = np.asarray(sample_jit(logits[2:3], tensors(1, top_p=0.95, seed=13, step=3, vocab=1000)).tokens)
    assert batch[2] == alone[0]
    other_step = np.asarray(sample_jit(logits, tensors(4, top_p=0.95, seed=[11, 12, 13, 14], step=4, vocab=1000)).tokens)
    assert (other_step != batch).any()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_greedy_rows_ignore_sampled_neighbours(temperature):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((3, 400)), jnp.float32)
    t = tensors(3, temperature=[0.0, temperature, 0.0], top_k=[0, 10, 0], top_p=[1.0, 0.9, 1.0], vocab=400)
    out = np.asarray(sample_jit(logits, t).tokens)
    np.testing.assert_array_equal(out[[0, 2]], np.argmax(np.asarray(logits), -1)[[0, 2]])


def test_min_p_keeps_tokens_near_the_best():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.06, 0.04] + [1e-7] * 195]))
    got = draws(logits, 300, min_p=0.4)  # keep p >= 0.16: tokens 0, 1, 2
    assert set(got[:, 0]) == {0, 1, 2}


def penalized_reference(logits, history, prompt_len, rep, presence, frequency):
    x = logits.astype(np.float64).copy()
    seen = set(history)
    counts = np.bincount(history[prompt_len:], minlength=len(x))
    for t in seen:
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    return x - presence * (counts > 0) - frequency * counts


def test_penalties_match_a_reference_and_leave_other_rows_alone():
    rng = np.random.default_rng(4)
    vocab = 50
    logits = rng.standard_normal((2, vocab)).astype(np.float32) * 3
    history = np.full((2, 12), vocab, np.int32)
    hist = np.array([3, 4, 5, 7, 7, 7, 9, 3], np.int32)  # prompt 3 4 5, output 7 7 7 9 3
    history[0, : len(hist)] = hist
    t = tensors(2, temperature=0.0, vocab=vocab, history=history, prompt_len=[3, 0],
                repetition_penalty=[1.3, 1.0], presence_penalty=[0.5, 0.0], frequency_penalty=[0.25, 0.0])
    ref = penalized_reference(logits[0], hist, 3, 1.3, 0.5, 0.25)
    # greedy on the penalized row picks the reference argmax; the other row is untouched
    out = sample_jit(jnp.asarray(logits), t).tokens
    assert out[0] == np.argmax(ref) and out[1] == np.argmax(logits[1])
    # and the penalized distribution is what gets sampled: tempered draws follow softmax(ref)
    n = 3000
    got = draws(jnp.asarray(logits[:1]), n, history=np.repeat(history[:1], n, 0), prompt_len=3,
                repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)[:, 0]
    p = np.exp(ref - ref.max())
    p /= p.sum()
    freq = np.bincount(got, minlength=vocab) / n
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 2e-3)


def test_min_tokens_bans_stop_ids_until_reached():
    logits = jnp.array([[0.0, 5.0, 1.0, 0.5]])
    stop_ids = np.array([[1, 4]], np.int32)  # 1 is EOS here; 4 = padding
    early = sample_jit(logits, tensors(1, temperature=0.0, vocab=4, step=2, min_tokens=3, stop_ids=stop_ids))
    late = sample_jit(logits, tensors(1, temperature=0.0, vocab=4, step=3, min_tokens=3, stop_ids=stop_ids))
    assert int(early.tokens[0]) == 2 and int(late.tokens[0]) == 1


def test_logit_bias_moves_greedy_and_sampled_choices_of_its_row_only():
    rng = np.random.default_rng(6)
    vocab = 300
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    best = np.argmax(logits, axis=-1)
    # Row 0 bans its argmax and lifts token 5; row 1 bans nothing it would pick; row 2 has no bias.
    bias_ids = np.array([[best[0], 5], [vocab - 1 if best[1] != vocab - 1 else 0, vocab], [vocab, vocab]], np.int32)
    bias_values = np.array([[-100, 3.0], [-100, 0], [0, 0]], np.float32)
    t = tensors(3, temperature=0.0, vocab=vocab, bias_ids=bias_ids, bias_values=bias_values, num_logprobs=0)
    out = sample_jit(jnp.asarray(logits), t)
    biased = logits[0].copy()
    biased[best[0]] -= 100
    biased[5] += 3
    np.testing.assert_array_equal(np.asarray(out.tokens), [np.argmax(biased), best[1], best[2]])
    # logprobs stay the model's own
    logp = logits[0] - np.log(np.exp(logits[0]).sum())
    np.testing.assert_allclose(out.logprobs[0], logp[int(out.tokens[0])], rtol=1e-5)
    # a sampled row draws from softmax(logits + bias): +ln 3 triples a token's odds
    flat = np.zeros((1, 8), np.float32)
    n = 4000
    got = draws(jnp.asarray(flat), n, bias_ids=np.tile([[2, 8]], (n, 1)).astype(np.int32),
                bias_values=np.tile([[np.log(3.0), 0]], (n, 1)).astype(np.float32))[:, 0]
    p = np.full(8, 1 / 10)
    p[2] = 3 / 10
    freq = np.bincount(got, minlength=8) / n
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n))


def test_only_listed_tokens_are_drawn_from_their_biased_softmax():
    rng = np.random.default_rng(7)
    vocab = 500
    logits = rng.standard_normal((2, vocab)).astype(np.float32)
    allowed = np.array([3, 130, 257, 499], np.int32)
    bias = np.array([0.0, 1.0, 0.0, -0.5], np.float32)
    n = 4000
    got = draws(jnp.asarray(logits[:1]), n, temperature=0.9, bias_ids=np.tile(allowed, (n, 1)),
                bias_values=np.tile(bias, (n, 1)), only_listed=True)[:, 0]
    y = (logits[0, allowed] + bias) / 0.9
    p = np.exp(y - y.max())
    p /= p.sum()
    freq = np.array([np.mean(got == a) for a in allowed])
    assert set(got) <= set(allowed) and np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n))
    # greedy picks the best allowed token; a row beside it that lists nothing keeps its own argmax
    ids = np.stack([allowed, np.full(4, vocab, np.int32)])
    t = tensors(2, temperature=0.0, vocab=vocab, bias_ids=ids, bias_values=np.stack([bias, np.zeros(4, np.float32)]),
                only_listed=[True, False])
    out = sample_jit(jnp.asarray(logits), t).tokens
    assert int(out[0]) == allowed[np.argmax(logits[0, allowed] + bias)] and int(out[1]) == np.argmax(logits[1])


def bitmask(batch: int, allowed: np.ndarray, words: int = 4096) -> np.ndarray:
    """Guided decoding's ``[batch, words]`` int32 bitmask allowing ``allowed`` in every row."""
    bits = np.zeros(words * 32, np.uint8)
    bits[allowed] = 1
    return np.tile(np.packbits(bits, bitorder="little").view(np.int32), (batch, 1))


def test_guided_rows_draw_only_their_masked_tokens():
    rng = np.random.default_rng(8)
    vocab = 600
    logits = rng.standard_normal((2, vocab)).astype(np.float32)
    allowed = np.array([0, 31, 32, 63, 64, 450, 599], np.int32)  # word edges and the sign bit
    n = 4000
    got = draws(jnp.asarray(logits[:1]), n, temperature=1.0, guided=True, token_mask=bitmask(n, allowed))[:, 0]
    p = np.exp(logits[0, allowed] - logits[0, allowed].max())
    p /= p.sum()
    freq = np.array([np.mean(got == a) for a in allowed])
    assert set(got) <= set(allowed) and np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n))
    # greedy picks the best allowed token; the unguided row beside it keeps its argmax whatever its mask says
    t = tensors(2, temperature=0.0, vocab=vocab, guided=[True, False], token_mask=bitmask(2, allowed[:2]), num_logprobs=0)
    out = sample_jit(jnp.asarray(logits), t)
    assert int(out.tokens[0]) == allowed[np.argmax(logits[0, allowed[:2]])] and int(out.tokens[1]) == np.argmax(logits[1])
    logp = logits[0] - np.log(np.exp(logits[0]).sum())
    np.testing.assert_allclose(float(out.logprobs[0]), logp[int(out.tokens[0])], rtol=1e-5)  # raw, not masked


def test_logprobs_are_the_raw_log_softmax():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 300)).astype(np.float32)
    t = tensors(2, temperature=[0.0, 0.7], vocab=300, num_logprobs=[5, -1], repetition_penalty=[1.5, 1.0],
                history=np.array([[int(np.argmax(logits[0])), 300, 300, 300], [300] * 4], np.int32))
    out = sample_jit(jnp.asarray(logits), t)
    logp = logits[0] - np.log(np.exp(logits[0]).sum())
    tok = int(out.tokens[0])
    assert tok != np.argmax(logits[0])  # the penalty moved the choice...
    np.testing.assert_allclose(out.logprobs[0], logp[tok], rtol=1e-5)  # ...not the reported logprob
    np.testing.assert_array_equal(np.asarray(out.top_ids[0, :5]), np.argsort(-logp)[:5])
    np.testing.assert_allclose(np.asarray(out.top_logprobs[0, :5]), np.sort(logp)[::-1][:5], rtol=1e-5)


def test_filter_threshold_is_exact_within_the_candidates_and_a_bound_beyond():
    """Kept tokens against a sort in numpy, for k up to the candidate count, beyond it, and nuclei
    inside and outside the candidates: the threshold keeps exactly the top-k and the nucleus when
    the candidates settle it, and says so; otherwise it keeps a superset and says it is not exact."""
    from jaxinfer.reductions import row_sums
    from jaxinfer.sampler import TOP_CANDIDATES, _filter_threshold, _top_candidates

    vocab = 20000  # more chunks than candidates: the chunk prefilter picks
    cases = [(k, top_p, scale) for k in (0, 1, 5, 40, TOP_CANDIDATES, TOP_CANDIDATES + 1, 300)
             for top_p in (1.0, 0.99, 0.9, 0.5) for scale in (0.5, 3.0) if k or top_p < 1]
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((len(cases), vocab)) * np.array([s for *_, s in cases])[:, None]).astype(np.float32)
    t = tensors(len(cases), top_k=[k for k, *_ in cases], top_p=[p for _, p, _ in cases], vocab=vocab)

    @jax.jit
    def threshold(x, t):
        top = _top_candidates(x)[0]
        return _filter_threshold(t, top, t.top_p * row_sums(jnp.exp(x - top.max(axis=-1, keepdims=True))))

    limit, exact = threshold(jnp.asarray(x), t)
    kept = np.asarray(jnp.asarray(x) >= limit[:, None])
    bounds = 0
    for row, (k, top_p, _) in enumerate(cases):
        want = set(kept_by_sorting(x[row], k, top_p))
        settled = k <= TOP_CANDIDATES and (len(want) <= TOP_CANDIDATES or k > 0)
        assert bool(exact[row]) == settled, (k, top_p)
        if settled:
            assert set(np.flatnonzero(kept[row])) == want, (k, top_p)
        else:
            assert set(np.flatnonzero(kept[row])) >= want, (k, top_p)
            bounds += 1
    assert bounds >= 4  # both kinds of row ran
