"""models.loader.tokenizer_check: a tokenizer built into the wrong model type (transformers 5.17 turns Gemma-3's GGUF
tokenizer into a Unigram model that splits common words) is recognised; a right one, a small vocabulary and a
non-transformers object are not judged wrong."""

from __future__ import annotations

from sparseattn.models.loader import _PROBE_WORDS, tokenizer_check


class _Tok:
    """A minimal tokenizer: a vocabulary and a word -> pieces rule."""

    def __init__(self, marker: str, whole: tuple[str, ...], split_every: bool) -> None:
        self.marker, self.split = marker, split_every
        self.vocab = {marker + w: i for i, w in enumerate(whole)}
        self.pieces: list[str] = []

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        self.pieces = []
        for w in text.split()[1:]:
            tok = self.marker + w
            if tok in self.vocab and not self.split:
                self.pieces.append(tok)
            else:  # split into two pieces, as a mis-built model does
                self.pieces += [self.marker + w[:2], w[2:]]
        return {"input_ids": list(range(len(self.pieces)))}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.pieces[i] for i in ids]


def test_a_tokenizer_that_splits_whole_words_is_flagged():
    bad = _Tok("\u2581", _PROBE_WORDS, split_every=True)
    reason = tokenizer_check(bad)
    assert reason is not None and reason.startswith(f"it splits {len(_PROBE_WORDS)} of {len(_PROBE_WORDS)} common words")
    assert "'startup'" in reason and "transformers" in reason


def test_right_small_and_foreign_tokenizers_pass():
    assert tokenizer_check(_Tok("\u2581", _PROBE_WORDS, split_every=False)) is None  # SentencePiece, built right
    assert tokenizer_check(_Tok("\u0120", _PROBE_WORDS, split_every=False)) is None  # byte-level BPE, built right
    assert tokenizer_check(_Tok("\u2581", _PROBE_WORDS[:2], split_every=True)) is None  # too few whole words to judge
    assert tokenizer_check(object()) is None  # not a transformers tokenizer


# ------------------------------------------------------------------ load(tokenizer=...) / SPARSEATTN_TOKENIZER


def _tiny_model(tmp_path):
    transformers = __import__("pytest").importorskip("transformers")
    import torch

    from sparseattn.testing.bad_inputs import byte_level_tokenizer

    tok = byte_level_tokenizer()
    d = tmp_path / "model"
    tok.save_pretrained(str(d))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d, tok


def test_a_tokenizer_folder_replaces_the_models_own(tmp_path, monkeypatch):
    import pytest

    from sparseattn.models.loader import load

    d, tok = _tiny_model(tmp_path)
    other = tmp_path / "tok"
    tok.save_pretrained(str(other))
    text = "Curious otters negotiate with patient herons."
    want = tok(text)["input_ids"]
    _, t1 = load(str(d), tokenizer=other)
    assert t1(text)["input_ids"] == want
    monkeypatch.setenv("SPARSEATTN_TOKENIZER", str(other))
    _, t2 = load(str(d))
    assert t2(text)["input_ids"] == want
    monkeypatch.setenv("SPARSEATTN_TOKENIZER", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"^load: SPARSEATTN_TOKENIZER is not a tokenizer folder; expected a folder "
                                         r"written by save_pretrained .*not a folder"):
        load(str(d))
    monkeypatch.delenv("SPARSEATTN_TOKENIZER")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"^load: tokenizer is not a tokenizer folder; .*a folder without them"):
        load(str(d), tokenizer=empty)
    big = tmp_path / "big"
    tok.add_tokens([f"zzextra{i}" for i in range(3)])
    tok.save_pretrained(str(big))
    with pytest.raises(ValueError, match=r"^load: tokenizer .*big has a vocabulary larger than the model's embeddings"):
        load(str(d), tokenizer=big)
