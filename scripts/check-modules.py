#!/usr/bin/env python3
"""Keeps the house: sizes of files and functions, and import loops between modules.

Reports the lines under each crate's src, the ten largest .rs files under crates/*/src
and the ten longest non-test functions (lines from the `fn` line to the closing brace;
`#[cfg(test)]` and `#[test]` items, modules declared `#[cfg(test)] mod x;` and files
under a `tests/` folder inside src are test code), then FAILS on an import loop among the top-level modules of
crates/driver/src and crates/cli/src. A top-level module is a file `src/x.rs` or a folder
`src/x/` with everything in it; the crate root (lib.rs, main.rs) is none. Module A
depends on B when a file of A names `crate::B` (in `use`, grouped `use crate::{B, C::d}`
or a path in code) or reaches the root with `super` (`super::B` in src/a.rs or
src/a/mod.rs, `super::super::B` in src/a/b.rs, one more per level and inline `mod`).
crates/test-support is test code: it is neither reported nor limited. Also FAILS when
the CLI tests' index (crates/cli/tests/README.md) has no row for a test file or folder.

  python3 scripts/check-modules.py            report, fail on an import loop
  python3 scripts/check-modules.py --limits   also fail on a file over 600 lines, a
                                              non-test function over 120 lines, a CLI
                                              over 2,500 lines or its simulate files
                                              over 300, or a learning-policy name in it
  python3 scripts/check-modules.py --self-test

Python 3 standard library only.
"""

import signal
import sys
from pathlib import Path

FILE_LIMIT = 600
FN_LIMIT = 120
LOOP_CRATES = ("driver", "cli")
EXEMPT_CRATES = ("test-support",)
SHOWN = 10
TEST_INDEX = "crates/cli/tests/README.md"
# The binary stays thin: flags, settings and printing; the work lives in the libraries.
CLI_LIMIT = 2500
# `offload simulate` in the CLI handles arguments and printing only.
SIMULATE_LIMIT = 300
# The learning policy lives below the CLI (crates/learn, crates/sim); its names have no
# business in the binary, not even in comments.
LEARNING_NAMES = ("SLOWER_UNDER_WAY", "refit_interval")

# --- tokenizer -----------------------------------------------------------------------


def tokenize(src):
    """Rust tokens as (kind, text, line): kind is "id", "punct", "lit" or "life".

    Comments (line, block, nested block) are dropped; strings (plain, byte, raw with any
    number of `#`), chars and byte chars become one "lit" token each, so braces inside
    them never count; a lifetime or label (`'a`) is one "life" token.
    """
    tokens = []
    i, n, line = 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif src.startswith("//", i):
            end = src.find("\n", i)
            i = n if end < 0 else end
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
        elif c in "rb" and _raw_string_start(src, i):
            j = i + (2 if c == "b" else 1)
            hashes = 0
            while src[j] == "#":
                hashes, j = hashes + 1, j + 1
            close = '"' + "#" * hashes
            end = src.find(close, j + 1)
            end = n if end < 0 else end + len(close)
            tokens.append(("lit", src[i:end], line))
            line += src.count("\n", i, end)
            i = end
        elif c == '"' or (c == "b" and src.startswith('b"', i)):
            start = i
            i += 1 if c == '"' else 2
            while i < n and src[i] != '"':
                i += 2 if src[i] == "\\" else 1
            i += 1
            tokens.append(("lit", src[start:i], line))
            line += src.count("\n", start, i)
        elif c == "'" or (c == "b" and src.startswith("b'", i)):
            start = i
            q = i if c == "'" else i + 1
            if q + 1 < n and src[q + 1] == "\\":
                end = src.find("'", q + 3)
                i = n if end < 0 else end + 1
                tokens.append(("lit", src[start:i], line))
            elif q + 2 < n and src[q + 2] == "'":
                i = q + 3
                tokens.append(("lit", src[start:i], line))
            else:
                j = q + 1
                while j < n and (src[j].isalnum() or src[j] == "_"):
                    j += 1
                tokens.append(("life", src[start:j], line))
                i = j
        elif c.isalpha() or c == "_":
            j = i
            if src.startswith("r#", i) and i + 2 < n and (src[i + 2].isalpha() or src[i + 2] == "_"):
                j = i + 2
            while j < n and (src[j].isalnum() or src[j] == "_"):
                j += 1
            tokens.append(("id", src[i:j].removeprefix("r#"), line))
            i = j
        elif c.isdigit():
            j = i
            while j < n and (src[j].isalnum() or src[j] == "_" or (src[j] == "." and j + 1 < n and src[j + 1].isdigit())):
                j += 1
            tokens.append(("lit", src[i:j], line))
            i = j
        elif src.startswith("::", i):
            tokens.append(("punct", "::", line))
            i += 2
        else:
            tokens.append(("punct", c, line))
            i += 1
    return tokens


