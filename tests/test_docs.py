"""Every path, module, command, option and make target that README.md and docs/ cite exists (a newcomer follows
them literally, and a rename that forgets the docs fails here instead of in a reader's shell)."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import typer
import yaml
from typer.core import TyperCommand, TyperGroup

from geodiff4d.cluster.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("core", "datasets", "gen", "recon", "eval", "cluster", "configs")
TOP_LEVEL = (*PACKAGES, "bench", "docs", "tests", "scripts", ".ci")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE_PATH = re.compile(r"`((?:{})/[^`\s]*)`".format("|".join(re.escape(t) for t in TOP_LEVEL)))
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# `geodiff4d SUB ...` anywhere in a snippet (also `.venv/bin/geodiff4d SUB`), not `geodiff4d.x` or `geodiff4d:tag`
# geodiff4d, its own flags (``--wait-for-autoscaler``), then the subcommand
COMMAND = re.compile(r"(?<![\w.:-])geodiff4d(?![\w./-])((?:\s+--[a-z][\w-]*)*)(?:\s+([a-z][\w-]*))?")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
MAKE = re.compile(r"(?<![\w/.-])make\s+([a-z][\w-]*)")
MAKE_RULE = re.compile(r"^([A-Za-z][\w-]*)\s*:(?!=)", re.M)
MODULE = re.compile(r"(?:geodiff4d\.)?((?:{})(?:\.\w+)+)(?:\(.*\))?".format("|".join(PACKAGES)))
FROM_IMPORT = re.compile(r"from geodiff4d\.([\w.]+) import (\w+(?: as \w+)?(?:, \w+(?: as \w+)?)*)")
PACKAGE_ROW = re.compile(r"^\|\s*`geodiff4d\.(\w+)`\s*\|(.*)$", re.M)
MODULE_FILE = re.compile(r"`([\w/]+\.py)`")


def _mentioned(doc: Path) -> list[tuple[str, Path]]:
    text = doc.read_text()
    found = [(m, doc.parent / m) for m in LINK.findall(text) if not re.match(r"[a-z]+://|mailto:", m)]
    found += [(m, ROOT / m) for m in CODE_PATH.findall(text)]
    return found


def _exists(path: Path) -> bool:
    """A file or folder, or a glob pattern (``bench/bench_*.py``) that matches one."""
    return path.exists() or ("*" in str(path) and any(ROOT.glob(str(path.relative_to(ROOT)))))


def code_snippets(text: str) -> list[str]:
    """Each line of the fenced code blocks (backslash continuations joined) and each inline code span."""
    lines = [line for block in FENCE.findall(text) for line in block.replace("\\\n", " ").splitlines()]
    return lines + INLINE.findall(FENCE.sub("", text))


def cited_commands(text: str, commands: set[str]) -> list[tuple[str, list[str]]]:
    """(subcommand, options written after it) for every command a snippet cites: ``geodiff4d SUB --opt ...``,
    or an inline span that starts with a known subcommand (``pack --flame FILE``). Options between
    ``geodiff4d`` and the subcommand are options of ``geodiff4d`` itself, cited as subcommand ``""``."""
    cited = []
    for snippet in code_snippets(text):
        matches = list(COMMAND.finditer(snippet))
        first = snippet.split(maxsplit=1)[0] if snippet.strip() else ""
        if not matches and first in commands and "--" in snippet:
            cited.append((first, OPTION.findall(snippet.split(" #")[0])))
        for match in matches:
            rest = COMMAND.split(snippet[match.end() :], maxsplit=1)[0]  # up to the next command
            rest = re.split(r" #|&&|;|\|\s", rest)[0]
            own, sub = OPTION.findall(match.group(1)), match.group(2)
            if own:  # a bare ``geodiff4d ...`` names no command: nothing to check
                cited.append(("", own if sub else [*own, *OPTION.findall(rest)]))
            if sub:
                cited.append((sub, OPTION.findall(rest)))
    return cited


def cli_options() -> dict[str, set[str]]:
    """Every registered subcommand -> its option names (``""``: the app's own options), from the click app."""
    group = typer.main.get_command(app)

    def names(command: TyperCommand | TyperGroup) -> set[str]:
        return {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o[:2] == "--"}

    return {"": names(group)} | {name: names(command) for name, command in group.commands.items()}


def wrong_commands(text: str, options: dict[str, set[str]]) -> list[str]:
    """Cited subcommands the app does not register and options their command does not take."""
    wrong = []
    for sub, cited in cited_commands(text, set(options) - {""}):
        if sub not in options:
            wrong.append(f"geodiff4d {sub}")
        else:
            wrong += [
                f"geodiff4d {sub} {option}".replace("  ", " ")
                for option in cited
                if option not in options[sub]
            ]
    return wrong


def wrong_make_targets(text: str, targets: set[str]) -> list[str]:
    return [f"make {t}" for snippet in code_snippets(text) for t in MAKE.findall(snippet) if t not in targets]


@cache
def make_targets() -> frozenset[str]:
    return frozenset(MAKE_RULE.findall((ROOT / "Makefile").read_text()))


def _bound_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body binds (defs, classes, assignments, imports) -> their node."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id: node for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0]: node for a in node.names}
    return names


@cache
def _module_names(module: Path) -> dict[str, ast.AST]:
    return _bound_names(ast.parse(module.read_text()).body)


def resolves(dotted: str, root: Path = ROOT) -> bool:
    """``pkg.module.name[.member]`` names a module under `root` and, if given, a top-level name in it (and a
    member of that class)."""
    path, parts = root, dotted.split(".")
    while parts and (path / parts[0]).is_dir():
        path = path / parts.pop(0)
    if parts and (path / f"{parts[0]}.py").is_file():
        module = path / f"{parts.pop(0)}.py"
    else:
        module = path / "__init__.py"
    if not module.is_file() or not parts:
        return module.is_file() and path != root
    node = _module_names(module).get(parts[0])
    if node is None or len(parts) == 1:
        return node is not None
    return isinstance(node, ast.ClassDef) and parts[1] in _bound_names(node.body)


def wrong_modules(text: str, root: Path = ROOT) -> list[str]:
    """Dotted module references in inline code (``core.runtime.connect(address)``) and names imported in
    code (``python -c "from geodiff4d.eval.inputs import open_ground_truth"``) that do not resolve."""
    spans = [s for s in INLINE.findall(text) if not re.search(r"\.(ya?ml|py|md|json|npz|png)$", s)]
    cited = [m.group(1) for s in spans if (m := MODULE.fullmatch(s.removeprefix("geodiff4d.")))]
    for module, names in FROM_IMPORT.findall("\n".join(code_snippets(text))):
        cited += [f"{module}.{name.split(' as ')[0]}" for name in names.split(", ")]
    return [dotted for dotted in cited if not resolves(dotted, root)]


def wrong_package_modules(text: str, root: Path = ROOT) -> list[str]:
    """Module files (``jobs.py``, ``io/atomic.py``) a package table row (``| `geodiff4d.core` | ...``) lists
    that are not in that package."""
    return [
        f"{package}/{name}"
        for package, row in PACKAGE_ROW.findall(text)
        for name in MODULE_FILE.findall(row)
        if not (root / package / name).is_file()
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_mentioned_paths_exist(doc):
    missing = [text for text, path in _mentioned(doc) if "{" not in text and not _exists(path.resolve())]
    assert not missing, f"{doc.name} mentions paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_commands_options_and_make_targets_exist(doc):
    text = doc.read_text()
    wrong = wrong_commands(text, cli_options()) + wrong_make_targets(text, make_targets())
    assert not wrong, f"{doc.name} cites commands, options or make targets that do not exist: {wrong}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_cited_modules_exist(doc):
    text = doc.read_text()
    wrong = wrong_modules(text) + wrong_package_modules(text)
    assert not wrong, f"{doc.name} cites modules that do not exist: {wrong}"


def _spec_paths(node: object, key: str = "") -> list[str]:
    """The file and folder values of a generate spec (``run``, ``image``, ``tracking``, ``shards``...)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _spec_paths(v, k)]
    if isinstance(node, list):
        return [p for v in node for p in _spec_paths(v, key)]
    path_keys = ("run", "image", "tracking", "cameras_json", "shards", "video", "nersemble")
    return [node] if isinstance(node, str) and key in path_keys else []


def test_example_generate_spec_inputs_are_shipped_or_made_by_the_tutorial():
    """configs/generate.yaml's inputs exist in the checkout or are written under tut/ by a tutorial command that
    comes before the tutorial's generate step (it once named a photo that nothing shipped or made)."""
    spec = ROOT / "configs" / "generate.yaml"
    tutorial = (ROOT / "docs" / "tutorial.md").read_text()
    snippets = code_snippets(tutorial)
    step = next(i for i, s in enumerate(snippets) if "generate configs/generate.yaml" in s)
    before = "\n".join(snippets[:step])
    unmade = []
    for value in _spec_paths(yaml.safe_load(spec.read_text())):
        path = (spec.parent / value).resolve()
        if path.exists() and not path.is_relative_to(ROOT / "tut"):
            continue
        made = (
            path.is_relative_to(ROOT / "tut") and f"tut/{path.relative_to(ROOT / 'tut').parts[0]}" in before
        )
        if not made:
            unmade.append(value)
    assert not unmade, f"{spec.name} needs inputs that neither ship nor a tutorial step writes: {unmade}"


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    for name in ("architecture.md", "formats.md", "metrics.md", "tutorial.md", "benchmark.md", "cluster.md"):
        assert (ROOT / "docs" / name).is_file(), name
        assert f"docs/{name}" in readme, f"README does not link docs/{name}"


def test_checkers_find_what_the_docs_cite():
    """The extraction sees commands in fenced blocks (continued lines, comments cut), inline spans and
    spans that start with a subcommand, so an empty result above means something."""
    text = (
        "```bash\n.venv/bin/geodiff4d pack --out S \\\n    --workers 2   # then --not-an-option\n"
        "make demo\n```\nRun `geodiff4d --version`, `verify S --workers 1` or `make lint`."
    )
    commands = set(cli_options()) - {""}
    assert cited_commands(text, commands) == [("pack", ["--out", "--workers"]), ("", ["--version"]),
                                              ("verify", ["--workers"])]  # fmt: skip
    assert wrong_commands(text, cli_options()) == [] and wrong_make_targets(text, make_targets()) == []
    assert {"setup", "test", "test-cluster", "demo", "lint"} <= make_targets()


def test_checkers_fail_on_wrong_citations(tmp_path):
    """Each check flags a deliberately wrong example: an unknown subcommand, an option its command lacks, an
    unknown app option, a make target the Makefile lacks, a module or name that moved, a package table entry."""
    text = (
        "```bash\ngeodiff4d synthesize --out D\ngeodiff4d pack --out S --frames 3\n```\n"
        "`geodiff4d --colour`, `recon --steps 3`, `make deploy`, `cluster.runtime.connect(address)`, "
        "`core.jobs.no_such_function`, `core.errors.UserError.no_such_member`.\n"
        "```bash\npython -c 'from geodiff4d.eval.inputs import open_ground_truth as g, open_truth'\n```\n"
        "| `geodiff4d.core` | base | `jobs.py`, `io/atomic.py`, `config_files.py` |\n"
    )
    assert wrong_commands(text, cli_options()) == [
        "geodiff4d synthesize",
        "geodiff4d pack --frames",
        "geodiff4d --colour",
        "geodiff4d recon --steps",
    ]
    assert wrong_make_targets(text, make_targets()) == ["make deploy"]
    assert wrong_modules(text) == [
        "cluster.runtime.connect",
        "core.jobs.no_such_function",
        "core.errors.UserError.no_such_member",
        "eval.inputs.open_truth",
    ]
    assert wrong_package_modules(text) == ["core/config_files.py"]
    right = "`core.runtime.connect(address)`, `geodiff4d.core.jobs`, `core.errors.UserError.exit_code`"
    assert wrong_modules(right) == []
