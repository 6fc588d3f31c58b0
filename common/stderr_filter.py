"""Copy standard input to standard output as it comes, without the lines a pattern matches.

Run as its own process by :func:`common.runtime.quiet_tensorflow` while TensorFlow is
imported (``python -I -S stderr_filter.py PATTERN START...``; the standard library only):
output is passed on at once (a progress spinner keeps turning), and what a parent that
aborts wrote last (e.g. a CPU TensorFlow cannot run on) is still written, since this
process reads until the parent's end of the pipe closes. It runs in a process group of
its own: a signal to the parent's group (Ctrl-C, ``timeout``, systemd) is the parent's.

A line is held back only while it may still become one the pattern matches: while its
start is a prefix of one of the STARTs, or begins with one, until its newline (a ``0``
in a START stands for any digit).
"""

from __future__ import annotations

import os
import re
import sys


def _write(data: bytes) -> None:
    while data:
        try:
            data = data[os.write(1, data):]
        except OSError:  # the reader went away: drain the input so the writer never blocks
            return


def run(pattern: str, starts: list[bytes]) -> None:
    noise = re.compile(pattern.encode())
    held, passing = b"", False  # passing: this line's start was written already

    def agrees(part: bytes, start: bytes) -> bool:  # over the shorter of the two
        return all(c == s or (s == ord("0") and ord("0") <= c <= ord("9"))
                   for c, s in zip(part, start, strict=False))

    def may_be_noise(part: bytes) -> bool:
        return any(agrees(part, start) for start in starts)

    while chunk := os.read(0, 65536):
        data, out = held + chunk, []
        while (end := data.find(b"\n")) >= 0:
            line, data = data[:end + 1], data[end + 1:]
            if passing or not noise.search(line):
                out.append(line)
            passing = False
        if data and (passing or not may_be_noise(data)):
            out.append(data)
            data, passing = b"", True
        held = data
        _write(b"".join(out))
    if held and not noise.search(held):
        _write(held)


if __name__ == "__main__":
    run(sys.argv[1], [s.encode() for s in sys.argv[2:]])
