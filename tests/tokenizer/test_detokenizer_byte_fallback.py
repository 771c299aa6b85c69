"""IncrementalDetokenizer on a byte-fallback (SentencePiece-style) vocabulary: a run of
`<0xNN>` tokens decodes as one group (one U+FFFD per byte when it is not valid UTF-8, so one
byte more can turn a finished character into U+FFFDs). Random ids: the deltas add up to the
final text, which equals `tokenizer.decode(ids)`; no delta ends inside a character; stop
strings still end the text where a char-by-char stream would. Byte-level BPE is covered in
test_detokenizer.py."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers

from kestrel.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tokenizer.test_detokenizer import joined, reference_stop, stream

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FFFD = "\ufffd"
BOS = 1
PIECES = ["▁", "a", "b", "▁hello", "▁world", "你", "好", "é", "😀", "ab", "▁a", FFFD, "x", "\n"]


def byte_fallback_tokenizer() -> Tokenizer:
    """Llama/Mistral's HF pipeline: pieces with `▁` for spaces, 256 byte tokens, decoder
    Replace(▁) -> ByteFallback -> Fuse -> Strip(one leading space)."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
    vocab = {p: i for i, p in enumerate(pieces)}
    backend = Backend(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    return Tokenizer.from_tokenizers(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOK = byte_fallback_tokenizer()
NUM_IDS = TOK.vocab_size
assert len(TOK.byte_fallback_ids()) == 256


def byte(b: int) -> int:
    return 3 + b


IDS = st.lists(
    st.one_of(
        st.integers(0, NUM_IDS - 1),
        st.integers(0xC0, 0xF4).map(byte),  # lead bytes
        st.integers(0x80, 0xBF).map(byte),  # continuation bytes
    ),
    max_size=30,
)


def _utf8_ids(text: str) -> list[int]:
    return [byte(b) for b in text.encode("utf-8")]


@SETTINGS
@given(ids=IDS, chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3), skip=st.booleans())
def test_random_ids_add_up_to_the_decode(ids, chunks, skip):
    """After a BOS prompt: the oracle is decode(ids) (skipping special tokens: BOS has no text)
    or the text after "<s>" in decode([BOS] + ids) (BOS kept: the leading space stays)."""
    det = IncrementalDetokenizer(TOK, [BOS], skip_special_tokens=skip)
    steps = stream(det, ids, chunks)
    whole = TOK.decode([BOS, *ids], skip_special_tokens=skip)
    expected = whole if skip else whole.removeprefix("<s>")
    assert joined(steps) == det.output_text == expected
    if skip:
        assert expected == TOK.decode(ids)


@SETTINGS
@given(prompt=IDS, ids=IDS, chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_any_prompt_deltas_add_up(prompt, ids, chunks):
    """Whatever the prompt ends with (a byte token: no context), the deltas add up to the
    output's text; when the prompt ends in a piece, that text is the whole sequence's decode
    after the prompt's."""
    det = IncrementalDetokenizer(TOK, prompt)
    steps = stream(det, ids, chunks)
    assert joined(steps) == det.output_text
    context = prompt[-6:]
    if not context or context[-1] in TOK.byte_fallback_ids() or TOK.decode(context).endswith(FFFD):
        assert det.output_text == TOK.decode(ids)
    else:
        whole, head = TOK.decode(context + ids), TOK.decode(context)
        assert whole.startswith(head) and det.output_text == whole[len(head) :]


@SETTINGS
@given(
    text=st.text(
        alphabet=st.sampled_from(list("ab é\n") + ["你", "😀", "Ω", "\u0301"]), max_size=12
    ),
    tail=st.lists(st.integers(0x80, 0xBF).map(byte), max_size=3),  # never a character
)
def test_characters_spelt_in_bytes_never_show_half(text, tail):
    """Every character as byte tokens, between pieces: no delta holds a U+FFFD before the
    end; bytes that never complete a character come out (as U+FFFDs) only when it finishes."""
    ids = [TOK.token_to_id("a")]
    for ch in text:
        ids += _utf8_ids(ch) + [TOK.token_to_id("x")]
    det = IncrementalDetokenizer(TOK, [BOS])
    steps = [det.add_tokens([i]) for i in ids + tail]
    assert all(FFFD not in s.text_delta for s in steps)
    steps.append(det.add_tokens([], finished=True))
    assert joined(steps) == TOK.decode(ids + tail)
    assert (FFFD in steps[-1].text_delta) == bool(tail)


def test_a_byte_after_a_finished_character_changes_its_text():
    """`中` in bytes then a stray continuation byte: decode gives four U+FFFD, and the stream
    must never have sent `中`."""
    ids = [*_utf8_ids("中"), byte(0xB8), TOK.token_to_id("▁hello")]
    det = IncrementalDetokenizer(TOK, [BOS])
    deltas = [det.add_tokens([i]).text_delta for i in ids]
    assert deltas[:4] == ["", "", "", ""]
    assert "".join(deltas) + det.add_tokens([], finished=True).text_delta == TOK.decode(ids)
    assert TOK.decode(ids) == FFFD * 4 + " hello"


def test_prompt_ending_in_byte_tokens_gives_no_context():
    prompt = [BOS, *_utf8_ids("中")]
    ids = [byte(0xB8), TOK.token_to_id("▁hello")]
    det = IncrementalDetokenizer(TOK, prompt)
    assert joined(stream(det, ids)) == TOK.decode(ids) == FFFD + " hello"


@SETTINGS
@given(
    ids=IDS,
    stops=st.lists(
        st.sampled_from(["a", "b", "你", "ab", FFFD, " hello", "\n"]), min_size=1, max_size=2
    ),
    include=st.booleans(),
)
def test_stop_strings_over_bytes_match_the_char_by_char_reference(ids, stops, include):
    det = IncrementalDetokenizer(TOK, [BOS], stop=stops, include_stop_str_in_output=include)
    steps = stream(det, ids)
    expected, reason = reference_stop(TOK.decode(ids), stops, include)
    assert joined(steps) == det.output_text == expected
    assert det.stop_reason == reason


def test_byte_level_vocabularies_have_no_byte_fallback_ids(tiny):
    assert tiny.byte_fallback_ids() == frozenset()
