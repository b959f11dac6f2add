"""Bounds on JSON text checked from its bytes before any parser runs (pure Python: the
REST API's /predict JSON body and the inference protocol's codec both use it)."""

from __future__ import annotations


class JsonOutOfBounds(ValueError):
    """JSON text that would cost more to parse than any valid request of its kind."""


# JSON bytes -> classes: digits "0"; what starts a value (comma, bracket, brace) "v"; what can
# come right before an integer outside a string (colon, minus, white space) "w"; the rest "."
_JSON_CLASSES = bytearray(b"." * 256)
for _c in b"0123456789":
    _JSON_CLASSES[_c] = ord("0")
for _c in b",[{":
    _JSON_CLASSES[_c] = ord("v")
for _c in b": \t\r\n-":
    _JSON_CLASSES[_c] = ord("w")
_JSON_CLASSES = bytes(_JSON_CLASSES)


class JsonBounds:
    """Bounds on JSON text, checked from its bytes before it is parsed, a piece at a time
    (`feed` raises JsonOutOfBounds at the first piece past a bound):

    - at most `max_values` values, each a Python object once parsed: every value after the
      first in an array or object follows a comma, and every array or object opens with a
      bracket, so counting those bounds them (the ones inside strings only raise the count);
    - no integer of more than MAX_INT_DIGITS digits: the parser makes a big integer of a long
      one at a cost that grows faster than its length. A run of digits right after a comma,
      bracket, colon, minus or white space is an integer outside any string: base64 text
      never holds those characters.
    """

    MAX_INT_DIGITS = 20
    STEP = 256 * 1024

    def __init__(self, max_values: int):
        self.max_values, self.values = max_values, 0
        self._tail = b"w"  # the text so far, classified: its last characters (the start is a boundary)
        self._long = (b"v" + b"0" * (self.MAX_INT_DIGITS + 1), b"w" + b"0" * (self.MAX_INT_DIGITS + 1))

    def feed(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        end = len(data) if end is None else end
        for i in range(start, end, self.STEP):
            text = data[i:min(i + self.STEP, end)].translate(_JSON_CLASSES)
            self.values += text.count(b"v")
            if self.values > self.max_values:
                raise JsonOutOfBounds(f"the JSON holds more than {self.max_values} values (commas and brackets "
                                      f"counted before parsing)")
            edge = self._tail + text[:self.MAX_INT_DIGITS + 2]
            if any(p in edge or p in text for p in self._long):
                raise JsonOutOfBounds(f"the JSON holds an integer of more than {self.MAX_INT_DIGITS} digits")
            self._tail = (self._tail + text[-(self.MAX_INT_DIGITS + 1):])[-(self.MAX_INT_DIGITS + 1):]
