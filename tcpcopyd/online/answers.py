"""What two answers to one request have in common: their status (HTTP: the code of the
status line; other protocols: the first line), size and first bytes, after the noise rules
(``compare_ignore``: header names, or ``re:`` regular expressions) take out what differs
between any two answers (dates, ids)."""
from __future__ import annotations

import re
from dataclasses import dataclass

HTTP_STATUS = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")
HTTP_REQUEST = re.compile(rb"^([A-Z]{3,10}) (\S+) HTTP/\d")
FIRST_LINE_MAX = 60


@dataclass(frozen=True)
class Rules:
    """The noise rules of the comparison test: what differs between any two answers and is not
    compared."""
    headers: frozenset[bytes]          # lower-case header names whose lines are ignored
    patterns: tuple[re.Pattern, ...]   # bytes patterns whose matches are ignored

    @classmethod
    def parse(cls, items: list[str]) -> Rules:
        headers, patterns = set(), []
        for item in items:
            if item.startswith("re:"):
                patterns.append(re.compile(item[3:].encode()))
            else:
                headers.add(item.strip().lower().encode())
        return cls(frozenset(headers), tuple(patterns))

    def clean(self, answer: bytes) -> bytes:
        """``answer`` without the lines of the ignored headers and the ignored patterns."""
        if self.headers:
            lines = answer.split(b"\r\n")
            answer = b"\r\n".join(line for line in lines
                                  if line.split(b":", 1)[0].strip().lower() not in self.headers)
        for p in self.patterns:
            answer = p.sub(b"", answer)
        return answer


def check_rule(item: str) -> str:
    """A noise rule as the settings take it (ValueError if its expression is bad)."""
    if item.startswith("re:"):
        try:
            re.compile(item[3:])
        except re.error as e:
            raise ValueError(f"{item!r}: not a regular expression: {e}") from None
    elif not item.strip() or ":" in item or "\n" in item:
        raise ValueError(f"{item!r} is not a header name (or re:EXPRESSION)")
    return item


def first_line(data: bytes) -> str:
    line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0][:FIRST_LINE_MAX]
    return line.decode("utf-8", "backslashreplace")


def status_of(answer: bytes) -> str:
    """The status of an answer: an HTTP code ("200"), else its first line."""
    m = HTTP_STATUS.match(answer)
    return m.group(1).decode() if m else first_line(answer)


def path_of(request: bytes) -> str:
    """What a request asks for: an HTTP path (without the query), else its first word and
    the next (memcached "get key")."""
    m = HTTP_REQUEST.match(request)
    if m:
        return m.group(2).split(b"?", 1)[0].decode("utf-8", "backslashreplace")
    return " ".join(first_line(request).split()[:2])


def judge(online: bytes, target: bytes, online_size: int, target_size: int,
          rules: Rules) -> dict:
    return {"same_status": status_of(online) == status_of(target),
            "same_size": online_size == target_size,
            "same_content": rules.clean(online) == rules.clean(target)}


def as_bytes(text: str) -> bytes:
    """A prefix of the log (decoded with backslashreplace) back as bytes, as far as a
    comparison needs."""
    return text.encode("utf-8", "backslashreplace")
