"""The package's rooms import only downward, as the README's layer table says (in-function imports included), with
no import circle and no in-function import of the kit's own modules without a reason; one reader or writer for each
kind of file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spleenkit"
README = PACKAGE.parent / "README.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its code (top level or inside functions)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spleenkit"):
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target not in (name, "spleenkit")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_of_the_package_imports_one_that_imports_it_back() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def layer_table() -> dict[str, int]:
    """The README's layer table: top-level module name -> row number (0 at the top). Names in parentheses are a
    package's own modules and share its row."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("| layer | module | concern |"):].split("\n\n")[0].splitlines()[2:]
    rows: dict[str, int] = {}
    for number, line in enumerate(table):
        cell = re.sub(r"\([^)]*\)", "", line.split("|")[2])
        for name in re.findall(r"`([\w.]+)`", cell):
            assert name not in rows, f"the layer table places {name} twice"
            rows[name] = number
    return rows


def room(module: str) -> str:
    """The table's name for a module: ``spleenkit.training.engines`` is in the row of ``training``."""
    return module.split(".")[1]


def upward_imports(graph: dict[str, set[str]], rows: dict[str, int]) -> list[str]:
    """The imports of a module in a lower row of a module in a higher one."""
    return sorted(f"{name} (row {rows[room(name)]}) imports {target} (row {rows[room(target)]})"
                  for name, targets in graph.items() if name != "spleenkit"
                  for target in targets if rows[room(target)] > rows[room(name)])


def test_every_module_imports_only_its_own_row_or_the_rows_above_as_the_readme_says() -> None:
    rows = layer_table()
    graph = import_graph()
    unplaced = sorted({room(name) for name in graph if name != "spleenkit"} - set(rows))
    assert not unplaced, f"the README's layer table does not place {unplaced}"
    upward = upward_imports(graph, rows)
    assert not upward, "imports against the layer table:\n" + "\n".join(upward)


def test_the_layer_check_finds_an_upward_import() -> None:
    rows = {"errors": 0, "environment": 1, "manifest": 2, "training": 3}
    graph = {"spleenkit.environment": {"spleenkit.manifest"}, "spleenkit.training.run": {"spleenkit.errors"}}
    assert upward_imports(graph, rows) == ["spleenkit.environment (row 1) imports spleenkit.manifest (row 2)"]


def deferred_imports_without_a_reason() -> list[str]:
    """In-function imports of the kit's own modules (outside ``if TYPE_CHECKING``) with no comment on their line.

    The command line is the one exception: its docstring says that every command imports its modules in its
    handler, so that ``spleenkit --help`` starts without them."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == "spleenkit.cli":
            continue
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        typing_only = {id(node) for branch in ast.walk(tree)
                       if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                       for node in ast.walk(branch)}
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if id(node) in top or id(node) in typing_only:
                continue
            own = ((isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spleenkit"))
                   or (isinstance(node, ast.Import) and any(a.name.startswith("spleenkit") for a in node.names)))
            if own and "#" not in lines[node.lineno - 1]:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_the_kits_own_modules_are_imported_at_the_top_unless_a_comment_says_why_not() -> None:
    found = deferred_imports_without_a_reason()
    assert not found, "in-function imports without a reason:\n" + "\n".join(found)
    cli = (PACKAGE / "cli.py").read_text(encoding="utf-8")
    assert "each\ncommand imports the module it needs inside its handler" in cli


def test_no_module_imports_another_modules_private_names() -> None:
    for name, code in code_of_the_package().items():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spleenkit") and node.module != name:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{name} imports private {private} from {node.module}"


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/helpers.py and tests/conftest.py."""
    for path in sorted((PACKAGE.parent / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not [n for n in names if n.startswith(("test_", "conftest"))], f"{path.name} imports {names}"


def code_of_the_package() -> dict[str, str]:
    return {module_name(path): path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")}


def test_one_nifti_reader_and_one_metrics_log_reader() -> None:
    for name, code in code_of_the_package().items():
        if name != "spleenkit.images":
            assert not re.search(r"\bnib(abel)?\.load\(", code), f"{name} reads NIfTI itself: use images.read_nifti"
        if name != "spleenkit.runs":
            assert "def read_metrics" not in code, f"{name} has its own metrics.jsonl reader: use runs.read_metrics"


def test_one_autocast_path_for_inference() -> None:
    """Inference windows run under autocast in one place (predict.autocast_inferer / predict_logits)."""
    for name, code in code_of_the_package().items():
        if name not in {"spleenkit.predict", "spleenkit.devices", "spleenkit.training.precision"}:
            assert "torch.autocast(" not in code and "autocast(" not in code.replace("autocast_inferer(", ""), name
