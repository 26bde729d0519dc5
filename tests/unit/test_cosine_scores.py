"""Similarity scores do not depend on which rows are scored together.

A page token holds the last score of a page, and the next page keeps the scores
below it: a score computed differently the second time (a BLAS matrix product
rounds a row by the number of rows in it) repeated or skipped an episode.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from memsvc.domain._episodes import cosine_scores


def packed(vector: np.ndarray) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector.tolist())


@pytest.mark.parametrize("dimensions", [3, 64, 67, 4096])
def test_a_score_is_the_same_whichever_rows_are_scored_with_it(dimensions: int):
    rng = np.random.default_rng(5)
    query = packed(rng.standard_normal(dimensions))
    rows = [packed(rng.standard_normal(dimensions)) for _ in range(150)]
    alone = [float(cosine_scores([row], query, dimensions)[0]) for row in rows]
    for size in (2, 3, 4, 7, 64, 150):
        together = [
            float(score)
            for start in range(0, len(rows), size)
            for score in cosine_scores(rows[start : start + size], query, dimensions)
        ]
        assert together == alone, size
    # Shuffled, so that each row lands at another place in another slice.
    order = rng.permutation(len(rows))
    shuffled = cosine_scores([rows[i] for i in order], query, dimensions)
    assert [float(score) for score in shuffled] == [alone[i] for i in order]


def test_a_vector_scores_at_most_1_against_itself():
    rng = np.random.default_rng(7)
    vectors = [packed(rng.standard_normal(67)) for _ in range(200)]
    assert all(float(cosine_scores([v], v, 67)[0]) <= 1.0 for v in vectors)


def test_a_zero_embedding_scores_zero():
    query = packed(np.array([1.0, 0.0]))
    assert cosine_scores([packed(np.zeros(2)), query], query, 2).tolist() == [0.0, 1.0]
