"""Incremental detokenization of streamed token ids (in the front process).

Decoding token by token breaks multi-byte characters and merged tokens; this keeps a
short window of earlier tokens and emits only text that is complete, the way large
serving systems do: decode ``ids[prefix:]`` and ``ids[prefix:read]`` and send the
difference once it no longer ends in a replacement character.
"""
from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (may be empty)."""
        self.ids.extend(token_ids)
        if self.tokenizer is None:
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
