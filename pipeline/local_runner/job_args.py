"""condor_submit's quoting rules for `arguments` and `environment`, so argv matches a pool's."""

from __future__ import annotations

from node_payload.common.errors import UserError


def _split_new_syntax(text: str, origin: str) -> list[str]:
    """Whitespace separates; '...' groups (with '' for a literal quote); "" is a literal "."""
    text = text.replace('""', '"')
    words: list[str] = []
    current: list[str] = []
    in_word = quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "'":
            if quoted and text[i + 1 : i + 2] == "'":
                current.append("'")
                i += 1
            else:
                quoted = not quoted
            in_word = True
        elif ch.isspace() and not quoted:
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(ch)
            in_word = True
        i += 1
    if quoted:
        raise UserError(f"{origin}: unbalanced single quote in {text!r}")
    if in_word:
        words.append("".join(current))
    return words


def _is_new_syntax(value: str) -> bool:
    return len(value) >= 2 and value.startswith('"') and value.endswith('"')


def parse_arguments(value: str, origin: str) -> list[str]:
    """New syntax when the value is double-quoted, else old syntax (spaces split, \\" is ")."""
    value = value.strip()
    if _is_new_syntax(value):
        return _split_new_syntax(value[1:-1], origin)
    return [word.replace('\\"', '"') for word in value.split()]


def parse_environment(value: str, origin: str) -> dict[str, str]:
    """New syntax ("A=1 B='x y'") or old syntax (A=1;B=2)."""
    value = value.strip()
    if _is_new_syntax(value):
        items = _split_new_syntax(value[1:-1], origin)
    else:
        items = [item for item in value.split(";") if item.strip()]
    env: dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{origin}: environment entry {item!r} is not NAME=value")
        env[key.strip()] = val
    return env
