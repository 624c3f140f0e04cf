"""The docs stay true: README.md and every docs/*.md page are checked against the code they describe.

What a docs writer can rely on (and must keep to):
- Links: every relative link and image (`[t](path#anchor)`, `<img src=...>`) names a file or folder that exists;
  an `#anchor` must be a heading of the target page (GitHub's slugs). Links inside code are not links.
- Shell blocks (```bash, ```sh, ```console): every line that starts with `fpdm ` (after an optional `$ ` and
  `VAR=value` prefixes; a trailing backslash continues the line) is parsed by the real parser,
  `fpdm.apps.cli.build_parser()`, WITHOUT running. The command ends at the first shell operator (`|`, `;`,
  `&&`, `>`, ...) or `#` comment. A command holding `...` is a sketch and is skipped. Deprecated spellings
  fail.
- Python blocks: a block fenced ```python run is executed; the run blocks of one page share one namespace, in
  order, like a notebook, in a temporary working folder where `runs/demo` is a tiny trained FPDM (8x8 gray
  images, classes "Bag" and "Sneaker", CPU, seconds). Every other python block is compiled only.
- Names: every `fpdm.x.y` in inline code or a python block resolves (a module or an attribute); every
  `make TARGET` is a target of the Makefile.
- TOML blocks parse. README.md stays at most 200 lines; each benchmark table has its markers in one docs page.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>```+)(?P<info>[^`]*)$")
SHELL = {"bash", "sh", "console", "shell"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
OPERATORS = {"|", "||", "&", "&&", ";", ";;", "<", ">", ">>", "<<", "(", ")", ">&", "<&", "|&"}


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path) -> list[tuple[str, int, str]]:
    """(info string, first line number, dedented text) of every fenced block of a page."""
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, ticks, start = len(match["indent"]), match["ticks"], i + 1
        body, i = [], i + 1
        while i < len(lines) and not (lines[i].strip() == ticks and lines[i].startswith(match["indent"])):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        found.append((match["info"].strip(), start + 1, "\n".join(body) + "\n"))
        i += 1
    return found


def outside_fences(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced blocks."""
    out, ticks = [], ""
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if match and (not ticks or line.strip() == ticks):
            ticks = "" if ticks else match["ticks"]
        elif not ticks:
            out.append((number, line))
    return out


def prose(page: Path) -> list[tuple[int, str]]:
    """outside_fences with inline code spans blanked: what a reader sees as text and links."""
    return [(number, re.sub(r"`[^`]*`", "``", line)) for number, line in outside_fences(page)]


# ------------------------------------------------------------------------------------------------ (a) links

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    names = set()
    for _, line in outside_fences(page):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match[1])
            count = seen.get(base, 0)
            names.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return names


def links(page: Path) -> list[tuple[int, str]]:
    return [(number, m[1] or m[2]) for number, line in prose(page) for m in LINK.finditer(line)]


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
    broken = []
    for number, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...: not ours to check offline
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{rel(page)}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{rel(page)}:{number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_links_and_skips_code():
    assert slug("Export to ONNX and sample with ONNX Runtime") == "export-to-onnx-and-sample-with-onnx-runtime"
    assert slug("`fpdm.load(path)`: what it accepts") == "fpdmloadpath-what-it-accepts"
    line = 'see [a](docs/x.md#y), `[b](no.md)` and <img src="p.png" width="4">'
    assert [m[1] or m[2] for m in LINK.finditer(re.sub(r"`[^`]*`", "``", line))] == ["docs/x.md#y", "p.png"]


# ---------------------------------------------------------------------------------- (b) fpdm command lines


def command_lines(page: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after `fpdm`) of every fpdm command in the page's shell blocks."""
    found = []
    for info, first, text in blocks(page):
        if info.split(" ")[0] not in SHELL:
            continue
        joined, start = "", first
        for offset, raw in enumerate(text.splitlines()):
            if not joined:
                start = first + offset
            line = raw.rstrip()
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            joined, command = "", (joined + line).strip()
            if command.startswith("$ "):
                command = command[2:]
            lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)  # the comment is gone: `# -> out/ ...` does not make a sketch
            if any("..." in token for token in tokens):
                continue
            while tokens and ENV_ASSIGNMENT.match(tokens[0]):
                tokens.pop(0)
            if not tokens or tokens[0] != "fpdm":
                continue
            argv = []
            for token in tokens[1:]:
                if token in OPERATORS:
                    break
                argv.append(token)
            found.append((start, argv))
    return found


