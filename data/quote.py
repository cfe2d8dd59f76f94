"""Values from files, quoted in messages at a bounded length and a bounded cost.

An error names the bad value, and the value comes from a file someone else may have written:
a 200 MB string or a list that YAML aliases expand to billions of items must not become a
200 MB "one-line" error, nor take minutes to format. ``quote`` is ``repr`` with every string,
list and mapping cut short before it is formatted (``reprlib``), so its cost is set by the
limit, not by the value; ``cut`` shortens text that is shown as it is (a path, a name).
"""

import reprlib

LIMIT = 120  # characters of a quoted value

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxtuple = _repr.maxlist = _repr.maxarray = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 6
_repr.maxdict = 6
_repr.maxstring = 80
_repr.maxlong = 40
_repr.maxother = 60


def cut(text: str, limit: int = LIMIT) -> str:
    """``text`` itself when it is at most ``limit`` characters, else its two ends around '...'."""
    text = str(text) if not isinstance(text, str) else text
    if len(text) <= limit:
        return text
    head = (limit - 3) // 2
    return f"{text[:head]}...{text[len(text) - (limit - 3 - head):]}"


def quote(value, limit: int = LIMIT) -> str:
    """``repr(value)`` of at most ``limit`` characters, at a cost that does not grow with ``value``."""
    try:
        text = _repr.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__} too large to show>"
    text = " ".join(text.split()) if "\n" in text else text  # one line, whatever the value holds
    return text if len(text) <= limit else f"{text[:limit - 3]}..."
