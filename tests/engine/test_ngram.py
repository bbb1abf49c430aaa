"""The n-gram drafter: longest, most recent suffix match over a prompt's own text, its live RL group
and its earlier responses; history limits; checkpoint round trip. Driven through the drafter
protocol with plain Sequences (the n-gram drafter ignores slots), no model."""

import json

import pytest

from rlhfspec.engine.drafters.ngram import NgramDrafter, _PromptIndex
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import Sequence

P, Q, R = [1, 2, 3], [4, 5, 6], [7, 8, 9]  # prompts; responses below use tokens >= 10


def _seq(sample_id, prompt, tokens=()):
    return Sequence(sample_id, list(prompt), SamplingParams(), tokens=list(tokens))


def _draft(drafter, seq, n=2):
    return drafter.propose([seq], [n]).tokens[0]


def _finish(drafter, sample_id, prompt, tokens):
    s = _seq(sample_id, prompt, tokens)
    drafter.admitted([s])
    drafter.forget(s, slot=0)


def _indexed(*docs, max_ngram=3, min_ngram=1):
    idx = _PromptIndex(max_ngram, min_ngram)
    for doc in docs:
        idx.catch_up(idx.add(list(doc)))
    return idx


# --- _PromptIndex ---

@pytest.mark.parametrize("query, expected", [([1, 2, 3], [10, 11]), ([0, 2, 3], [12, 13]), ([0, 0, 3], [20, 21]), ([0, 0, 0], [])])
def test_continuation_follows_the_longest_matching_suffix(query, expected):
    # (1,2,3) -> 10 11; (2,3) last occurs before 12 13; (3,) last occurs before 20 21.
    idx = _indexed([1, 2, 3, 10, 11, 8, 2, 3, 12, 13, 9, 3, 20, 21])
    assert idx.continuation(idx.add(query), 2) == expected


def test_continuation_respects_min_ngram():
    idx = _indexed([9, 3, 20, 21], min_ngram=2)
    assert idx.continuation(idx.add([0, 0, 3]), 2) == []  # only a 1-gram matches


def test_most_recent_occurrence_wins_within_and_across_documents():
    idx = _indexed([4, 5, 1, 4, 5, 2])
    assert idx.continuation(idx.add([4, 5]), 1) == [2]
    idx = _indexed([4, 5, 2], [4, 5, 3])
    assert idx.continuation(idx.add([4, 5]), 1) == [3]


def test_continuation_is_cut_short_at_the_end_of_a_document():
    idx = _indexed([4, 5, 6, 7])
    assert idx.continuation(idx.add([5]), 10) == [6, 7]
    idx = _indexed([5, 6], [9, 6, 7])  # (5, 6) ends doc 0 with nothing after it: fall back to (6,)
    assert idx.continuation(idx.add([5, 6]), 2) == [7]


def test_catch_up_enters_new_positions_and_leaves_older_ones():
    idx = _indexed([1, 2, 3], [1, 2, 9])  # (1, 2) now last occurs in doc 1
    idx.docs[0] += [5, 6]
    idx.catch_up(0)
    assert idx.continuation(idx.add([0, 3, 5]), 1) == [6]  # n-gram spanning old and new positions
    assert idx.continuation(idx.add([1, 2]), 1) == [9]  # (1, 2) ends before the new positions


def test_catch_up_does_not_reenter_the_last_indexed_position():
    idx = _indexed([1, 2], [1, 2, 9])
    idx.docs[0].append(5)
    idx.catch_up(0)
    assert idx.continuation(idx.add([1, 2]), 1) == [9]


# --- NgramDrafter.propose ---

def test_drafts_from_own_prompt_but_not_from_its_own_newest_suffix():
    d = NgramDrafter()
    s = _seq(0, [7, 8, 9])
    d.admitted([s])
    d.propose([s], [0])  # indexes the prompt
    s.tokens += [7, 8]
    assert _draft(d, s) == [9, 7]  # had the newest n-grams been indexed first, (7, 8) would match itself


def test_first_propose_drafts_from_own_prompt():
    d = NgramDrafter()
    s = _seq(0, [7, 8, 9, 7], tokens=[8])
    d.admitted([s])
    assert _draft(d, s) == [9, 7]


def test_drafts_from_a_live_sibling_of_the_same_prompt_only():
    d = NgramDrafter()
    a, b, other = _seq(0, P, [10, 11, 12, 13]), _seq(1, P, [10, 11]), _seq(2, Q, [10, 11])
    d.admitted([a, b, other])
    d.propose([a], [0])  # a's tokens are indexed as it generates
    proposal = d.propose([other, b], [2, 2])
    assert proposal.tokens == [[], [12, 13]]
    assert proposal.q is None  # drafts are one-hot


def test_drafts_from_an_earlier_finished_response_to_the_same_prompt():
    d = NgramDrafter()
    _finish(d, 0, P, [10, 11, 12, 13])  # never proposed for: finished indexes all its tokens
    later, other = _seq(1, P, [10, 11]), _seq(2, Q, [10, 11])
    d.admitted([later, other])
    assert d.propose([other, later], [2, 2]).tokens == [[], [12, 13]]


def test_respects_n_per_sample():
    d = NgramDrafter()
    _finish(d, 0, P, [10, 11, 12, 13, 14, 15])
    seqs = [_seq(1, P, [10]), _seq(2, P, [11]), _seq(3, P, [12])]  # different suffixes: no probe matches another
    d.admitted(seqs)
    assert d.propose(seqs, [0, 1, 3]).tokens == [[], [12], [13, 14, 15]]


# --- history limits ---

def test_history_per_prompt_drops_the_oldest_finished_responses():
    def drafts(history_per_prompt):
        d = NgramDrafter(history_per_prompt=history_per_prompt)
        for i, response in enumerate([[10, 11, 20], [30, 31, 32], [40, 41, 42]]):
            _finish(d, i, P, response)
        probes = [_seq(3, P, [10, 11]), _seq(4, P, [30, 31])]
        return d.propose(probes, [1, 1]).tokens

    assert drafts(3) == [[20], [32]]
    assert drafts(2) == [[], [32]]


def test_history_prompts_evicts_the_least_recently_used_prompt():
    d = NgramDrafter(history_prompts=2)
    _finish(d, 0, P, [10, 11, 12])
    _finish(d, 1, Q, [10, 11, 13])
    d.admitted([_seq(2, P)])  # P is now more recent than Q
    _finish(d, 3, R, [10, 11, 14])  # a third prompt evicts Q
    assert _draft(d, _seq(4, P, [10, 11]), 1) == [12]
    assert _draft(d, _seq(5, Q, [10, 11]), 1) == []


# --- checkpoints ---

def test_state_dict_round_trips_through_json():
    d = NgramDrafter()
    _finish(d, 0, P, [10, 11, 12, 13])
    _finish(d, 1, Q, [10, 30, 31])
    loaded = NgramDrafter()
    loaded.load_state_dict(json.loads(json.dumps(d.state_dict())))
    for drafter in (d, loaded):
        probes = [_seq(2, P, [10, 11]), _seq(3, Q, [10])]
        assert drafter.propose(probes, [2, 2]).tokens == [[12, 13], [30, 31]]
