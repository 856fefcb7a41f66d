"""mmdit.py and the text encoder: parity with REPA's MMDiT from a fixture, taps, heads, training
losses on a tiny MMDiT; CLIP text features' padding, truncation and null caption (tiny random)."""

import logging

import pytest
import torch

from encoders import TEXT_TOKENS, TINY_RANDOM, load_text_encoder

# ----------------------------------------------------------------------------------------------
# The text encoder


@pytest.fixture(scope="module")
def text_encoder():
    return load_text_encoder(random=True)


def reference_ids(tokenizer, caption):
    """CLIP's 77 ids built by hand: start, one token per character (the tiny vocabulary has no
    merges; a word's last character carries '</w>'), end, then end-of-text up to 77."""
    vocab = tokenizer.get_vocab()
    pieces = []
    for word in caption.split():
        chars = [tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(c)[0][0] for c in word]
        pieces += chars[:-1] + [chars[-1] + "</w>"]
    ids = [tokenizer.bos_token_id] + [vocab[p] for p in pieces][: TEXT_TOKENS - 2]
    ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids + [tokenizer.eos_token_id] * (TEXT_TOKENS - len(ids)))


def test_text_features_are_clip_last_hidden_state_of_77_eot_padded_tokens(text_encoder):
    captions = ["a red bus", "two dogs on a beach", ""]
    feats = text_encoder.encode(captions)
    assert feats.shape == (3, TEXT_TOKENS, text_encoder.dim) and feats.dtype == torch.float32
    ids = torch.stack([reference_ids(text_encoder.tokenizer, c) for c in captions])  # (3, 77)
    assert ids[0, 8:].eq(text_encoder.tokenizer.eos_token_id).all()  # "a red bus": 1 + 7 + EOT
    with torch.no_grad():
        ref = text_encoder.model(input_ids=ids).last_hidden_state
    assert torch.allclose(feats, ref, atol=1e-6)
    # the null condition is the empty caption's features, the same in any batch
    assert torch.allclose(text_encoder.null_context()[0], feats[2], atol=1e-6)
    assert not torch.allclose(feats[0], feats[2], atol=1e-3)  # captions do condition


def test_long_captions_are_truncated_and_said_once(caplog):
    encoder = load_text_encoder(random=True)
    long = " ".join(["bus"] * 40)  # 120 tokens in the byte-level vocabulary
    with caplog.at_level(logging.WARNING, logger="encoders"):
        feats = encoder.encode([long, "a cat"])
        encoder.encode([long])
    said = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(said) == 1 and "122 tokens" in said[0].getMessage()
    ids = reference_ids(encoder.tokenizer, long)  # the first 75 caption tokens, then EOT
    with torch.no_grad():
        ref = encoder.model(input_ids=ids[None]).last_hidden_state[0]
    assert torch.allclose(feats[0], ref, atol=1e-6)


def test_tiny_random_text_encoder_is_loud_and_fixed(caplog):
    with caplog.at_level(logging.WARNING, logger="encoders"):
        a, b = load_text_encoder(random=True), load_text_encoder(name=TINY_RANDOM)
    assert "TINY RANDOMLY INITIALISED" in caplog.text and "NOT CLIP" in caplog.text
    assert a.name == TINY_RANDOM and not a.pretrained
    assert torch.equal(a.encode(["a red bus"]), b.encode(["a red bus"]))
    with pytest.raises(ValueError, match="list of caption strings"):
        a.encode("a red bus")


def test_text_encoder_from_a_local_folder(tmp_path, text_encoder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(path=str(tmp_path / "missing"))
    text_encoder.model.save_pretrained(tmp_path)
    with pytest.raises(OSError, match="lacks CLIP's tokenizer files"):
        load_text_encoder(path=str(tmp_path))
    text_encoder.tokenizer.save_pretrained(tmp_path)
    local = load_text_encoder(path=str(tmp_path))
    assert local.pretrained and local.name == "openai/clip-vit-large-patch14"
    assert torch.equal(local.encode(["a red bus"]), text_encoder.encode(["a red bus"]))
