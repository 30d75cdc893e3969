"""Packing whole documents into fixed-length rows.

A row of L tokens holds pieces of documents: a document longer than L is split into pieces of
at most L tokens (each piece then stands alone: its own segment, positions from 0); shorter ones
stay whole. Pieces are placed first-fit into a window of open rows, in the given order; a row
that cannot take the next piece while the window is full is closed. The result depends only on
the order and lengths given, so a source that orders documents by (seed, epoch) packs every run
and every resume identically.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Piece = tuple[int, int, int]   # (document, start within it, length)
OPEN_ROWS = 8


def pieces(doc: int, length: int, row_len: int) -> list[Piece]:
  """A document cut into pieces of at most row_len tokens."""
  return [(doc, s, min(row_len, length - s)) for s in range(0, length, row_len)]


def pack(order: Sequence[int], lengths: Sequence[int], row_len: int,
         open_rows: int = OPEN_ROWS) -> list[list[Piece]]:
  """Rows of pieces of the documents `order` (indices into lengths), first-fit."""
  rows: list[list[Piece]] = []
  open_: list[tuple[int, int]] = []          # (row index, free tokens)
  for doc in order:
    for piece in pieces(doc, int(lengths[doc]), row_len):
      n = piece[2]
      slot = next((i for i, (_, free) in enumerate(open_) if free >= n), None)
      if slot is None:
        if len(open_) == open_rows:
          open_.pop(0)                        # the oldest open row is closed as it is
        rows.append([])
        open_.append((len(rows) - 1, row_len))
        slot = len(open_) - 1
      row, free = open_[slot]
      rows[row].append(piece)
      open_[slot] = (row, free - n)
  return rows


def row_arrays(row: list[Piece], read, row_len: int) -> np.ndarray:
  """[3, row_len] int32: tokens, segment ids (1, 2, ... per piece; 0 = padding) and positions
  within each piece. read(doc, start, length) -> the piece's token ids."""
  out = np.zeros((3, row_len), np.int32)
  at = 0
  for segment, (doc, start, length) in enumerate(row, start=1):
    out[0, at:at + length] = read(doc, start, length)
    out[1, at:at + length] = segment
    out[2, at:at + length] = np.arange(length)
    at += length
  return out
