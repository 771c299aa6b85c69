"""The n-gram proposer and greedy verification, without a model."""

import numpy as np
import pytest

from kestrel.spec import NgramProposer, SpecCounters, verify_greedy
from tests.core.helpers import make_scheduler


def test_proposes_what_followed_the_most_recent_longest_match():
    p = NgramProposer(3, min_n=1, max_n=3)
    #                 0  1  2  3  4  5  6  7  8  9
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3])
    assert p.propose(tokens).tolist() == [4, 5, 1]  # "1 2 3" last seen at 4, then 4 5 1
    assert p.propose(tokens, k=1).tolist() == [4]
    assert p.propose(np.array([7, 8, 9])).tolist() == []  # nothing repeats
    assert p.propose(np.array([5])).tolist() == []


def test_shorter_ngrams_are_tried_down_to_min_n():
    tokens = np.array([4, 6, 7, 5, 6])  # "5 6" never seen before; "6" at 1, followed by 7 5
    assert NgramProposer(2, min_n=1, max_n=2).propose(tokens).tolist() == [7, 5]
    assert NgramProposer(2, min_n=2, max_n=2).propose(tokens).tolist() == []


def test_drafts_stop_at_the_end_of_the_sequence():
    tokens = np.array([1, 2, 1])  # "1" at 0 is followed by 2 1: only two tokens exist
    assert NgramProposer(5, min_n=1, max_n=1).propose(tokens).tolist() == [2, 1]


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="min_n=3, max_n=2"):
        NgramProposer(2, min_n=3, max_n=2)
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1, got 0"):
        NgramProposer(0, min_n=1, max_n=2)


def test_greedy_verification_accepts_the_matching_prefix_and_one_token():
    s = make_scheduler()
    s.add_request("a", [1, 2, 3], max_tokens=20)
    s.add_request("b", [4, 5, 6], max_tokens=20)
    s.add_request("c", [7, 8, 9], max_tokens=20)
    out = s.schedule()
    s.update(np.array([10, 20, 30]))
    s.set_draft_tokens("a", [11, 12, 13])
    s.set_draft_tokens("c", [31, 32])
    out = s.schedule()
    assert out.num_draft_tokens.tolist() == [0, 3, 2]  # b decodes first
    # Row predictions: b -> 21; a -> 11 12 99 (third draft wrong) + bonus; c -> 31 32 33.
    sampled = np.array([21, 11, 12, 99, 50, 31, 32, 33], dtype=np.int64)
    tokens, counts = verify_greedy(out, sampled)
    assert counts.tolist() == [1, 3, 3]
    assert tokens.tolist() == [21, 11, 12, 99, 31, 32, 33]
    c = SpecCounters()
    c.record(out, counts)
    assert c.as_stats() == {
        "spec_decode_num_drafts": 2,
        "spec_decode_num_draft_tokens": 5,
        "spec_decode_num_accepted_tokens": 4,
    }
    upd = s.update(tokens, counts)
    assert upd.token_ids.tolist() == [21, 11, 12, 99, 31, 32, 33]
    assert s.request_info("a")["output_token_ids"] == [10, 11, 12, 99]


def test_no_drafts_pass_through():
    s = make_scheduler()
    s.add_request("a", [1, 2, 3], max_tokens=4)
    out = s.schedule()
    sampled = np.array([5], dtype=np.int64)
    tokens, counts = verify_greedy(out, sampled)
    assert tokens.tolist() == [5] and counts.tolist() == [1]