COMMANDS = [pytest.param(argv, id=f"{rel(page)}:{number}") for page in PAGES for number, argv in command_lines(page)]


@pytest.mark.parametrize("argv", COMMANDS)
def test_every_documented_fpdm_command_parses(argv):
    from fpdm.apps.cli import build_parser

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:  # --help / --version exit 0; a bad flag exits 2 with argparse's line
            code = exc.code
    assert code == 0, f"`fpdm {shlex.join(argv)}` does not parse: {err.getvalue().strip()}"
    assert "deprecated" not in err.getvalue(), f"`fpdm {shlex.join(argv)}`: {err.getvalue().strip()}"


def test_the_command_scanner_reads_prefixes_continuations_and_operators(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "```bash\n$ fpdm sample runs/demo --n 4 > log  # four\n"
        "FPDM_LOAD_PLUGINS= fpdm plugins\nfpdm eval runs/demo \\\n    --n 8 | tail -1\n"
        "fpdm train ...\nfpdm solve  # see ...\nmake demo\n```\n```python\nfpdm --not-shell\n```\n"
    )
    assert command_lines(page) == [
        (2, ["sample", "runs/demo", "--n", "4"]),
        (3, ["plugins"]),
        (4, ["eval", "runs/demo", "--n", "8"]),
        (7, ["solve"]),
    ]


# ------------------------------------------------------------------------------------------ (c) python blocks


def python_blocks(*, run: bool) -> list:
    params = []
    for page in PAGES:
        chosen = [
            (first, text)
            for info, first, text in blocks(page)
            if info.split(" ")[0] in ("python", "py") and (info.split()[1:2] == ["run"]) is run
        ]
        if run and chosen:
            params.append(pytest.param(page, chosen, id=rel(page)))
        elif not run:
            params += [pytest.param(page, first, text, id=f"{rel(page)}:{first}") for first, text in chosen]
    return params


