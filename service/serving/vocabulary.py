"""Class names of a served model: the trained classes, then those taught by feedback.

Label text from users is normalised before use: Unicode NFC, surrounding white space
trimmed; names that differ only in case are one class ("hat", "Hat" and "HAT" are the
class first taught, spelled as it was first taught). An index ("3") names a known class.
"""

from __future__ import annotations

import re
import threading
import unicodedata

MAX_CLASS_NAME = 64


class LabelError(ValueError):
    """A feedback label that cannot be used: nothing is changed."""


def normalise_label(label: str) -> str:
    """NFC, trimmed, checked; raises LabelError naming the problem."""
    text = unicodedata.normalize("NFC", label).strip()
    if not text:
        raise LabelError("label is empty")
    if len(text) > MAX_CLASS_NAME:
        raise LabelError(f"label is longer than {MAX_CLASS_NAME} characters")
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise LabelError("label contains control or unprintable characters")
    return text


class ClassVocabulary:
    """Its own lock (held for microseconds), so that a label is checked on the event loop
    without waiting for the memory lock."""

    def __init__(self, trained: list[str], capacity: int):
        self.trained = len(trained)  # the head's classes: indices [0, trained)
        self.capacity = capacity  # the memory's label space
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._lock = threading.Lock()
        for name in trained:
            self.add(name)

    def __len__(self) -> int:
        return len(self.names)

    def add(self, name: str) -> int:
        with self._lock:
            return self._add(name)

    def _add(self, name: str) -> int:
        key = name.casefold()
        if key in self._index:
            return self._index[key]
        if len(self.names) >= self.capacity:
            raise LabelError(f"unknown label {name!r} and no room for a new class (label space "
                             f"{self.capacity} is full); known: {self.names}")
        self.names.append(name)
        self._index[key] = len(self.names) - 1
        return len(self.names) - 1

    def lookup(self, label: str) -> tuple[int | None, str]:
        """(index, name) of a label: index None for a new, well-formed name."""
        text = normalise_label(label)
        with self._lock:
            return self._lookup(text)

    def _lookup(self, text: str) -> tuple[int | None, str]:
        i = self._index.get(text.casefold())
        if i is not None:
            return i, self.names[i]
        if re.fullmatch(r"-?[0-9]+", text):  # str.isdigit() also accepts "³" and other digits int() refuses
            i = int(text)
            if not 0 <= i < len(self.names):
                raise LabelError(f"label index {i} is out of range [0, {len(self.names)})")
            return i, self.names[i]
        if len(self.names) >= self.capacity:
            raise LabelError(f"unknown label {text!r} and no room for a new class (label space "
                             f"{self.capacity} is full); known: {self.names}")
        return None, text

    def name(self, index: int) -> str:
        return self.names[index] if 0 <= index < len(self.names) else str(index)

    def reset(self, names: list[str]) -> None:
        with self._lock:
            self.names, self._index = [], {}
            for n in names:
                self._add(n)
