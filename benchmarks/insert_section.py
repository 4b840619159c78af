#!/usr/bin/env python3
"""insert_section.py FILE.md: puts the Markdown section in FILE.md into BENCHMARKS.md, replacing
the section with the same heading (the heading names the CPU: one section per kind of
machine), else before "## Across processes (MPI)", else at the end."""

import re
import sys

text = open("BENCHMARKS.md").read()
section = open(sys.argv[1]).read().rstrip("\n") + "\n"
head = section.split("\n", 1)[0]
if head + "\n" in text:
    text = re.sub(re.escape(head) + r"\n.*?(?=\n## |\Z)", section.replace("\\", "\\\\"), text, count=1, flags=re.S)
elif "\n## Across processes (MPI)" in text:
    text = text.replace("\n## Across processes (MPI)", "\n" + section + "\n## Across processes (MPI)", 1)
else:
    text = text.rstrip("\n") + "\n\n" + section
open("BENCHMARKS.md", "w").write(text)
