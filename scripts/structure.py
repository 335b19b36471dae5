"""Structure figures of the quietstar package: python scripts/structure.py [ROOT]

Prints: import cycles among quietstar modules, imports that go up the layers (``ALLOWED``),
modules over 500 lines, functions over 80 lines, functions with more than 10 parameters, private
names (leading underscore) imported from another quietstar module (tests excluded), and the
modules of each folder of the package. ``make test`` (so CI) runs it first.
Exits 0 when there is no cycle, no import against the layers, no private cross-module import and
no function over 120 lines.
"""
import ast, sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]) / "quietstar"

# The folders are the layers: what each may import (besides itself). The method imports nothing
# from the model class, training, evaluation or the command line; training and evaluation are
# peers that do not import each other; the package's __init__ and __main__ may import anything.
ALLOWED = {
    "utils": set(),
    "method": {"utils"},
    "models": {"utils", "method"},
    "data": {"utils"},
    "training": {"utils", "method", "models", "data"},
    "evaluation": {"utils", "method", "models", "data"},
    "cli": {"utils", "method", "models", "data", "training", "evaluation"},
}
mods = {}
for f in root.rglob("*.py"):
    name = ".".join(f.relative_to(root.parent).with_suffix("").parts)
    if name.endswith(".__init__"):
        name = name[: -len(".__init__")]
    mods[name] = f

def resolve(mod, node):
    pkg = mod if mods[mod].name == "__init__.py" else mod.rsplit(".", 1)[0]
    if node.level:
        base = pkg.split(".")
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    return node.module or ""

def folder(mod):
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None

edges, private, long_funcs, big, wide, upward, lengths = {}, [], [], [], [], [], []
for mod, f in mods.items():
    src = f.read_text()
    lines = src.count("\n")
    if lines > 500:
        big.append((mod, lines))
    tree = ast.parse(src)
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(mod, node)
            if target.startswith("quietstar"):
                for a in node.names:
                    full = f"{target}.{a.name}"
                    dep = full if full in mods else target
                    if dep in mods and dep != mod:
                        deps.add(dep)
                    if a.name.startswith("_") and not a.name.startswith("__") and target != mod:
                        private.append(f"{mod} imports {target}.{a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods and a.name != mod:
                    deps.add(a.name)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            lengths.append((f"{mod}.{node.name}", n))
            if n > 80:
                long_funcs.append((f"{mod}.{node.name}", n))
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            params -= 1 if a.args and a.args[0].arg in ("self", "cls") else 0
            if params > 10:
                wide.append((f"{mod}.{node.name}", params))
    for dep in sorted(deps):
        here, there = folder(mod), folder(dep)
        if here is None:
            continue  # quietstar/__init__.py, __main__.py
        if there is None or (there != here and there not in ALLOWED.get(here, set())):
            upward.append(f"{mod} imports {dep} ({here} may import {sorted(ALLOWED.get(here, ())) or 'nothing'})")
    # the package __init__ re-exports: not a dependency edge for cycles
    edges[mod] = deps if mods[mod].name != "__init__.py" else set()

# cycles (strongly connected components of size > 1)
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in edges:
    if v not in index: strong(v)

for c in sccs: print("cycle:", " <-> ".join(c))
for u in upward: print("import against the layers:", u)
for p in private: print("private import:", p)
for m, n in sorted(big, key=lambda x: -x[1]): print(f"module over 500 lines: {m} ({n})")
for fn, n in sorted(long_funcs, key=lambda x: -x[1]): print(f"function over 80 lines: {fn} ({n})")
for fn, n in sorted(wide, key=lambda x: -x[1]): print(f"function with {n} parameters: {fn}")
folders = {}
for m, f in mods.items():
    folders.setdefault(str(f.parent.relative_to(root.parent)), []).append(m)
for d, ms in sorted(folders.items()): print(f"folder {d}: {len(ms)} modules")
longest = max(lengths, key=lambda x: x[1], default=("-", 0))
median = sorted(n for _, n in lengths)[len(lengths) // 2] if lengths else 0
print(f"longest function: {longest[0]} ({longest[1]} lines); median {median} lines")
worst = longest[1]
print(f"structure: {len(mods)} modules, {len(sccs)} import cycles, {len(upward)} imports against the layers, "
      f"{len(private)} private cross-module imports, "
      f"{len(big)} modules > 500 lines, {len(long_funcs)} functions > 80 lines, "
      f"{len(wide)} functions > 10 parameters")
sys.exit(0 if not sccs and not upward and not private and worst <= 120 else 1)
