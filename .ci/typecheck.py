"""Run mypy over the fpdm package under its import names, with [tool.mypy] from pyproject.toml.

    python .ci/typecheck.py [MYPY OPTIONS]

The folders are not the import names (fpdm_core/ is `fpdm`, plugins/ is `fpdm.plugins`, ...: pyproject's
package-dir), and mypy cannot see through the import hook of setuptools' editable install, so a bare
`mypy fpdm_core` would name the modules `fpdm_core.*` and find no `fpdm`. This hands mypy every file of every
package setuptools installs, named as it is imported. Then it checks that each `# type: ignore[code]` says why
in a second comment on the same line (mypy itself insists on the code).
"""

from __future__ import annotations

import io
import re
import sys
import tokenize
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from mypy.build import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
# `# type: ignore[code]  # why`: the codes, then a second comment with at least one word
IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<codes>\[[^\]]*\])?(?P<rest>.*)")
REASON = re.compile(r"\s+#\s*\w")


def package_sources(pyproject: Path) -> list[BuildSource]:
    """Every .py file of every package in [tool.setuptools] packages, with its module name."""
    setup = tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["setuptools"]
    package_dir: dict[str, str] = setup["package-dir"]
    sources = []
    for package in setup["packages"]:
        # The longest mapped prefix owns a package: fpdm.plugins -> plugins/, fpdm.models -> fpdm_core/models.
        owner = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / package_dir[owner] / Path(*package[len(owner) :].split(".")[1:])
        for path in sorted(folder.glob("*.py")):
            module = package if path.stem == "__init__" else f"{package}.{path.stem}"
            sources.append(BuildSource(str(path.relative_to(ROOT)), module))
    return sources


def unexplained_ignores(paths: list[str]) -> list[str]:
    """`path:line: ...` for each type: ignore comment without its reason."""
    found = []
    for name in paths:
        text = (ROOT / name).read_text(encoding="utf-8")
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            match = IGNORE.search(tok.string) if tok.type == tokenize.COMMENT else None
            if match and not REASON.match(match["rest"]):
                found.append(
                    f"{name}:{tok.start[0]}: error: type: ignore without a reason: write `# type: ignore[code]  # why`"
                )
    return found


def main(argv: list[str]) -> int:
    # mypy wants a target on its command line; "-c pass" is an empty one, the real ones are the package's files.
    _, options = process_options([*argv, "--config-file", str(PYPROJECT), "-c", "pass"])
    sources = package_sources(PYPROJECT)
    try:
        messages = build(sources, options).errors
    except CompileError as exc:  # a syntax error or another blocking error stops mypy early
        print("\n".join(exc.messages))
        return 2
    messages += unexplained_ignores([s.path for s in sources if s.path])
    for line in messages:
        print(line)
    errors = sum(": error:" in line for line in messages)
    print(
        f"mypy: {errors} errors in {len(sources)} source files"
        if errors
        else f"mypy: no issues in {len(sources)} source files"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
