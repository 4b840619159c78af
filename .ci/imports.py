#!/usr/bin/env python3
"""Reads the `crate::` and `super::` paths in the code of src/ (comments left out) and prints
the module graph's cycles, file by file and folder by folder; exits 1 when there is a cycle.
`python3 .ci/imports.py [--graph]`."""
import glob
import re
import sys


def modpath(f):
    p = f[len("src/"):-3].split("/")
    if p[-1] in ("mod", "lib"):
        p = p[:-1]
    return "::".join(p)


def code(text):
    return "\n".join(l for l in text.split("\n") if not l.strip().startswith("//"))


def main():
    files = [f for f in glob.glob("src/**/*.rs", recursive=True)
             if not f.startswith("src/cli") and f != "src/main.rs" and f != "src/lib.rs"]
    mods = {modpath(f): f for f in files}
    edges = {}
    for f in files:
        m = modpath(f)
        s = code(open(f).read())
        parent = m.split("::")[:-1]
        deps = set()
        for prefix, base in (("crate::", []), ("super::", parent)):
            for path in re.findall(re.escape(prefix) + r"([a-z_:]+)", s):
                parts = [p for p in path.split("::") if p]
                best = "::".join(base) or None
                for i in range(len(parts), 0, -1):
                    cand = "::".join(base + parts[:i])
                    if cand in mods:
                        best = cand
                        break
                if best and best != m and best in mods:
                    deps.add(best)
        edges[m] = deps

    def sccs(graph):
        index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

        def visit(v):
            index[v] = low[v] = n[0]
            n[0] += 1
            stack.append(v)
            on.add(v)
            for w in graph.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

        for v in list(graph):
            if v not in index:
                visit(v)
        return out

    folders = {}
    for a, ds in edges.items():
        for d in ds:
            fa, fd = a.split("::")[0], d.split("::")[0]
            if fa != fd:
                folders.setdefault(fa, set()).add(fd)
    if "--graph" in sys.argv:
        for k in sorted(folders):
            print(f"{k} -> {', '.join(sorted(folders[k]))}")
    file_cycles, folder_cycles = sccs(edges), sccs(folders)
    print(f"file-level cycles: {file_cycles or 'none'}")
    print(f"folder-level cycles: {folder_cycles or 'none'}")
    sys.exit(1 if file_cycles or folder_cycles else 0)


main()
