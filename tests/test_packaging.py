"""What pyproject.toml promises a user: the installed versions meet its floors, every third-party module distsft
imports is declared (a dependency, or an extra for an optional feature), and the license it names is there.

Fast and offline: reads pyproject.toml, distsft's sources (``ast``, nothing imported) and installed metadata.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "distsft"


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them (PyYAML == pyyaml, huggingface_hub == huggingface-hub)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def requirements(proj: dict) -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    core = [Requirement(r) for r in proj.get("dependencies", [])]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in proj.get("optional-dependencies", {}).items()}
    return core, extras


def version_problems(reqs: list[Requirement]) -> list[str]:
    """One line per requirement (whose marker applies here) that the installed distribution does not meet."""
    problems = []
    for req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req}: {req.name} is not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req}: installed {req.name} {installed} does not satisfy {req.specifier}")
    return problems


def third_party_imports(package: Path) -> list[tuple[str, str, int, bool]]:
    """(top-level module, file, line, at module level) for every absolute import in the package's sources that
    is neither the standard library nor the package itself; imports inside functions (lazy ones) included."""
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in sys.stdlib_module_names or root == package.name:
                    continue
                found.append((root, str(path.relative_to(package.parent)), node.lineno, id(node) in top))
    return found


def declaration_problems(
    imports: list[tuple[str, str, int, bool]],
    core: list[Requirement],
    extras: dict[str, list[Requirement]],
    module_dists: dict[str, list[str]],
) -> list[str]:
    """One line per import whose distribution is not declared; an import at module level runs whenever the module
    is imported, so its distribution must be a dependency, not only an extra."""
    core_names = {normalize(r.name) for r in core}
    extra_names = {normalize(r.name) for reqs in extras.values() for r in reqs}
    problems = []
    for module, file, line, module_level in imports:
        # An optional package that is not installed here has no metadata: then its distribution must be named
        # like the module (wandb, mlflow).
        dists = {normalize(d) for d in module_dists.get(module, [])} or {normalize(module)}
        where = f"{file}:{line}: import {module}"
        if not dists & (core_names | extra_names):
            problems.append(f"{where}: distribution {' or '.join(sorted(dists))} is in no dependency or extra")
        elif module_level and not dists & core_names:
            problems.append(f"{where} at module level, but {' or '.join(sorted(dists))} is only in an extra")
    return problems


def test_installed_versions_meet_the_dependencies():
    core, _ = requirements(project())
    assert core, "pyproject.toml declares no dependencies"
    problems = version_problems(core)
    assert not problems, "installed versions below pyproject.toml's floors:\n" + "\n".join(problems)


def test_every_imported_package_is_declared():
    core, extras = requirements(project())
    imports = third_party_imports(PACKAGE)
    assert {m for m, *_ in imports} >= {"torch", "transformers", "ray"}, "the import walk found too little"
    problems = declaration_problems(imports, core, extras, metadata.packages_distributions())
    assert not problems, "imports that pyproject.toml does not declare:\n" + "\n".join(problems)


def test_license_file_is_apache_2():
    proj = project()
    assert proj.get("license") == "Apache-2.0"
    for name in proj.get("license-files", ["LICENSE"]):
        path = ROOT / name
        assert path.is_file(), f"{name} (pyproject.toml's license-files) does not exist"
        text = path.read_text(encoding="utf-8")
        assert "Apache License" in text and "Version 2.0" in text, f"{name} is not the Apache License 2.0"
        assert "END OF TERMS AND CONDITIONS" in text, f"{name} is not the full license text"


# The checks themselves: each must fail on what it is there to catch.


def test_version_check_fails_on_an_unmet_floor():
    assert version_problems([Requirement("pytest>=999")]) == [
        f"pytest>=999: installed pytest {metadata.version('pytest')} does not satisfy >=999"
    ]
    assert version_problems([Requirement("no-such-distribution-distsft>=1")]) == [
        "no-such-distribution-distsft>=1: no-such-distribution-distsft is not installed"
    ]
    assert version_problems([Requirement("pytest>=999; python_version < '3'")]) == []  # marker: not for us


def test_declaration_check_names_an_undeclared_import(tmp_path):
    pkg = tmp_path / "distsft"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os\nimport yaml\nfrom distsft import sub\n")
    (pkg / "sub" / "__init__.py").write_text("def f():\n    import notdeclared.thing\n    from wandb import init\n")
    imports = third_party_imports(pkg)
    assert imports == [
        ("yaml", "distsft/__init__.py", 2, True),
        ("notdeclared", "distsft/sub/__init__.py", 2, False),
        ("wandb", "distsft/sub/__init__.py", 3, False),
    ]
    core, extras = [Requirement("pyyaml>=6")], {"wandb": [Requirement("wandb")]}
    assert declaration_problems(imports, core, extras, {"yaml": ["PyYAML"]}) == [
        "distsft/sub/__init__.py:2: import notdeclared: distribution notdeclared is in no dependency or extra"
    ]
    # yaml only in an extra, imported at module level
    assert declaration_problems(imports[:1], [], {"x": core}, {"yaml": ["PyYAML"]}) == [
        "distsft/__init__.py:2: import yaml at module level, but pyyaml is only in an extra"
    ]