def _raw_string_start(src, i):
    """Whether a raw (byte) string starts at i: r", r#", br", br#"."""
    j = i + 1 if src[i] == "r" else i + 2
    if src[i] == "b" and not src.startswith("br", i):
        return False
    if i > 0 and (src[i - 1].isalnum() or src[i - 1] == "_"):
        return False
    while j < len(src) and src[j] == "#":
        j += 1
    return j < len(src) and src[j] == '"'


def matching(tokens, k):
    """Index of the brace closing the one at k (or the last token)."""
    depth = 0
    for j in range(k, len(tokens)):
        t = tokens[j][1] if tokens[j][0] == "punct" else None
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(tokens) - 1


# --- functions and test code ---------------------------------------------------------


def attribute_end(tokens, k):
    """Index just past the attribute `#[…]` or `#![…]` starting at k."""
    j = k + 1
    if j < len(tokens) and tokens[j][1] == "!":
        j += 1
    depth = 0
    while j < len(tokens):
        t = tokens[j][1] if tokens[j][0] == "punct" else None
        if t == "[":
            depth += 1
        elif t == "]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return j


def is_test_attribute(body):
    """Whether the attribute's tokens (between the brackets) mark test code."""
    words = [t[1] for t in body]
    if words in (["test"], ["cfg", "(", "test", ")"]):
        return True
    return len(words) >= 3 and words[-1] == "test" and words[-2] == "::"


def item_extent(tokens, k):
    """(last index, braced) of the item starting at k: its closing brace when it has a
    brace body, else the `;` ending it (or the `,`/`}` ending a field or variant)."""
    depth = 0
    block = False  # an item that can only end with a body or `;`
    j = k
    while j < len(tokens):
        kind, t, _ = tokens[j]
        if kind == "id" and t in ("fn", "impl", "mod", "trait", "struct", "enum", "union"):
            block = True
        elif kind == "punct":
            if t == "-" and j + 1 < len(tokens) and tokens[j + 1][1] == ">":
                j += 1
            elif t in ("(", "[", "<"):
                depth += 1
            elif t in (")", "]", ">"):
                depth -= 1
            elif depth == 0 and t == "{":
                return matching(tokens, j), True
            elif depth == 0 and (t == ";" or (not block and t in (",", "}"))):
                return j, False
        j += 1
    return len(tokens) - 1, False


def scan(src):
    """(functions, test_modules, whole_file_is_test) of one file's source.

    functions: (name, first line, last line, is_test) for each `fn` with a body.
    test_modules: names declared `#[cfg(test)] mod NAME;` (their files are test code).
    """
    tokens = tokenize(src)
    test_spans = []  # (first token, last token) of test items
    test_modules = []
    whole_file = False
    k = 0
    while k < len(tokens):
        if tokens[k][1] == "#" and k + 1 < len(tokens) and tokens[k + 1][1] in "[!":
            inner = tokens[k + 1][1] == "!"
            end = attribute_end(tokens, k)
            body = tokens[k + (3 if inner else 2) : end - 1]
            if is_test_attribute(body):
                if inner:
                    whole_file = True
                else:
                    j = end
                    while j < len(tokens) and tokens[j][1] == "#":
                        j = attribute_end(tokens, j)
                    last, braced = item_extent(tokens, j)
                    test_spans.append((k, last))
                    words = [t[1] for t in tokens[j : last + 1]]
                    if not braced and "mod" in words:
                        test_modules.append(words[words.index("mod") + 1])
            k = end
        else:
            k += 1
    functions = []
    for k, (kind, t, line) in enumerate(tokens):
        if kind != "id" or t != "fn" or k + 1 >= len(tokens) or tokens[k + 1][0] != "id":
            continue
        last, braced = item_extent(tokens, k)
        if not braced:
            continue
        in_test = whole_file or any(a <= k <= b for a, b in test_spans)
        functions.append((tokens[k + 1][1], line, tokens[last][2], in_test))
    return functions, test_modules, whole_file


