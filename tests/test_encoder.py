"""plan_batches: the token budget holds and every index is planned exactly once."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.encoder import plan_batches


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 600), max_size=300), st.integers(1, 5000))
def test_budget_holds_and_every_index_once(lengths, budget):
    lengths = np.asarray(lengths, dtype=np.int64)
    batches = plan_batches(lengths, budget)
    planned = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    assert sorted(planned.tolist()) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * int(lengths[b].max())
        assert padded <= budget or len(b) == 1  # only a single text longer than the budget may exceed it
        assert int(lengths[b[0]]) == int(lengths[b].max())  # the batch is padded to its first (longest) text


def test_longest_first_and_short_texts_share_batches():
    lengths = np.array([3, 500, 3, 3, 40, 3])
    batches = plan_batches(lengths, 64)
    assert batches[0].tolist() == [1]  # over budget alone, first
    assert [len(b) for b in batches] == [1, 1, 4]
