"""Source rewrite for the kvemu SIMT emulator: what C++ cannot express with macros.

* `kernel<<<grid, block[, smem[, stream]]>>>(args)` becomes
  `::kvemu::launch(::kvemu::LaunchConfig(grid, block, ...), site, [&](auto&... a) { kernel(a...); }, args)`;
* `extern __shared__ T name[];` becomes `T* const name = ::kvemu::dynamic_shared<T>();` inside a
  function and a `::kvemu::DynamicShared<T>` proxy at namespace scope;
* a block-scope `__shared__ T name[N];` becomes
  `auto& name = ::kvemu::shared_var<T[N]>(align, "name", [] {});`: per-block storage that the
  emulator poisons (0xFF bytes) and allocates exactly (AddressSanitizer sees overruns). Other
  `__shared__` variables stay `thread_local` (the `__shared__` macro); unusual block-scope
  declarators are followed by `::kvemu::shared_decl(...)`, which poisons them per block.

Everything else (`__global__`, `__shared__` -> `thread_local`, the intrinsics) is done by the
headers in tests/emu/include. Line numbers are kept (a `#line 1 "<original path>"` directive
comes first and no replacement changes the number of lines), so compiler errors, deadlock
reports and AddressSanitizer traces point into the original file.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

__all__ = ["rewrite_source", "RewriteError"]


class RewriteError(ValueError):
    pass


@dataclass
class Tok:
    kind: str  # "id", "num", "str", "punct"
    text: str
    start: int
    end: int


_PUNCT = sorted(
    """<<< >>> ->* <<= >>= ... :: -> ++ -- << >> <= >= == != && || += -= *= /= %= &= |= ^= ## [[ ]]
    { } [ ] ( ) ; : , . ? ~ ! + - * / % ^ & | = < > #""".split(),
    key=len, reverse=True)
# "[[" / "]]" would break `a[b[0]]`: only single brackets are real tokens
_PUNCT = [p for p in _PUNCT if p not in ("[[", "]]")]
_ID = re.compile(r"[A-Za-z_]\w*")
_NUM = re.compile(r"\.?\d(?:[eEpP][+-]|[\w.']|'(?=\w))*")
_STR_PREFIX = re.compile(r"(?:u8|u|U|L)?R?\"|(?:u8|u|U|L)?'")


def _tokenize(src: str) -> list[Tok]:
    toks: list[Tok] = []
    i, n = 0, len(src)
    line_start = True  # only whitespace since the last newline
    while i < n:
        c = src[i]
        if c == "\n":
            line_start = True
            i += 1
            continue
        if c in " \t\r\f\v":
            i += 1
            continue
        if c == "\\" and i + 1 < n and src[i + 1] == "\n":
            i += 2
            continue
        if src.startswith("//", i):
            while i < n and src[i] != "\n":
                i += 2 if src[i] == "\\" and i + 1 < n and src[i + 1] == "\n" else 1
            continue
        if src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c == "#" and line_start:  # preprocessor directive, with continuations
            while i < n and src[i] != "\n":
                if src[i] == "\\" and i + 1 < n and src[i + 1] == "\n":
                    i += 2
                elif src.startswith("/*", i):
                    j = src.find("*/", i + 2)
                    i = n if j < 0 else j + 2
                else:
                    i += 1
            continue
        line_start = False
        m = _STR_PREFIX.match(src, i)
        if m and (c in "\"'" or not _ID.match(src, i) or m.end() - i <= 3):
            pre = m.group(0)
            if pre.endswith('R"'):
                k = src.find("(", m.end())
                delim = ")" + src[m.end():k] + '"'
                j = src.find(delim, k)
                if k < 0 or j < 0:
                    raise RewriteError(f"unterminated raw string at offset {i}")
                end = j + len(delim)
            else:
                q = pre[-1]
                j = m.end()
                while j < n and src[j] != q:
                    if src[j] == "\\":
                        j += 1
                    elif src[j] == "\n":
                        raise RewriteError(f"unterminated literal at offset {i}")
                    j += 1
                end = j + 1
            toks.append(Tok("str", src[i:end], i, end))
            i = end
            continue
        m = _ID.match(src, i)
        if m:
            toks.append(Tok("id", m.group(0), i, m.end()))
            i = m.end()
            continue
        m = _NUM.match(src, i)
        if m:
            toks.append(Tok("num", m.group(0), i, m.end()))
            i = m.end()
            continue
        for p in _PUNCT:
            if src.startswith(p, i):
                toks.append(Tok("punct", p, i, i + len(p)))
                i += len(p)
                break
        else:
            toks.append(Tok("punct", c, i, i + 1))
            i += 1
    return toks


