"""Corpora embedded for real: `tokenfuse embed` reads JSON Lines, CSV, Parquet or a folder of text
files, embeds it with a reduced encoder, and writes Parquet shards that a killed run resumes from;
on one process or as a Ray Data pipeline."""

from .job import Settings, embed_corpus
from .sources import Source

__all__ = ["Settings", "Source", "embed_corpus"]