# --- module dependencies -------------------------------------------------------------


def module_of(rel):
    """(top-level module, depth) of a file by its path relative to src, or None for the
    crate root. Depth is the number of `super` that reach the root."""
    parts = list(Path(rel).parts)
    if len(parts) == 1 and parts[0] in ("lib.rs", "main.rs"):
        return None
    if parts[-1] == "mod.rs":
        parts.pop()
    else:
        parts[-1] = parts[-1].removesuffix(".rs")
    return parts[0], len(parts)


def references(src, depth):
    """(name, line) of every top-level module the source names from the crate root:
    `crate::NAME`, `crate::{NAME, …}`, and `super::…::NAME` with `depth` supers (one more
    inside each inline `mod`)."""
    tokens = tokenize(src)
    found = []
    braces = []  # for each open brace: whether it opened an inline `mod`
    k = 0
    while k < len(tokens):
        kind, t, line = tokens[k]
        if kind == "punct" and t == "{":
            braces.append(k >= 2 and tokens[k - 2][1] == "mod" and tokens[k - 1][0] == "id")
        elif kind == "punct" and t == "}":
            if braces:
                braces.pop()
        elif kind == "id" and t in ("crate", "super") and (k == 0 or tokens[k - 1][1] != "::"):
            j = k
            if t == "super":
                supers = 0
                while j < len(tokens) and tokens[j][1] == "super":
                    supers += 1
                    if j + 1 < len(tokens) and tokens[j + 1][1] == "::":
                        j += 2
                    else:
                        break
                if supers != depth + sum(braces) or tokens[j - 1][1] != "::":
                    k = max(j, k + 1)
                    continue
            else:
                if j + 1 >= len(tokens) or tokens[j + 1][1] != "::":
                    k += 1
                    continue
                j += 2
            if j < len(tokens) and tokens[j][0] == "id":
                found.append((tokens[j][1], tokens[j][2]))
            elif j < len(tokens) and tokens[j][1] == "{":
                found.extend(group_heads(tokens, j))
            k = j
            continue
        k += 1
    return found


def group_heads(tokens, k):
    """(name, line) of the first segment of each path in the use group at k (`{`)."""
    heads = []
    depth = 0
    expect = False
    for j in range(k, len(tokens)):
        kind, t, line = tokens[j]
        if kind == "punct" and t == "{":
            depth += 1
            expect = depth == 1
        elif kind == "punct" and t == "}":
            depth -= 1
            if depth == 0:
                break
        elif kind == "punct" and t == "," and depth == 1:
            expect = True
        elif expect and kind == "id":
            if t != "self":
                heads.append((t, line))
            expect = False
        else:
            expect = False
    return heads


def crate_edges(src_dir, files=None):
    """{(a, b): "file:line"} of dependencies between the crate's top-level modules."""
    src_dir = Path(src_dir)
    if files is None:
        files = {p: p.read_text() for p in sorted(src_dir.rglob("*.rs"))}
    modules = set()
    for p in files:
        m = module_of(p.relative_to(src_dir))
        if m:
            modules.add(m[0])
    edges = {}
    for p, text in files.items():
        rel = p.relative_to(src_dir)
        m = module_of(rel)
        if not m:
            continue
        for name, line in references(text, m[1]):
            if name in modules and name != m[0]:
                edges.setdefault((m[0], name), f"{p}:{line}")
    return edges