_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


def _match_forward(toks: list[Tok], i: int) -> int:
    """Index of the bracket closing the one at toks[i]."""
    stack = []
    for j in range(i, len(toks)):
        t = toks[j].text
        if t in _OPEN:
            stack.append(_OPEN[t])
        elif t in _CLOSE:
            if not stack or stack.pop() != t:
                raise RewriteError(f"unbalanced {t!r} at offset {toks[j].start}")
            if not stack:
                return j
    raise RewriteError(f"unclosed {toks[i].text!r} at offset {toks[i].start}")


def _skip_template_args_back(toks: list[Tok], j: int) -> int:
    """toks[j] closes template arguments: the index just before their opening '<'."""
    depth = 0
    while j >= 0:
        t = toks[j].text
        if t in _CLOSE:  # a bracketed group inside the arguments
            d = 0
            while j >= 0:
                if toks[j].text in _CLOSE:
                    d += 1
                elif toks[j].text in _OPEN:
                    d -= 1
                    if d == 0:
                        break
                j -= 1
        elif t == ">":
            depth += 1
        elif t == ">>":
            depth += 2
        elif t == "<":
            depth -= 1
        elif t == "<<":
            depth -= 2
        j -= 1
        if depth <= 0:
            return j
    raise RewriteError("unbalanced template arguments before '<<<'")


def _scopes(toks: list[Tok]) -> list[bool]:
    """For each token: is it inside a function body (or other code braces)?"""
    in_code = [False] * len(toks)
    stack: list[str] = []  # "ns", "class", "code"
    head_start = 0
    for i, t in enumerate(toks):
        in_code[i] = "code" in stack
        if t.text in (";", "}"):
            if t.text == "}" and stack:
                stack.pop()
            head_start = i + 1
        elif t.text == "{":
            head = toks[head_start:i]
            texts = [h.text for h in head]
            kind = "code"
            if "namespace" in texts or (len(head) >= 2 and texts[-2:-1] == ["extern"] and head[-1].kind == "str"):
                kind = "ns"
            elif "code" not in stack:
                angle = paren = 0
                for h in head:
                    if h.text == "<":
                        angle += 1
                    elif h.text == ">":
                        angle -= 1
                    elif h.text == ">>":
                        angle -= 2
                    elif h.text == "(":
                        paren += 1
                    elif h.text == ")":
                        paren -= 1
                    elif h.text in ("struct", "class", "union", "enum") and angle <= 0 and paren == 0:
                        kind = "class"
                if kind != "class" and "=" in texts:
                    kind = "code"  # an initializer: expressions, no declarations we care about
            stack.append(kind)
            head_start = i + 1
    return in_code


def _strip_attrs(decl: list[Tok]) -> list[Tok]:
    out: list[Tok] = []
    i = 0
    while i < len(decl):
        t = decl[i].text
        if t in ("extern", "static", "__shared__", "thread_local"):
            i += 1
        elif t in ("__align__", "alignas", "__attribute__", "__declspec") and i + 1 < len(decl) and decl[i + 1].text == "(":
            i = _match_forward(decl, i + 1) + 1
        elif t == "[" and i + 1 < len(decl) and decl[i + 1].text == "[":  # [[attribute]]
            i = _match_forward(decl, i) + 1
        else:
            out.append(decl[i])
            i += 1
    return out


def _split_declarators(decl: list[Tok]) -> list[list[Tok]]:
    parts: list[list[Tok]] = [[]]
    depth = angle = 0
    for t in decl:
        if t.text in _OPEN:
            depth += 1
        elif t.text in _CLOSE:
            depth -= 1
        elif depth == 0 and t.text == "<":
            angle += 1
        elif depth == 0 and t.text in (">", ">>"):
            angle = max(0, angle - len(t.text))
        if t.text == "," and depth == 0 and angle == 0:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts


