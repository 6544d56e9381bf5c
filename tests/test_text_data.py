"""Text datasets: text8 normalisation, tokenizers, deterministic splits, and the real loaders (text8,
LM1B, OpenWebText) on small local files in their on-disk formats."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from dblocks.data.text import EOS_BYTE_ID, TEXT_SPLITS, decode, encode, load_text_dataset, normalise_text8


def test_text8_normalisation_and_char27_round_trip():
    assert normalise_text8("To be, or NOT to be:\n  that's 42!") == "to be or not to be that s"
    ids = encode("Hello, World", "char27")
    assert ids.tolist() == [7, 4, 11, 11, 14, 26, 22, 14, 17, 11, 3]
    assert decode(ids, "char27") == "hello world"
    assert int(ids.max()) < 27


def test_bytes_tokenizer_round_trip():
    ids = encode("naïve café", "bytes")
    assert int(ids.max()) < 256
    assert decode(torch.cat([ids, torch.tensor([EOS_BYTE_ID])]), "bytes") == "naïve café"


def test_shakespeare_splits_are_deterministic_disjoint_and_text8_like():
    splits = {s: load_text_dataset("shakespeare", s, 64) for s in TEXT_SPLITS}
    again = load_text_dataset("shakespeare", "validation", 64)
    assert torch.equal(again.tokens, splits["validation"].tokens)
    sizes = {s: len(d) for s, d in splits.items()}
    assert sizes["train"] > 15 * sizes["validation"] and sizes["validation"] > 1000
    text = splits["train"].decode(splits["train"].tokens[100])
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz ") and "  " not in text
    # real English: the most frequent character is the space, then 'e'
    counts = torch.bincount(splits["train"].tokens.reshape(-1), minlength=27)
    assert counts.argmax() == 26 and counts[:26].argmax() == ord("e") - ord("a")
    # the splits are contiguous slices of one stream: the first validation window is not in train
    assert not (splits["train"].tokens == splits["validation"].tokens[0]).all(1).any()


def test_text8_loader_reads_the_original_file_and_its_zip(tmp_path):
    stream = ("anarchism originated as a term of abuse " * 500).strip()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "text8").write_text(" " + stream)  # text8 starts with a space
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
        z.writestr("text8", " " + stream)
    plain = {s: load_text_dataset("text8", s, 32, root=tmp_path / "plain") for s in TEXT_SPLITS}
    zipped = load_text_dataset("text8", "test", 32, root=tmp_path)
    assert torch.equal(plain["test"].tokens, zipped.tokens)
    n = len(stream)
    assert len(plain["train"]) == int(0.9 * n) // 32 and len(plain["test"]) == (n - int(0.95 * n)) // 32
    assert plain["train"].decode(plain["train"].tokens[0]).startswith("anarchism originated")
    with pytest.raises(FileNotFoundError, match="text8.zip"):
        load_text_dataset("text8", "train", 32, root=tmp_path / "missing")


def test_lm1b_and_openwebtext_loaders_read_local_files(tmp_path):
    lm1b = tmp_path / "lm1b"
    lm1b.mkdir()
    sentences = [f"Sentence number {i} of the billion word benchmark ." for i in range(200)]
    (lm1b / "train.txt").write_text("\n".join(sentences[:180]) + "\n")
    (lm1b / "test.txt").write_text("\n".join(sentences[180:]) + "\n")
    train = load_text_dataset("lm1b", "train", 64, "bytes", root=lm1b)
    val = load_text_dataset("lm1b", "validation", 64, "bytes", root=lm1b)
    test = load_text_dataset("lm1b", "test", 64, "bytes", root=lm1b)
    assert train.vocab_size == 257 and (train.tokens == EOS_BYTE_ID).any()  # documents end with EOS
    assert "Sentence number 0 of" in train.decode(train.tokens[0])
    assert "Sentence number 18" in test.decode(test.tokens[0])
    assert len(val) >= 1 and len(train) > 20 * len(val)

    owt = tmp_path / "owt"
    owt.mkdir()
    with open(owt / "shard-000.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Web page {i}: some open web text for the loader test."}) + "\n")
    splits = {s: load_text_dataset("openwebtext", s, 64, "bytes", root=owt) for s in TEXT_SPLITS}
    assert all(len(d) > 0 for d in splits.values())
    assert "Web page 0:" in splits["train"].decode(splits["train"].tokens[0])


def test_bad_names_fail_with_the_allowed_values():
    with pytest.raises(ValueError, match="allowed: shakespeare, text8, lm1b, openwebtext"):
        load_text_dataset("wikitext", "train", 8)
    with pytest.raises(ValueError, match="allowed: train, validation, test"):
        load_text_dataset("shakespeare", "dev", 8)


def test_prepared_text_holds_both_tokenizations_and_windows_them_like_the_source(tmp_path):
    from dblocks.cli import main
    from dblocks.data import load_prepared_text

    assert main(["prepare", "--dataset", "shakespeare", "--out", str(tmp_path)]) == 0
    for tokenizer, seq_len in (("char27", 64), ("bytes", 48)):
        prepared = load_prepared_text(tmp_path, "test", seq_len, tokenizer, expected_name="shakespeare")
        assert torch.equal(prepared.tokens[:], load_text_dataset("shakespeare", "test", seq_len, tokenizer).tokens)
    with pytest.raises(ValueError, match="holds dataset 'shakespeare', the config asks for 'text8'"):
        load_prepared_text(tmp_path, "train", 8, "char27", expected_name="text8")