def loops(edges):
    """Every elementary cycle of the graph, each once, starting at its least module."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ()), reverse=True):
                if nxt == start:
                    found.append(path + [start])
                elif nxt > start and nxt not in path:
                    stack.append((nxt, path + [nxt]))
    found.sort(key=lambda c: (len(c), c))
    return found


# --- the report ----------------------------------------------------------------------


def test_files(src_dir, scanned):
    """Files of the crate that are test code: under a `tests` folder, declared by
    `#[cfg(test)] mod x;`, or marked `#![cfg(test)]`."""
    tests = set()
    for p, (_, mods, whole) in scanned.items():
        rel = p.relative_to(src_dir)
        if "tests" in rel.parts[:-1] or whole:
            tests.add(p)
        base = p.parent if p.name in ("mod.rs", "lib.rs", "main.rs") else p.with_suffix("")
        for m in mods:
            tests.update(x for x in (base / f"{m}.rs", base / m / "mod.rs") if x.exists())
            if (base / m).is_dir():
                tests.update((base / m).rglob("*.rs"))
    return tests


def unindexed_tests(root):
    """Test binaries of the CLI (`tests/x.rs`, `tests/x/main.rs`) its index leaves out."""
    tests = root / Path(TEST_INDEX).parent
    index = (root / TEST_INDEX).read_text()
    names = [p.name for p in tests.glob("*.rs")]
    names += [p.parent.name + "/" for p in tests.glob("*/main.rs")]
    return [n for n in sorted(names) if f"| `{n}` |" not in index]


def check(root, limits):
    root = Path(root)
    sizes, functions = [], []
    for crate in sorted((root / "crates").iterdir()):
        src_dir = crate / "src"
        if not src_dir.is_dir() or crate.name in EXEMPT_CRATES:
            continue
        scanned = {}
        for p in sorted(src_dir.rglob("*.rs")):
            text = p.read_text()
            sizes.append((text.count("\n"), str(p.relative_to(root))))
            scanned[p] = scan(text)
        tests = test_files(src_dir, scanned)
        for p, (fns, _, _) in scanned.items():
            if p in tests:
                continue
            for name, first, last, in_test in fns:
                if not in_test:
                    functions.append((last - first + 1, f"{p.relative_to(root)}:{first}", name))
    totals = {}
    for n, path in sizes:
        crate = Path(path).parts[1]
        totals[crate] = totals.get(crate, 0) + n
    sizes.sort(key=lambda s: (-s[0], s[1]))
    functions.sort(key=lambda f: (-f[0], f[1]))
    print("lines under src: " + ", ".join(f"{c} {n}" for c, n in sorted(totals.items())))
    print(f"largest files under crates/*/src (lines; limit {FILE_LIMIT}):")
    for n, path in sizes[:SHOWN]:
        print(f"  {n:5}  {path}")
    print(f"longest non-test functions (lines; limit {FN_LIMIT}):")
    for n, where, name in functions[:SHOWN]:
        print(f"  {n:5}  {where}  {name}")
    failed = False
    for crate in LOOP_CRATES:
        src_dir = root / "crates" / crate / "src"
        edges = crate_edges(src_dir)
        cycles = loops(edges)
        if not cycles:
            print(f"import loops among the top-level modules of crates/{crate}: none")
            continue
        failed = True
        print(f"import loops among the top-level modules of crates/{crate}: {len(cycles)}")
        for cycle in cycles:
            print("  " + " -> ".join(cycle))
            for a, b in zip(cycle, cycle[1:]):
                where = edges[(a, b)].removeprefix(f"{root}/")
                print(f"      {a} -> {b}: {where}")
    unlisted = unindexed_tests(root)
    for name in unlisted:
        print(f"error: {TEST_INDEX} does not say what {name} tests")
    failed = failed or bool(unlisted)
    if limits:
        over = [s for s in sizes if s[0] > FILE_LIMIT]
        long = [f for f in functions if f[0] > FN_LIMIT]
        for n, path in over:
            print(f"error: {path} has {n} lines, over the limit of {FILE_LIMIT}")
        for n, where, name in long:
            print(f"error: fn {name} at {where} has {n} lines, over the limit of {FN_LIMIT}")
        failed = failed or bool(over or long)
        failed = not cli_is_thin(root, totals) or failed
    return not failed


def cli_is_thin(root, totals):
    """The CLI's own budget: its lines, its simulate files', no learning-policy names."""
    ok = True
    if totals.get("cli", 0) > CLI_LIMIT:
        print(f"error: crates/cli/src has {totals['cli']} lines, over the limit of {CLI_LIMIT}")
        ok = False
    src = root / "crates" / "cli" / "src"
    simulate = [src / "simulate.rs"] + sorted((src / "simulate").rglob("*.rs"))
    n = sum(p.read_text().count("\n") for p in simulate if p.is_file())
    if n > SIMULATE_LIMIT:
        print(f"error: crates/cli/src/simulate* has {n} lines, over the limit of {SIMULATE_LIMIT}")
        ok = False
    for p in sorted(src.rglob("*.rs")):
        for number, line in enumerate(p.read_text().splitlines(), 1):
            for name in LEARNING_NAMES:
                if name in line:
                    where = p.relative_to(root)
                    print(f"error: {where}:{number} names {name}, which belongs below the CLI")
                    ok = False
    return ok


# --- self-test -----------------------------------------------------------------------


SAMPLE = r'''
//! A sample { with an unmatched brace in a doc comment
fn long<'a>(x: &'a str) -> char {
    /* a block /* nested { */ still a comment } */ let s = "}}}";
    let r = r#"a "quoted" } brace"#;
    let b = br##"}"#}"##;
    let c = '}';
    let q = '\'';
    let u = '\u{7d}';
    'outer: loop { break 'outer; }
    let _ = (s, r, b, c, q, u, x);
    '{'
}

trait T { fn declared(&self); fn provided(&self) {} }

#[cfg(test)]
mod tests {
    fn helper() {
    }
    #[test]
    fn a_test() {}
}

#[cfg(test)]
mod more;

#[tokio::test]
async fn async_test() {
}

fn pointer(f: fn(u8) -> u8) -> u8 {
    f(1)
}

fn generic<A, B>(a: A) -> Result<(), B>
where
    A: Fn(u8) -> Vec<u8>,
    B: Default,
{
    let _ = a;
    Ok(())
}

struct S {
    #[cfg(test)]
    seen: Vec<(u8, u8)>,
    kept: u8,
}

#[cfg(test)]
impl<A, B> S {
    fn test_only(&self) {}
}

fn after() {}
'''


def self_test():
    fns, mods, whole = scan(SAMPLE)
    got = {name: (last - first + 1, t) for name, first, last, t in fns}
    want = {
        "long": (11, False),
        "provided": (1, False),
        "helper": (2, True),
        "a_test": (1, True),
        "async_test": (2, True),
        "pointer": (3, False),
        "generic": (8, False),
        "test_only": (1, True),
        "after": (1, False),
    }
    assert got == want, got
    assert mods == ["more"] and not whole, (mods, whole)
    assert scan("#![cfg(test)]\nfn x() {}\n")[2]
    lits = [t for t in tokenize(SAMPLE) if t[0] == "lit"]
    assert ("lit", "'}'", 7) in lits, lits
    assert ("life", "'outer", 10) in tokenize(SAMPLE)

    assert module_of("lib.rs") is None and module_of("main.rs") is None
    assert module_of("a.rs") == ("a", 1) and module_of("a/mod.rs") == ("a", 1)
    assert module_of("a/b.rs") == ("a", 2) and module_of("a/b/c.rs") == ("a", 3)

    code = """
