"""A small stand-in for `helm template`: renders the subset of Go templates and Helm functions
that deploy/helm/pysnap uses (no helm binary here).

Supported: ``{{ }}`` with ``{{-``/``-}}`` trimming, comments, ``if``/``else``/``end``,
``with``, ``range [$k, $v :=] X``, ``define``/``include``, pipelines, ``.Values…``,
``.Release…``, ``.Chart…``, ``$`` and ``$var…``, string/number/bool literals, and the functions
quote, default, required, toYaml, toJson, indent, nindent, include.  Anything else raises
``RenderError`` — the chart must then stay within this subset or the stand-in must grow.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.S)
KEYWORDS = ("if", "else", "end", "range", "with", "define")


class RenderError(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in ACTION.finditer(text):
        chunk = text[pos:match.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if match.group(1):
            chunk = chunk.rstrip()
        out.append(("text", chunk))
        out.append(("action", match.group(2).strip()))
        trim_next = bool(match.group(3))
        pos = match.end()
    tail = text[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def parse(text: str) -> tuple[list, dict[str, list]]:
    """(nodes, {define name: nodes})."""
    defines: dict[str, list] = {}
    root: list = []
    stack: list[tuple[list, tuple]] = []  # (parent list, open node)
    current = root
    for kind, value in _tokens(text):
        if kind == "text":
            if value:
                current.append(("text", value))
            continue
        if value.startswith("/*"):
            if not value.endswith("*/"):
                raise RenderError(f"unterminated comment: {value}")
            continue
        word = value.split(None, 1)[0] if value else ""
        rest = value[len(word):].strip()
        if word in ("if", "with", "range", "define"):
            node = [word, rest, [], []]  # kind, expression, body, else-body
            current.append(node)
            stack.append((current, node))
            current = node[2]
        elif word == "else":
            if not stack or rest:
                raise RenderError(f"unsupported else: {value!r}")
            current = stack[-1][1][3]
        elif word == "end":
            if not stack:
                raise RenderError("end without a block")
            parent, node = stack.pop()
            current = parent
            if node[0] == "define":
                parent.remove(node)
                defines[json.loads(node[1])] = node[2]
        else:
            current.append(("out", value))
    if stack:
        raise RenderError(f"unclosed {stack[-1][1][0]}")
    return root, defines


def _split(text: str, sep: str) -> list[str]:
    parts, depth, quote, buf = [], 0, "", ""
    for c in text:
        if quote:
            buf += c
            if c == quote and not buf.endswith("\\" + quote):
                quote = ""
            continue
        if c in "\"`":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if depth == 0 and (c == sep if sep != " " else c.isspace()):
            if buf.strip():
                parts.append(buf.strip())
            buf = ""
            continue
        buf += c
    if buf.strip():
        parts.append(buf.strip())
    return parts


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        raise RenderError(f"printing a {type(value).__name__} directly; use toYaml or toJson: {value!r}")
    return str(value)


class Renderer:
    def __init__(self, defines: dict[str, list], root: dict[str, Any]) -> None:
        self.defines = defines
        self.root = root

    def render(self, nodes: list, dot: Any, scope: dict[str, Any]) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "out":
                out.append(_text(self.pipeline(node[1], dot, scope)))
            elif node[0] == "if":
                branch = node[2] if _truthy(self.pipeline(node[1], dot, scope)) else node[3]
                out.append(self.render(branch, dot, scope))
            elif node[0] == "with":
                value = self.pipeline(node[1], dot, scope)
                out.append(self.render(node[2], value, scope) if _truthy(value) else self.render(node[3], dot, scope))
            elif node[0] == "range":
                out.append(self._range(node, dot, scope))
            else:
                raise RenderError(f"unsupported node {node[0]}")
        return "".join(out)

    def _range(self, node: list, dot: Any, scope: dict[str, Any]) -> str:
        expression, names = node[1], []
        if ":=" in expression:
            declared, expression = expression.split(":=", 1)
            names = [n.strip() for n in declared.split(",")]
        value = self.pipeline(expression.strip(), dot, scope)
        items = sorted(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
        if not items:
            return self.render(node[3], dot, scope)
        out = []
        for key, item in items:
            inner = dict(scope)
            if len(names) == 2:
                inner[names[0]], inner[names[1]] = key, item
            elif len(names) == 1:
                inner[names[0]] = item
            out.append(self.render(node[2], item, inner))
        return "".join(out)

    def pipeline(self, text: str, dot: Any, scope: dict[str, Any]) -> Any:
        value, first = None, True
        for command in _split(text, "|"):
            words = _split(command, " ")
            name, args = words[0], words[1:]
            if name in FUNCTIONS or name == "include":
                values = [self.argument(a, dot, scope) for a in args] + ([] if first else [value])
                value = self.include(*values) if name == "include" else FUNCTIONS[name](*values)
            elif first and not args:
                value = self.argument(name, dot, scope)
            else:
                raise RenderError(f"unknown function {name!r} in {text!r}")
            first = False
        return value

    def include(self, name: str, data: Any) -> str:
        if name not in self.defines:
            raise RenderError(f"no template named {name!r}")
        return self.render(self.defines[name], data, {"$": self.root})

    def argument(self, word: str, dot: Any, scope: dict[str, Any]) -> Any:
        if word.startswith("(") and word.endswith(")"):
            return self.pipeline(word[1:-1], dot, scope)
        if word.startswith('"'):
            return json.loads(word)
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word in ("true", "false"):
            return word == "true"
        if word == ".":
            return dot
        if word.startswith("."):
            return _lookup(dot, word[1:].split("."))
        if word.startswith("$"):
            name, _, path = word.partition(".")
            if name == "$":
                base = scope.get("$", self.root)
            elif name in scope:
                base = scope[name]
            else:
                raise RenderError(f"undefined variable {name}")
            return _lookup(base, path.split(".")) if path else base
        raise RenderError(f"cannot evaluate {word!r}")


def _lookup(value: Any, path: list[str]) -> Any:
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _required(message: str, value: Any) -> Any:
    if value is None or value == "":
        raise RenderError(message)
    return value


def _indent(n: int, text: str) -> str:
    pad = " " * n
    return pad + str(text).replace("\n", "\n" + pad)


FUNCTIONS = {
    "quote": lambda *values: " ".join(json.dumps(_text(v)) for v in values if v is not None),
    "default": lambda fallback, value=None: value if _truthy(value) else fallback,
    "required": _required,
    "toYaml": lambda value: yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")
    if value not in (None, {}, []) else ("{}" if value == {} else "[]" if value == [] else "null"),
    "toJson": lambda value: json.dumps(value, separators=(",", ":"), sort_keys=True),
    "indent": _indent,
    "nindent": lambda n, text: "\n" + _indent(n, text),
}


def render_chart(chart: Path, values: dict[str, Any] | None = None, release: str = "pysnap",
                 namespace: str = "kube-system") -> dict[str, str]:
    """{template file name: rendered text} like ``helm template``, with ``values`` merged over
    values.yaml (maps merged recursively)."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    merged = _merge(yaml.safe_load((chart / "values.yaml").read_text()) or {}, values or {})
    root = {
        "Values": merged,
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion", "")},
    }
    templates = sorted((chart / "templates").iterdir())
    defines: dict[str, list] = {}
    parsed = {}
    for path in templates:
        nodes, found = parse(path.read_text())
        defines.update(found)
        parsed[path.name] = nodes
    renderer = Renderer(defines, root)
    return {name: renderer.render(nodes, root, {"$": root})
            for name, nodes in parsed.items() if not name.startswith("_")}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        else:
            result[key] = value
    return result