@pytest.mark.parametrize(("page", "first", "text"), python_blocks(run=False))
def test_every_python_block_compiles(page, first, text):
    compile(text, f"{rel(page)}:{first}", "exec")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny trained FPDM standing in for `make demo`'s runs/demo: classes Bag and Sneaker, 8x8 gray."""
    import torch
    from PIL import Image

    from fpdm.config import load_config
    from fpdm.training.loop import train

    root = tmp_path_factory.mktemp("docs-run")
    gen = torch.Generator().manual_seed(0)
    for label, level in (("Bag", 200), ("Sneaker", 60)):
        (root / "images" / label).mkdir(parents=True)
        for i in range(8):
            pixels = (level + 30 * torch.randn(8, 8, generator=gen)).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / "images" / label / f"{i}.png")
    config = load_config(
        overrides=[
            "model.arch=FPDM-XS/2",
            "model.hidden_size=32",
            "model.num_heads=2",
            "solver.max_iter=2",
            "data.name=image_folder",
            f"data.path={json.dumps(str(root / 'images'))}",
            "data.image_size=8",
            "train.batch_size=8",
            "train.steps=2",
            "train.log_every=1",
            "train.ckpt_every=2",
            "train.no_grad_iters=[0, 1]",
            "train.grad_iters=[1, 1]",
            f"train.out_dir={json.dumps(str(root / 'run'))}",
        ]
    )
    train(config, progress=False)
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize(("page", "chosen"), python_blocks(run=True))
def test_python_run_blocks_run_against_a_tiny_trained_run(page, chosen, demo_run, tmp_path, monkeypatch):
    shutil.copytree(demo_run, tmp_path / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for first, text in chosen:
        try:
            exec(compile(text, f"{rel(page)}:{first}", "exec"), namespace)  # the docs' own examples, nothing else
        except Exception as exc:
            raise AssertionError(f"{rel(page)}:{first}: {type(exc).__name__}: {exc}") from exc


def test_readme_three_line_example_is_tagged_to_run():
    chosen = [text for info, _, text in blocks(ROOT / "README.md") if info.split() == ["python", "run"]]
    assert chosen and 'fpdm.load("runs/demo")' in chosen[0], "README's first python block must be ```python run"


# ------------------------------------------------------------------------------------------ (d) fpdm names

DOTTED = re.compile(r"(?<![\w./-])fpdm(?:\.[A-Za-z_]\w*)+")
NOT_NAMES = {"fpdm.cli"}  # the CLI's entry-point group, not a module


def dotted_names(page: Path) -> list[tuple[int, str]]:
    """`fpdm.x.y` names in the page's inline code and python blocks."""
    found = [
        (number, m[0])
        for number, line in outside_fences(page)
        for span in re.findall(r"`([^`]*)`", line)
        for m in DOTTED.finditer(span)
    ]
    for info, first, text in blocks(page):
        if info.split(" ")[0] in ("python", "py"):
            found += [(first + i, m[0]) for i, line in enumerate(text.splitlines()) for m in DOTTED.finditer(line)]
    return [(number, name) for number, name in found if name not in NOT_NAMES]


def resolve(name: str) -> object:
    """The object a dotted name reaches: attributes first, else the module of that name."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


def test_the_name_checker_resolves_modules_and_attributes_and_refuses_the_rest(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("`fpdm.models.vae` and `fpdm.load(path)`, not fpdm.nowhere\n```python\nfpdm.testing.cases\n```\n")
    assert dotted_names(page) == [(1, "fpdm.models.vae"), (1, "fpdm.load"), (3, "fpdm.testing.cases")]
    assert callable(resolve("fpdm.load")) and resolve("fpdm.models.vae").__name__ == "fpdm.models.vae"
    with pytest.raises(ImportError):
        resolve("fpdm.models.nowhere")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_fpdm_name_the_docs_mention_exists(page):
    missing = []
    for number, name in dotted_names(page):
        try:
            resolve(name)
        except ImportError:
            missing.append(f"{rel(page)}:{number}: {name}")
    assert not missing, "\n".join(missing)


def make_targets(page: Path) -> list[tuple[int, str]]:
    """`make TARGET` in the page's inline code and shell blocks."""
    pattern = re.compile(r"(?<![\w-])make ([A-Za-z][\w-]*)")
    found = [
        (number, m[1])
        for number, line in outside_fences(page)
        for span in re.findall(r"`([^`]*)`", line)
        for m in pattern.finditer(span)
    ]
    for info, first, text in blocks(page):
        if info.split(" ")[0] in SHELL:
            found += [(first + i, m[1]) for i, line in enumerate(text.splitlines()) for m in pattern.finditer(line)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_make_target_the_docs_mention_exists(page):
    targets = set(re.findall(r"^([A-Za-z][\w-]*)\s*:", (ROOT / "Makefile").read_text(), flags=re.M))
    missing = [f"{rel(page)}:{number}: make {name}" for number, name in make_targets(page) if name not in targets]
    assert not missing, "\n".join(missing)


# ------------------------------------------------------------------------------------------- the rest


@pytest.mark.parametrize(
    ("page", "first", "text"),
    [
        pytest.param(page, first, text, id=f"{rel(page)}:{first}")
        for page in PAGES
        for info, first, text in blocks(page)
        if info.split(" ")[0] == "toml"
    ],
)
def test_every_toml_block_parses(page, first, text):
    tomllib.loads(text)


def test_readme_is_at_most_200_lines():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


BENCH_PAGES = {
    "solvers": "benchmarks.md",
    "train": "benchmarks.md",
    "sampling": "benchmarks.md",
    "sampling-allocation": "benchmarks.md",
    "export": "benchmarks.md",
    "cli_start": "benchmarks.md",
    "gpu_check": "benchmarks.md",
    "quality_per_compute": "benchmarks.md",
    "paper_claims": "paper-claims.md",
}


@pytest.mark.parametrize(("marker", "page"), BENCH_PAGES.items())
def test_each_benchmark_table_has_its_markers_in_one_docs_page(marker, page):
    start, end = f"<!-- bench:{marker} -->", f"<!-- /bench:{marker} -->"
    holders = [rel(p) for p in PAGES if start in p.read_text(encoding="utf-8")]
    assert holders == [f"docs/{page}"], holders
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    assert text.count(start) == text.count(end) == 1 and text.index(start) < text.index(end)


def test_update_doc_replaces_only_the_text_between_its_markers(tmp_path):
    spec = importlib.util.spec_from_file_location("_report", ROOT / "benchmarks" / "_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)  # benchmarks/ is scripts, not a package
    update_doc = report.update_doc
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "intro\n<!-- bench:a -->\nold\n<!-- /bench:a -->\nread\n<!-- bench:b -->\nkeep\n<!-- /bench:b -->\n"
    )
    update_doc("a", "| new |\n", docs=tmp_path)
    assert page.read_text() == (
        "intro\n<!-- bench:a -->\n| new |\n<!-- /bench:a -->\nread\n<!-- bench:b -->\nkeep\n<!-- /bench:b -->\n"
    )
    with pytest.raises(SystemExit, match="no <!-- bench:c -->"):
        update_doc("c", "x\n", docs=tmp_path)
