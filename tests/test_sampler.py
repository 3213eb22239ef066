"""On-device sampling: greedy, top-k, top-p, temperature, seeds, all per row in one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.sampler import SamplingTensors, greedy, sample

sample_jit = jax.jit(sample)


def tensors(batch, temperature=1.0, top_k=0, top_p=1.0, seed=0, step=0):
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dt), (batch,)).copy()  # noqa: E731
    seeds = np.zeros((batch, 2), np.uint32)
    seeds[:, 1] = full(seed, np.uint32)
    return SamplingTensors(
        temperature=full(temperature, np.float32), top_k=full(top_k, np.int32),
        top_p=full(top_p, np.float32), seed=seeds, step=full(step, np.int32),
    )


def draws(logits, n, **kw):
    """Tokens of ``n`` independent draws (seeds 0..n-1) of each row of ``logits``: [n, batch].

    All draws run as one batch: row ``i * batch + r`` is row ``r`` with seed ``i``.
    """
    batch = logits.shape[0]
    tiled = jnp.tile(jnp.asarray(logits), (n, 1))
    seeds = np.repeat(np.arange(n), batch)
    return np.asarray(sample_jit(tiled, tensors(n * batch, seed=seeds, **kw))).reshape(n, batch)


def test_greedy_is_first_argmax():
    logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 5.0]])
    np.testing.assert_array_equal(greedy(logits), [1, 0])
    np.testing.assert_array_equal(sample_jit(logits, tensors(2, temperature=0.0)), [1, 0])


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


def test_masked_tokens_are_never_drawn():
    logits = np.full((2, 260), -np.inf, np.float32)
    logits[0, [3, 200]] = 0.0
    logits[1, 259] = 1.0
    got = draws(jnp.asarray(logits), 50)
    assert set(got[:, 0]) == {3, 200} and set(got[:, 1]) == {259}


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((4, 1000)), jnp.float32)
    t = tensors(4, top_p=0.95, seed=[11, 12, 13, 14], step=[3, 3, 3, 3])
    batch = np.asarray(sample_jit(logits, t))
    alone = np.asarray(sample_jit(logits[2:3], tensors(1, top_p=0.95, seed=13, step=3)))
    assert batch[2] == alone[0]
    other_step = np.asarray(sample_jit(logits, tensors(4, top_p=0.95, seed=[11, 12, 13, 14], step=4)))
    assert (other_step != batch).any()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_greedy_rows_ignore_sampled_neighbours(temperature):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((3, 400)), jnp.float32)
    t = SamplingTensors(
        temperature=np.array([0.0, temperature, 0.0], np.float32), top_k=np.array([0, 10, 0], np.int32),
        top_p=np.array([1.0, 0.9, 1.0], np.float32), seed=np.zeros((3, 2), np.uint32), step=np.zeros(3, np.int32),
    )
    out = np.asarray(sample_jit(logits, t))
    np.testing.assert_array_equal(out[[0, 2]], np.argmax(np.asarray(logits), -1)[[0, 2]])
