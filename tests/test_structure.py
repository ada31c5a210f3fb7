"""The module's shape: sections in dependency order for real, so that it reads top to bottom like a book."""

import ast
import re

from conftest import ROOT

BANNER = re.compile(r"^# ─── (.+?) ─+$")


def sections():
    """(section name, its top-level statements) in order, from the module's banners."""
    source = (ROOT / "k2proxy.py").read_text(encoding="utf-8")
    starts = [(number, found.group(1)) for number, line in enumerate(source.splitlines(), 1)
              if (found := BANNER.match(line))]
    named = [[name, []] for _, name in starts]
    for statement in ast.parse(source).body:
        place = sum(1 for number, _ in starts if number <= statement.lineno) - 1
        if place >= 0:
            named[place][1].append(statement)
    return named


def defined(statement):
    """The module-level names a top-level statement defines."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
    return {node.id for target in targets if target for node in ast.walk(target) if isinstance(node, ast.Name)}


def bound_locally(node):
    """The names a function or class binds itself (arguments, assignments, loop targets, imports)."""
    names = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.arg):
            names.add(inner.arg)
        elif isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
            names.add(inner.id)
        elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and inner is not node:
            names.add(inner.name)
    return names


def used(statement):
    """The names a top-level statement reads, less those its own functions bind."""
    local = set()
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        local = bound_locally(statement)
    return {node.id for node in ast.walk(statement)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local}


def test_no_section_uses_a_name_defined_in_a_later_section():
    found = sections()
    home = {name: index for index, (_, statements) in enumerate(found) for statement in statements
            for name in defined(statement)}
    later = sorted({f"{section} uses {name}, defined later in {found[home[name]][0]}"
                    for index, (section, statements) in enumerate(found) for statement in statements
                    for name in used(statement) if home.get(name, -1) > index})
    assert later == []


def test_the_check_sees_a_name_used_before_its_section():
    """The test above can fail: a section that reads a later one's name is found."""
    source = ("# ─── First ───\ndef early():\n    return LATE\n\n"
              "# ─── Second ───\nLATE = 1\n")
    tree = ast.parse(source)
    early, late = tree.body
    assert "LATE" in used(early) and defined(late) == {"LATE"}
    assert "LATE" not in used(ast.parse("def shadow(LATE):\n    return LATE\n").body[0])


def test_the_module_docstring_lists_the_sections_in_order():
    import k2proxy
    listed = " ".join(k2proxy.__doc__.split()).lower()
    missing, position = [], 0
    for section, _ in sections():
        found = listed.find(section.lower(), position)
        if found < 0:
            missing.append(section)
        position = max(position, found)
    assert missing == [], "not listed in order in the module docstring"


KIND_SECTIONS = ("Upstream: the web site", "Upstream: the official API")


def test_the_core_uses_nothing_of_an_upstream_kinds_section():
    """The core sees an upstream kind only through UpstreamKind: what it asks of one travels in its CoreRequest."""
    found = dict((name, statements) for name, statements in sections())
    of_kinds = {name for section in KIND_SECTIONS for statement in found[section] for name in defined(statement)}
    used_by_core = {name for statement in found["Core"] for name in used(statement)}
    assert used_by_core & of_kinds == set()


REQUEST_MAP = re.compile(r"`([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?)`")


def test_every_function_the_request_map_names_exists():
    """docs/architecture.md follows one request by function name: each name is one of the module's."""
    import k2proxy
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    walk = text[text.index("## One request, start to end"):text.index("## Adding a client dialect")]
    names = {name for name in REQUEST_MAP.findall(walk) if "_" in name or "." in name or name[0].isupper()}
    missing = []
    for name in sorted(names):
        owner, _, member = name.partition(".")
        found = getattr(k2proxy, owner, None)
        if found is None or (member and not hasattr(found, member)):
            missing.append(name)
    assert len(names) > 30 and missing == []


REPLICA_WORDS = re.compile(r"redis|shared|fleet|replica|(?<![a-z])lease", re.IGNORECASE)


def test_above_the_replicas_layer_no_code_names_it():
    """Redis is a layer below the local code: above "Shared state", no name, attribute or argument speaks of it
    (the backends it puts in place come as arguments, with the local ones' methods)."""
    source = (ROOT / "k2proxy.py").read_text(encoding="utf-8")
    layer = next(number for number, line in enumerate(source.splitlines(), 1) if line.startswith("# ─── Shared state"))
    named = set()
    for node in ast.walk(ast.parse(source)):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else (
            node.arg if isinstance(node, ast.arg) else None)
        if name and getattr(node, "lineno", layer) < layer and REPLICA_WORDS.search(name):
            named.add(f"line {node.lineno}: {name}")
    assert named == set()