def _declarator_name(part: list[Tok]) -> tuple[str, int]:
    """(name, index of the name in part) of `type name[dims] = init`."""
    depth = 0
    for k, t in enumerate(part):  # cut the initializer
        if t.text in _OPEN:
            depth += 1
        elif t.text in _CLOSE:
            depth -= 1
        elif t.text == "=" and depth == 0:
            part = part[:k]
            break
    while part and part[-1].text == "]":  # cut array dimensions
        depth = 0
        for k in range(len(part) - 1, -1, -1):
            if part[k].text == "]":
                depth += 1
            elif part[k].text == "[":
                depth -= 1
                if depth == 0:
                    part = part[:k]
                    break
    for k in range(len(part) - 1, -1, -1):
        if part[k].kind == "id":
            return part[k].text, k
    raise RewriteError("cannot find the name of a __shared__ declaration")


_PTR_OPS = ("*", "&", "&&", "const", "volatile", "__restrict__", "__restrict", "restrict")


def _shared_var_decls(src: str, stmt: list[Tok], decl: list[Tok]) -> str | None:
    """`__shared__ [__align__(A)] T a[N], *p;` -> `auto& a = ::kvemu::shared_var<T[N]>(A, "a", [] {});
    auto& p = ::kvemu::shared_var<T*>(A, "p", [] {});` (None for declarators it does not handle)."""
    align = "0"
    for k, t in enumerate(stmt):
        if t.text in ("__align__", "alignas") and k + 1 < len(stmt) and stmt[k + 1].text == "(":
            close = _match_forward(stmt, k + 1)
            align = src[stmt[k + 1].end:stmt[close].start].strip()
    parts = [p for p in _split_declarators(decl) if p]
    if not parts:
        return None
    out = []
    spec = ""
    for n, part in enumerate(parts):
        name, k = _declarator_name(part)
        tail = part[k + 1:]
        # only array dimensions may follow the name (no initialiser, no function declarator)
        depth = 0
        for t in tail:
            if t.text == "[":
                depth += 1
            elif t.text == "]":
                depth -= 1
            elif depth == 0:
                return None
        lo = k
        while lo > (1 if n == 0 else 0) and part[lo - 1].text in _PTR_OPS:
            lo -= 1
        if n == 0:
            if lo == 0:
                return None
            spec = src[part[0].start:part[lo - 1].end]
        ptr = src[part[lo].start:part[k - 1].end] if lo < k else ""
        dims = src[tail[0].start:tail[-1].end] if tail else ""
        ctype = " ".join(f"{spec} {ptr}{dims}".split())
        out.append(f'auto& {name} = ::kvemu::shared_var<{ctype}>({align}, "{name}", [] {{}});')
    return " ".join(out)


