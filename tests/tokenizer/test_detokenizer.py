"""IncrementalDetokenizer: streamed deltas equal the full decode; stop strings never leak."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kestrel.tokenizer import DetokenizerStep, IncrementalDetokenizer, Tokenizer

FFFD = "\ufffd"
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _byte_to_char() -> dict[int, str]:
    """GPT-2 byte-level alphabet: printable latin-1 bytes map to themselves, the rest to 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


BYTE_TO_CHAR = _byte_to_char()


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`: the finest split, cutting every multi-byte character."""
    return [tok.token_to_id(BYTE_TO_CHAR[b]) for b in text.encode("utf-8")]


def stream(det: IncrementalDetokenizer, ids: list[int], chunk_sizes=(1,)) -> list[DetokenizerStep]:
    """Feed `ids` in chunks (sizes cycled), then finish; returns every step."""
    steps, pos, i = [], 0, 0
    while pos < len(ids):
        size = max(1, chunk_sizes[i % len(chunk_sizes)])
        steps.append(det.add_tokens(ids[pos : pos + size]))
        pos, i = pos + size, i + 1
    steps.append(det.add_tokens([], finished=True))
    return steps


def joined(steps: list[DetokenizerStep]) -> str:
    return "".join(s.text_delta for s in steps)


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Char-by-char reference: the first stop match to END wins; ties go to the earliest start."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[: end - len(s)]), s
    return text, None


# ---- deltas vs full decode --------------------------------------------------------------


@SETTINGS
@given(
    ids=st.lists(st.integers(0, 511), max_size=40),
    prompt=st.lists(st.integers(0, 511), max_size=10),
    chunks=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    skip=st.booleans(),
)
def test_random_ids_deltas_equal_decode(tiny: Tokenizer, ids, prompt, chunks, skip) -> None:
    det = IncrementalDetokenizer(tiny, prompt, skip_special_tokens=skip)
    steps = stream(det, ids, chunks)
    full = tiny.decode(ids, skip_special_tokens=skip)
    assert joined(steps) == full == det.output_text
    if FFFD not in full:
        assert all(FFFD not in s.text_delta for s in steps)
    assert all(s.stop_reason is None for s in steps)


TEXTS = st.text(
    alphabet=st.sampled_from(list("ab xyz\n\t.,") + ["é", "你", "好", "😀", "🚀", "Ω", "\u200d"]),
    max_size=30,
)


@SETTINGS
@given(
    text=TEXTS, chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3), per_byte=st.booleans()
)
def test_multibyte_text_never_emits_replacement_char(tiny: Tokenizer, text, chunks, per_byte):
    ids = byte_ids(tiny, text) if per_byte else tiny.encode(text)
    det = IncrementalDetokenizer(tiny, tiny.encode("prompt: "))
    steps = stream(det, ids, chunks)
    assert joined(steps) == text
    assert all(FFFD not in s.text_delta for s in steps)


def test_split_emoji_is_held_until_complete(tiny: Tokenizer) -> None:
    det = IncrementalDetokenizer(tiny, [])
    deltas = [det.add_tokens([i]).text_delta for i in byte_ids(tiny, "a😀你")]
    assert deltas == ["a", "", "", "", "😀", "", "", "你"]


def test_incomplete_bytes_are_released_on_finish(tiny: Tokenizer) -> None:
    ids = byte_ids(tiny, "ok😀")[:-2]  # the emoji's last two bytes never come
    det = IncrementalDetokenizer(tiny, [])
    assert [det.add_tokens([i]).text_delta for i in ids] == ["o", "k", "", ""]
    last = det.add_tokens([], finished=True)
    assert last == DetokenizerStep(FFFD, None)
    assert "ok" + FFFD == tiny.decode(ids)


def test_prompt_ending_mid_character(tiny: Tokenizer) -> None:
    # The prompt's partial character cannot join the output, so the output decodes on its own.
    emoji = byte_ids(tiny, "😀")
    det = IncrementalDetokenizer(tiny, emoji[:2])
    steps = stream(det, emoji[2:] + byte_ids(tiny, "x"))
    assert joined(steps) == tiny.decode(emoji[2:] + byte_ids(tiny, "x")) == FFFD * 2 + "x"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_output(tiny: Tokenizer, skip: bool) -> None:
    ids = tiny.encode("hi<|im_end|><|endoftext|>")
    steps = stream(IncrementalDetokenizer(tiny, [1], skip_special_tokens=skip), ids)
    assert joined(steps) == ("hi" if skip else "hi<|im_end|><|endoftext|>")


# ---- stop strings ------------------------------------------------------------------------


def deltas_per_char(tok: Tokenizer, text: str, **kwargs) -> tuple[list[str], list[str | None]]:
    det = IncrementalDetokenizer(tok, [], **kwargs)
    steps = [det.add_tokens(byte_ids(tok, ch)) for ch in text]
    return [s.text_delta for s in steps], [s.stop_reason for s in steps]


def test_stop_across_tokens(tiny: Tokenizer) -> None:
    deltas, reasons = deltas_per_char(tiny, "hello world!", stop=["world"])
    assert deltas == ["h", "e", "l", "l", "o", " ", "", "", "", "", "", ""]
    assert reasons == [None] * 10 + ["world", None]
    deltas, _ = deltas_per_char(
        tiny, "hello world!", stop=["world"], include_stop_str_in_output=True
    )
    assert "".join(deltas) == "hello world" and deltas[10] == "world"


def test_stop_inside_one_token(tiny: Tokenizer) -> None:
    text = "x = self.values; return values + data"
    ids = tiny.encode(text)
    pieces = [tiny.decode([i]) for i in ids]
    k = next(k for k, p in enumerate(pieces) if len(p.strip()) >= 4)
    start = len("".join(pieces[:k]))
    stop = pieces[k].strip()[1:3]  # strictly inside token k
    cut = text.index(stop)
    assert start < cut and cut + len(stop) < start + len(pieces[k])
    for include, expected in ((False, text[:cut]), (True, text[: cut + len(stop)])):
        det = IncrementalDetokenizer(tiny, [], stop=[stop], include_stop_str_in_output=include)
        steps = [det.add_tokens([i]) for i in ids]
        assert joined(steps) == det.output_text == expected
        assert [s.stop_reason for s in steps].index(stop) == k
        assert all(s == DetokenizerStep("") for s in steps[k + 1 :])


def test_stop_at_very_start(tiny: Tokenizer) -> None:
    det = IncrementalDetokenizer(tiny, [], stop=["Hel"])
    steps = stream(det, tiny.encode("Hello there"))
    assert joined(steps) == "" and det.output_text == "" and det.stop_reason == "Hel"
    det = IncrementalDetokenizer(tiny, [], stop=["Hel"], include_stop_str_in_output=True)
    assert joined(stream(det, tiny.encode("Hello there"))) == "Hel"


def test_held_prefix_released_when_it_stops_matching(tiny: Tokenizer) -> None:
    deltas, reasons = deltas_per_char(tiny, "xabcX", stop=["abcd"])
    assert deltas == ["x", "", "", "", "abcX"] and reasons == [None] * 5
    # Overlapping prefixes: only the part that can no longer start the stop string is released.
    deltas, reasons = deltas_per_char(tiny, "aaab", stop=["aab"])
    assert deltas == ["", "", "a", ""] and reasons == [None, None, None, "aab"]


def test_held_prefix_released_on_finish(tiny: Tokenizer) -> None:
    det = IncrementalDetokenizer(tiny, [], stop=["abc"])
    first = det.add_tokens(byte_ids(tiny, "xyzab"))
    assert first.text_delta == "xyz" and det.output_text == "xyzab"
    assert det.add_tokens([], finished=True) == DetokenizerStep("ab", None)
    assert det.finished and det.add_tokens(byte_ids(tiny, "c")) == DetokenizerStep("")


def test_several_stop_strings_first_to_end_wins(tiny: Tokenizer) -> None:
    text = "the quick brown fox"
    for stops in (["brown fox", "quick"], ["quick", "brown fox"]):
        det = IncrementalDetokenizer(tiny, [], stop=stops)
        assert joined(stream(det, tiny.encode(text))) == "the " and det.stop_reason == "quick"
    # "bc" is complete before "abcd" is, whatever the token split or list order.
    for stops in (["abcd", "bc"], ["bc", "abcd"]):
        for ids in (tiny.encode("xabcd"), byte_ids(tiny, "xabcd")):
            det = IncrementalDetokenizer(tiny, [], stop=stops)
            assert joined(stream(det, ids, (5,))) == "xa" and det.stop_reason == "bc"
    # Same end: the longer (earlier-starting) stop string wins.
    det = IncrementalDetokenizer(tiny, [], stop=["cd", "bcd"], include_stop_str_in_output=False)
    assert joined(stream(det, byte_ids(tiny, "abcde"))) == "a" and det.stop_reason == "bcd"


def test_stop_string_with_split_multibyte_char(tiny: Tokenizer) -> None:
    det = IncrementalDetokenizer(tiny, [], stop=["😀 t"])
    steps = stream(det, byte_ids(tiny, "hi 😀 there"))
    assert joined(steps) == "hi " and det.stop_reason == "😀 t"
    assert all(FFFD not in s.text_delta for s in steps)


def test_stop_on_special_token_text_needs_it_unskipped(tiny: Tokenizer) -> None:
    ids = tiny.encode("a<|im_end|>b")
    det = IncrementalDetokenizer(tiny, [], skip_special_tokens=False, stop=["<|im_end|>"])
    assert joined(stream(det, ids)) == "a" and det.stop_reason == "<|im_end|>"
    det = IncrementalDetokenizer(tiny, [], skip_special_tokens=True, stop=["<|im_end|>"])
    assert joined(stream(det, ids)) == "ab" and det.stop_reason is None


def test_invalid_stop_strings(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tiny, [], stop=[""])


@SETTINGS
@given(
    text=st.text(alphabet=st.sampled_from(list("ab c") + ["😀"]), max_size=24),
    stops=st.lists(
        st.text(alphabet=st.sampled_from(list("ab c") + ["😀"]), min_size=1, max_size=4), max_size=3
    ),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    include=st.booleans(),
    per_byte=st.booleans(),
)
def test_stop_strings_match_char_by_char_reference(
    tiny: Tokenizer, text, stops, chunks, include, per_byte
) -> None:
    ids = byte_ids(tiny, text) if per_byte else tiny.encode(text)
    det = IncrementalDetokenizer(tiny, [], stop=stops, include_stop_str_in_output=include)
    expected, reason = reference_stop(text, stops, include)
    sent = ""
    for step in stream(det, ids, chunks):
        sent += step.text_delta
        assert expected.startswith(sent)  # nothing sent is ever taken back
        if step.stop_reason is not None:
            assert step.stop_reason == reason
    assert sent == det.output_text == expected
    assert det.stop_reason == reason
