"""The model's own pipeline: on the packaged all-MiniLM-L6-v2 (Transformer, mean Pooling, Normalize),
`tokenfuse.embed` and `tokenfuse embed --method full` return what `SentenceTransformer.encode` returns,
unit vectors; the switch gives the pooled vectors unnormalised, and a job folder written one way is
never continued the other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenfuse
from tokenfuse import cli
from tokenfuse.assets import text as data

pytestmark = pytest.mark.integration  # the packaged all-MiniLM-L6-v2 and BBC News
st = pytest.importorskip("sentence_transformers", reason="pip install 'tokenfuse[st]'")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def paragraphs() -> list[dict[str, str]]:
    """BBC News paragraphs of every length (a few tokens to a few hundred), none past MiniLM's 256."""
    return data.bbc_paragraphs(5)


@pytest.fixture(scope="module")
def reference(paragraphs) -> tuple[torch.Tensor, torch.Tensor]:
    """encode's vectors, normalised, and the same pipeline without its Normalize: the pooled ones."""
    model = st.SentenceTransformer(str(data.minilm_path()), device="cpu", local_files_only=True)
    texts = [p["text"] for p in paragraphs]
    unit = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True)
    pooled = st.SentenceTransformer(modules=[model[0], model[1]], device="cpu").encode(
        texts, convert_to_tensor=True
    )
    return unit, pooled


def test_embed_equals_encode_and_the_switch_gives_the_pooled_vectors(minilm, paragraphs, reference):
    model, tokenizer = minilm
    tokenfuse.remove(model)
    unit, pooled = reference
    texts = [p["text"] for p in paragraphs]
    assert len(texts) > 20 and not torch.allclose(pooled.norm(dim=-1), torch.ones(len(texts)), atol=0.5)
    torch.testing.assert_close(tokenfuse.embed(model, tokenizer, texts), unit, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        tokenfuse.embed(model, tokenizer, texts, normalize=False), pooled, rtol=1e-6, atol=1e-6
    )


def embed_cli(corpus: Path, out: Path, *options: str) -> int:
    argv = ["embed", str(corpus), "-o", str(out), "--id-field", "id", "--method", "full", "--no-progress"]
    return cli.main([*argv, "--shard-size", "10", *options])


def read(folder: Path) -> tuple[list[str], torch.Tensor, dict]:
    table = pq.read_table(folder)
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    meta = json.loads(pq.ParquetFile(folder / "part-00000.parquet").schema_arrow.metadata[b"tokenfuse"])
    return table["id"].to_pylist(), torch.from_numpy(vectors), meta


def test_the_command_writes_encodes_vectors_and_refuses_to_resume_with_the_switch_flipped(
    tmp_path, paragraphs, reference, capsys
):
    corpus = tmp_path / "bbc.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in paragraphs))
    unit, pooled = reference
    assert embed_cli(corpus, tmp_path / "own") == 0
    ids, vectors, meta = read(tmp_path / "own")
    assert ids == [p["id"] for p in paragraphs]
    torch.testing.assert_close(vectors, unit, rtol=0, atol=1e-6)
    assert (meta["pooling"], meta["normalize"]) == ("mean", True)

    assert embed_cli(corpus, tmp_path / "raw", "--no-normalize") == 0
    _, vectors, meta = read(tmp_path / "raw")
    torch.testing.assert_close(vectors, pooled, rtol=1e-6, atol=1e-6)
    assert meta["normalize"] is False

    (tmp_path / "own" / "part-00001.parquet").unlink()  # a shard left to write: the rerun would resume
    capsys.readouterr()
    assert embed_cli(corpus, tmp_path / "own", "--no-normalize") == 2
    assert "holds another job (normalize=True there, False here)" in capsys.readouterr().err
    assert not (tmp_path / "own" / "part-00001.parquet").exists()