def rewrite_source(src: str, display_name: str) -> str:
    """Rewrite one CUDA source file for the emulator (see the module docstring)."""
    toks = _tokenize(src)
    in_code = _scopes(toks)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in src offsets

    # launches
    i = 0
    while i < len(toks):
        if toks[i].text != "<<<":
            i += 1
            continue
        # the kernel expression before <<<: [::] name [<...>] (:: [template] name [<...>])*
        j = i - 1
        while True:
            if j >= 0 and toks[j].text in (">", ">>"):
                j = _skip_template_args_back(toks, j)
            if j < 0 or toks[j].kind != "id":
                raise RewriteError(f"{display_name}: cannot find the kernel before '<<<' at offset {toks[i].start}")
            j -= 1
            if j >= 1 and toks[j].text == "template" and toks[j - 1].text == "::":
                j -= 1
            if j >= 0 and toks[j].text == "::":
                j -= 1
                if j >= 0 and (toks[j].kind == "id" or toks[j].text in (">", ">>")):
                    continue
            break
        start = j + 1
        # the configuration up to the matching >>>
        k = i + 1
        depth = 0
        while k < len(toks):
            t = toks[k].text
            if t in _OPEN:
                depth += 1
            elif t in _CLOSE:
                depth -= 1
            elif t == ">>>" and depth == 0:
                break
            k += 1
        if k >= len(toks) or k + 1 >= len(toks) or toks[k + 1].text != "(":
            raise RewriteError(f"{display_name}: malformed kernel launch at offset {toks[i].start}")
        close = _match_forward(toks, k + 1)
        expr = src[toks[start].start:toks[i].start].strip()
        cfg = src[toks[i].end:toks[k].start]
        args = src[toks[k + 1].end:toks[close].start]
        label = " ".join(expr.split()).replace("\\", "\\\\").replace('"', '\\"')
        rep = (f"::kvemu::launch(::kvemu::LaunchConfig({cfg}), ::kvemu::LaunchSite{{\"{label}\", "
               f"__PRETTY_FUNCTION__, ::std::source_location::current()}}, "
               f"[&](auto&... kvemu_a_) {{ {expr}(kvemu_a_...); }}"
               + (f", {args})" if args.strip() else ")"))
        orig = src[toks[start].start:toks[close].end]
        rep = " ".join(rep.split("\n")) if rep.count("\n") > orig.count("\n") else rep
        rep += "\n" * (orig.count("\n") - rep.count("\n"))
        edits.append((toks[start].start, toks[close].end, rep))
        i = close + 1

    # __shared__ declarations
    i = 0
    while i < len(toks):
        if toks[i].text != "__shared__":
            i += 1
            continue
        s = i
        while s > 0 and toks[s - 1].text not in (";", "{", "}", ":"):
            s -= 1
        e = i
        depth = 0
        while e < len(toks):
            t = toks[e].text
            if t in _OPEN:
                depth += 1
            elif t in _CLOSE:
                depth -= 1
            elif t == ";" and depth == 0:
                break
            e += 1
        if e >= len(toks):
            raise RewriteError(f"{display_name}: unterminated __shared__ declaration at offset {toks[i].start}")
        stmt = toks[s:e]
        is_extern = any(t.text == "extern" for t in stmt)
        decl = _strip_attrs(stmt)
        if is_extern:
            if len(decl) < 4 or decl[-2].text != "[" or decl[-1].text != "]" or decl[-3].kind != "id":
                raise RewriteError(f"{display_name}: expected `extern __shared__ T name[];` at offset {toks[i].start}")
            name = decl[-3].text
            ctype = src[decl[0].start:decl[-4].end] if len(decl) > 3 else ""
            ctype = " ".join(ctype.split())
            if in_code[i]:
                rep = f"{ctype}* const {name} = ::kvemu::dynamic_shared<{ctype}>();"
            else:
                rep = f"[[maybe_unused]] static ::kvemu::DynamicShared<{ctype}> {name};"
            orig = src[toks[s].start:toks[e].end]
            rep += "\n" * orig.count("\n")
            edits.append((toks[s].start, toks[e].end, rep))
        elif in_code[i]:
            rep = _shared_var_decls(src, stmt, decl)
            if rep is not None:
                orig = src[toks[s].start:toks[e].end]
                edits.append((toks[s].start, toks[e].end, rep + "\n" * orig.count("\n")))
            else:  # an unusual declarator: keep the thread_local variable, register it for poisoning
                names = [_declarator_name(p)[0] for p in _split_declarators(decl) if p]
                reg = "".join(f" ::kvemu::shared_decl((void*)&{nm}, sizeof({nm}), \"{nm}\");" for nm in names)
                edits.append((toks[e].end, toks[e].end, reg))
        i = e + 1

    edits.sort()
    out = []
    pos = 0
    for a, b, rep in edits:
        if a < pos:
            raise RewriteError(f"{display_name}: overlapping rewrites at offset {a}")
        out.append(src[pos:a])
        out.append(rep)
        pos = b
    out.append(src[pos:])
    body = "".join(out)
    assert body.count("\n") == src.count("\n"), "the rewrite must keep line numbers"
    quoted = display_name.replace("\\", "\\\\").replace('"', '\\"')
    return f"#include <kvemu/emu.h>\n#line 1 \"{quoted}\"\n" + body


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: kvemu_rewrite.py SOURCE [DISPLAY_NAME]  (writes the rewrite to stdout)", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        src = f.read()
    sys.stdout.write(rewrite_source(src, argv[2] if len(argv) == 3 else argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
