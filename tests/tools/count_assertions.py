"""Count the assertions in the test tree: ``python tests/tools/count_assertions.py [folder]``.

An assertion is an ``assert`` statement, a call of ``pytest.raises`` / ``pytest.warns`` /
``pytest.fail``, or of any function whose name starts with ``assert_`` (``np.testing.assert_*``
and the test helpers that assert). Counted in the source text, so a helper called from a loop or
a parametrized test counts once. The total is
printed last; ``--by-file`` prints one line a file first.
"""
import ast
import sys
from pathlib import Path

PYTEST_CHECKS = {"raises", "warns", "fail", "approx"}


def _called_name(call: ast.Call) -> tuple[str, str]:
    """(owner, name) of a call: ``pytest.raises`` -> ("pytest", "raises"), ``f`` -> ("", "f")."""
    func = call.func
    if isinstance(func, ast.Attribute):
        owner = func.value
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        return owner_name, func.attr
    if isinstance(func, ast.Name):
        return "", func.id
    return "", ""


def is_assertion(node: ast.AST) -> bool:
    if isinstance(node, ast.Assert):
        return True
    if not isinstance(node, ast.Call):
        return False
    owner, name = _called_name(node)
    if owner == "pytest":
        return name in PYTEST_CHECKS - {"approx"}
    return name.startswith("assert_")


def count_file(path: Path) -> int:
    tree = ast.parse(path.read_text(), filename=str(path))
    return sum(is_assertion(node) for node in ast.walk(tree))


def main(argv: list[str]) -> int:
    by_file = "--by-file" in argv
    folders = [a for a in argv if not a.startswith("--")] or [str(Path(__file__).resolve().parents[1])]
    total = 0
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.py")):
            if "tools" in path.relative_to(folder).parts:
                continue
            count = count_file(path)
            total += count
            if by_file:
                print(f"{count:5d} {path.relative_to(folder)}")
    print(f"{total} assertions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
