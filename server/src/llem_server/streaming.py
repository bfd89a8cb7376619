"""Incremental detokenization of streamed token ids (in the front process).

Decoding token by token breaks multi-byte characters and merged tokens; this keeps a
short window of earlier tokens and emits only text that is complete, the way large
serving systems do: decode ``ids[prefix:]`` and ``ids[prefix:read]`` and send the
difference once it no longer ends in a replacement character.

Byte-fallback tokenizers (Llama 2, Mistral: ``<0xNN>`` tokens) decode a run of byte tokens
as a whole, and a run that is not valid UTF-8 turns *every* byte in it into U+FFFD, bytes
that decoded fine alone included. So text is not sent while the sequence ends in a byte
token: the run is decoded once it has ended, as the final text decodes it.
"""
from __future__ import annotations

import re

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self._is_byte: dict[int, bool] = {}

    def _byte_token(self, token_id: int) -> bool:
        hit = self._is_byte.get(token_id)
        if hit is None:
            piece = self.tokenizer.id_to_token(token_id) if hasattr(self.tokenizer, "id_to_token") else None
            hit = self._is_byte[token_id] = bool(piece and _BYTE_TOKEN.fullmatch(piece))
        return hit

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (may be empty)."""
        self.ids.extend(token_ids)
        if self.tokenizer is None or (self.ids and self._byte_token(self.ids[-1])):
            return ""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return out
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the sequence."""
        if self.tokenizer is None or self.read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]
