"""Vocabulary-parallel embedding and LM head over tp = 1, 2, 4 simulated ranks (CPU, fp32).

Embedding: the ranks' masked lookups sum to F.embedding of the full table. LM head: the ranks'
logits, concatenated (padding columns dropped), are F.linear of the full table. 50 ids over 4
ranks exercises the padding (13 rows per rank, the last holding 11 real ones).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel.layers import ParallelLMHead, VocabParallelEmbedding
from tests.layers.tp_sim import SplitGroup, load_full, run_ranks, split_group

TP_SIZES = (1, 2, 4)
HIDDEN = 8


def make_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(vocab)
    table = torch.randn(vocab, HIDDEN, generator=g)  # [vocab, hidden]
    # Both ends of the vocabulary and every rank boundary, plus random ids.
    ids = torch.cat([torch.tensor([0, vocab - 1, 12, 13, 24, 25]), torch.randint(vocab, (20,))])
    hidden = torch.randn(7, HIDDEN, generator=g)
    return table, ids, hidden


def check(actual: torch.Tensor, expected: torch.Tensor, tp: int) -> None:
    if tp == 1:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("vocab", [48, 50])
def test_embedding_masked_lookups_sum_to_full(tp: int, vocab: int) -> None:
    table, ids, _ = make_inputs(vocab)
    outs = []
    for rank in range(tp):
        group = split_group(rank, tp)
        embed = VocabParallelEmbedding(vocab, HIDDEN, tp_group=group, prefix="embed")
        load_full(embed, {"weight": table})
        rows = -(-vocab // tp)
        assert embed.weight.shape == (rows, HIDDEN)
        real = embed.vocab_end - embed.vocab_start
        assert torch.equal(embed.weight[:real], table[embed.vocab_start : embed.vocab_end])
        assert not embed.weight[real:].any()  # padding rows are zero
        outs.append(embed(ids))
        if isinstance(group, SplitGroup):
            assert group.calls == ["all_reduce"]
    check(torch.stack(outs).sum(0), F.embedding(ids, table), tp)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("vocab", [48, 50])
def test_lm_head_logits_concat_to_full(tp: int, vocab: int) -> None:
    table, _, hidden = make_inputs(vocab)
    outs = []
    for rank in range(tp):
        group = split_group(rank, tp)
        head = ParallelLMHead(vocab, HIDDEN, tp_group=group, prefix="lm_head")
        load_full(head, {"weight": table})
        logits = head(hidden)  # this rank's [7, rows] (the fake gather returns it as is)
        assert logits.dtype == torch.float32
        outs.append(logits)
        if isinstance(group, SplitGroup):
            assert group.calls == ["all_gather"]
    check(torch.cat(outs, dim=-1)[:, :vocab], F.linear(hidden, table).float(), tp)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("tied", [False, True])
def test_embedding_and_head_with_real_collectives(tp: int, tied: bool) -> None:
    """Thread-simulated ranks: the layers' own all-reduce / all-gather (and padding drop)."""
    vocab = 50
    table, ids, hidden = make_inputs(vocab)

    def rank_fn(group) -> tuple[torch.Tensor, torch.Tensor]:
        embed = VocabParallelEmbedding(vocab, HIDDEN, tp_group=group, prefix="embed")
        head = ParallelLMHead(
            vocab, HIDDEN, tp_group=group, tie_to=embed if tied else None, prefix="lm_head"
        )
        load_full(embed, {"weight": table})
        if tied:
            assert head.weight is embed.weight
        else:
            load_full(head, {"weight": table})
        return embed(ids), head(hidden)

    for embedded, logits in run_ranks(tp, rank_fn):
        check(embedded, F.embedding(ids, table), tp)
        assert logits.shape == (7, vocab)
        check(logits, F.linear(hidden, table), tp)


def test_tie_needs_the_same_vocabulary_and_group() -> None:
    embed = VocabParallelEmbedding(50, HIDDEN, tp_group=SplitGroup(rank=0, size=2))
    with pytest.raises(ValueError, match="cannot tie"):
        ParallelLMHead(50, HIDDEN, tp_group=SplitGroup(rank=1, size=2), tie_to=embed)
    with pytest.raises(ValueError, match="cannot tie"):
        ParallelLMHead(48, HIDDEN, tp_group=SplitGroup(rank=0, size=2), tie_to=embed)


def test_embedding_loader_errors_name_the_parameter() -> None:
    embed = VocabParallelEmbedding(50, HIDDEN, prefix="model.embed_tokens")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: shape mismatch.*\(49, 8\)"):
        embed.weight.weight_loader(embed.weight, torch.zeros(49, HIDDEN))
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has no shards"):
        embed.weight.weight_loader(embed.weight, torch.zeros(50, HIDDEN), "q")