use crate::{b, c::{d, e}, self};
use super::f;
use super::super::g;
fn x() { crate::h::run(); let s = "crate::i"; /* crate::j */ }
mod inner { use super::super::k; }
use crate::{
    l::M,
};
"""
    names = sorted(n for n, _ in references(code, 1))
    assert names == ["b", "c", "f", "h", "k", "l"], names
    names = sorted(n for n, _ in references(code, 2))
    assert names == ["b", "c", "g", "h", "l"], names
    # A group after too few supers does not unbalance the braces counting inline mods.
    code = "mod outer {\n    use super::{x, y};\n    use super::super::k;\n}\n"
    assert references(code, 1) == [("k", 3)], references(code, 1)

    root = Path("/sample/src")
    files = {
        root / "lib.rs": "pub mod a; pub mod b; pub mod c; use crate::a::X;",
        root / "a.rs": "use crate::b::Y;",
        root / "b/mod.rs": "mod inner;",
        root / "b/inner.rs": "use super::super::c::Z;",
        root / "c.rs": "pub fn z() { crate::a::x() }",
        root / "d.rs": "use super::a;",
    }
    edges = crate_edges(root, files)
    assert loops(edges) == [["a", "b", "c", "a"]], loops(edges)
    assert edges[("b", "c")] == "/sample/src/b/inner.rs:1", edges
    assert ("d", "a") in edges
    assert loops({("a", "b"): "", ("b", "a"): "", ("b", "c"): "", ("c", "b"): ""}) == [
        ["a", "b", "a"],
        ["b", "c", "b"],
    ]
    print("check-modules self-test: ok")


def main(argv):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    if "--self-test" in argv:
        self_test()
        return 0
    unknown = [a for a in argv if a != "--limits"]
    if unknown:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    return 0 if check(root, "--limits" in argv) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
