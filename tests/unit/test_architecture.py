"""The architecture's rules, checked on the source: no import cycle (lazy imports included), no family
sniffing in shared code (docs/adding-a-family.md), and no shared function over 60 lines or file over 600.
Shared code asks a family's interface; only a family's own modules may know its types, names and
attributes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import vlmkit

SRC = Path(vlmkit.__file__).parent
PACKAGE_DIRS = ("models", "processing", "encoders", "convert/hf")  # where a family's own parts live


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def imports(path: Path, name: str, lazy: bool = True) -> set[str]:
    """The vlmkit modules ``path`` (module ``name``) imports: at its top, and with ``lazy`` inside functions too;
    typing-only imports (``if TYPE_CHECKING``) are not imports at run time."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in (ast.walk(tree) if lazy else tree.body):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("vlmkit")}


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for t in imports(path, name):
            while t and t not in mods:  # `from vlmkit.x import y`: y is a name in module vlmkit.x
                t = t.rpartition(".")[0]
            if t and t != name:
                targets.add(t)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def family_owned(edges: dict[str, set[str]]) -> set[str]:
    """The family modules (vlmkit.families.*) and preset modules (vlmkit.presets.*), and the parts under models/,
    processing/, encoders/ and convert/hf/ that only family-owned modules import (a family's model, processing and
    key maps)."""
    owned = {m for m in edges if m.startswith(("vlmkit.families.", "vlmkit.presets."))}
    dirs = tuple("vlmkit." + d.replace("/", ".") + "." for d in PACKAGE_DIRS)
    changed = True
    while changed:
        changed = False
        for m in edges:
            if m in owned or not m.startswith(dirs):
                continue
            importers = {k for k, v in edges.items() if m in v}
            if importers and importers <= owned:
                owned.add(m)
                changed = True
    return owned


def test_no_import_cycle_even_through_lazy_imports():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# capability probes on models, pipelines, engines and processors; isinstance tests of a family's types; tests of
# a family's, a processor's or a folder's kind by name
SNIFFING = re.compile(
    r"getattr\((self\.)?(model|pipe|pipeline|engine|processor|module|net)\b|"
    r"hasattr\((self\.)?(model|pipe|pipeline|engine|processor)\b|"
    r"prefix_lm|features_per_image|reads_instruction|is_dual_encoder|tile_encoder|"
    r"isinstance\([^)]*(Qwen2|Mllama|Idefics|Blip|Flamingo|PaliGemma|Llava|DualEncoder|Fuyu|Siglip|Clip)|"
    r"image_processor *[!=]=|(family|model_type|family\.name|cfg\.family) *(==|!=) *[\"']|"
    r"(family|model_type) in [(\[{]")


def sniffing(lines: list[str]) -> list[str]:
    return [line for line in lines if SNIFFING.search(line)]


def test_shared_code_does_not_sniff_families():
    edges = graph()
    owned = family_owned(edges)
    mods = modules()
    found = [f"{mods[m].relative_to(SRC.parent)}:{i}: {line.strip()}" for m in sorted(set(mods) - owned)
             for i, line in enumerate(mods[m].read_text().splitlines(), 1) if sniffing([line])]
    assert found == []


def test_the_sniffing_pattern_finds_what_the_family_interface_replaced():
    # lines of vlmkit 0.1's shared code (generation.py, serve/engine.py, convert/hf/processor.py, cli.py)
    before = ['prefix = {"prefix_len": ids.shape[1]} if getattr(model, "prefix_lm", False) else {}',
              "if isinstance(features, Qwen2VLImageFeatures):", 'if image_processor == "fixed":',
              'tokens = str(model.image_seq_len) if not preset.model.is_dual_encoder else "-"',
              'if cfg.family == "paligemma":']
    assert sniffing(before) == before
    assert sniffing(["if family.capabilities.shared_prefix:", "features = model.encode_media(media)"]) == []


def test_family_parts_are_owned_and_shared_parts_are_not():
    owned = family_owned(graph())
    assert {"vlmkit.families.llava", "vlmkit.models.qwen2_vl", "vlmkit.processing.paligemma",
            "vlmkit.convert.hf.mllama", "vlmkit.encoders.mllama", "vlmkit.presets.splice"} <= owned
    assert not {"vlmkit.family", "vlmkit.families", "vlmkit.models.vlm", "vlmkit.processing.processor",
                "vlmkit.processing.layouts", "vlmkit.generation", "vlmkit.serve.engine", "vlmkit.pipeline",
                "vlmkit.train.loop", "vlmkit.convert.hf.lm"} & owned


MAX_FUNCTION_LINES, MAX_FILE_LINES = 60, 600  # the size of a part a reader takes in at once


def oversized(path: Path) -> list[str]:
    """The functions of ``path`` over MAX_FUNCTION_LINES (decorators and docstring included), and the file itself
    when it is over MAX_FILE_LINES."""
    text = path.read_text()
    lines = len(text.splitlines())
    found = [f"{path.name}: {lines} lines"] if lines > MAX_FILE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                found.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - start + 1} lines")
    return found


def test_shared_code_has_no_oversized_function_or_file():
    owned = family_owned(graph())
    mods = modules()
    assert [f for m in sorted(set(mods) - owned) for f in oversized(mods[m])] == []


def test_the_size_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    assert oversized(tmp_path / "long.py") == [f"long.py:1 long: {MAX_FUNCTION_LINES + 1} lines"]
