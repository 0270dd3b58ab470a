"""Each method declares its options once (methods/options.py): `options()`, `tokenfuse methods` and the
checks of given values come from that declaration. Method files say what they are without measured
figures, and README's table against the authors' code has a row for every method."""

import ast
import re
from pathlib import Path

import pytest
from rich.text import Text

import tokenfuse.methods
from tokenfuse.cli.tables import methods_table
from tokenfuse.methods import available, make
from tokenfuse.methods.options import declared

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("token", "visual")
EVERY = [(kind, name) for kind in KINDS for name in available(kind)]


@pytest.mark.parametrize("kind", KINDS)
def test_tokenfuse_methods_shows_every_declared_option_with_its_type_and_default(kind):
    table = methods_table(kind)
    names = list(table.columns[0].cells)
    cells = dict(zip(names, (Text.from_markup(c).plain for c in table.columns[-1].cells), strict=True))
    assert names == list(available(kind))
    for name, cls in available(kind).items():
        options = declared(cls)
        assert options, name
        shown = [f"{o.name}: {o.type_name} = {o.spec.default!r}" for o in options.values()]
        assert cells[name] == ", ".join(shown)  # every option, nothing else
        assert all(o.type_name and ":" in s for o, s in zip(options.values(), shown, strict=True))


def test_engine_options_are_shown_and_recorded_for_every_token_method():
    table = methods_table()
    cells = dict(zip(table.columns[0].cells, table.columns[-1].cells, strict=True))
    for name, cls in available().items():
        assert {"keep", "schedule", "prop_attn", "track_source", "static", "min_tokens"} <= set(declared(cls))
        assert (
            "track_source: bool = False, static: bool = False, min_tokens: int | None = None" in cells[name]
        )
        assert make(name, track_source=True).options()["track_source"] is True


@pytest.mark.parametrize(("kind", "name"), EVERY)
def test_options_are_the_declaration_with_defaults_filled(kind, name):
    cls = available(kind)[name]
    defaults = {n: o.spec.default for n, o in declared(cls).items()}
    assert make(name, kind=kind).options() == defaults
    assert make(name, kind=kind, **defaults).options() == defaults  # every declared name is accepted


@pytest.mark.parametrize(("kind", "name"), EVERY)
def test_an_unknown_option_is_refused_naming_the_options_there_are(kind, name):
    first = next(iter(declared(available(kind)[name])))
    with pytest.raises(TypeError, match=rf"{re.escape(name)} has no option 'nope'; its options: {first}.*"):
        make(name, kind=kind, nope=1)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("mctf", {"queries": 0}, "mctf: queries must be a whole number >= 1 (queries the attention"),
        ("mctf", {"bidirectional": 1}, "mctf: bidirectional must be true or false"),
        ("tome", {"similarity": "key"}, "tome: similarity must be one of 'hidden' | 'keys'"),
        ("pitome", {"margin": 1.0}, "pitome: margin must be a number in [-1, 1) or None"),
        ("zero-tprune", {"iterations": 2.5}, "zero-tprune: iterations must be a whole number >= 1 or None"),
        ("transforming", {"temperature": float("nan")}, "transforming: temperature must be a number >= 0"),
    ],
)
def test_a_bad_value_is_refused_from_the_declaration_naming_option_range_and_value(name, options, message):
    value = repr(next(iter(options.values())))
    with pytest.raises(ValueError, match=re.escape(message) + rf".*\), got {re.escape(value)}$"):
        make(name, **options)


def test_an_int_given_for_a_float_option_is_held_as_a_float():
    assert make("mctf", tau_info=3).options()["tau_info"] == 3.0
    assert isinstance(make("mctf", tau_info=3).tau_info, float)


# Docstrings may name numbers the method uses (option defaults, constants in its code), the
# paper's settings, versions (LLaVA-1.5) and arXiv ids; measured figures (cosines, accuracies,
# speedups, differences to the authors' code) are decimals or percentages that are none of these.
# Whole numbers (layers, token counts, years) are not checked: figures are rarely whole.
PAPER_CONSTANTS = {
    "pitome.py": {"0.25"},  # the authors' text code's margin_drop
    "divprune.py": {"0.098"},  # the reference's default pruning ratio
    "aim.py": {"0.1"},  # the reference's PageRank temperature
    "sparsevlm.py": {"1e-6"},  # the noise the reference adds to its densities
}
NUMBER = re.compile(r"(?<![\w.\-])(\d+\.\d+(?:e-?\d+)?|\d+e-\d+|\d+(?:\.\d+)?%)")
VERSION_OR_ARXIV = re.compile(r"[A-Za-z]-?\d+\.\d+|\b\d{4}\.\d{4,5}(?:v\d+)?\b|v\d+\.\d+")


def method_files() -> list[Path]:
    package = Path(tokenfuse.methods.__file__).parent
    return sorted([*package.glob("*.py"), *(package / "vlm").glob("*.py")])


def allowed_numbers(path: Path, tree: ast.Module) -> set[float]:
    """The numbers a module's code holds: literals, and its classes' declared defaults."""
    out = {
        float(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float)
    }
    module = f"tokenfuse.methods.{'vlm.' if path.parent.name == 'vlm' else ''}{path.stem}"
    for kind in KINDS:
        for cls in available(kind).values():
            if cls.__module__ == module:
                for option in declared(cls).values():
                    if isinstance(option.spec.default, int | float):
                        out.add(float(option.spec.default))
    out |= {round(v, 4) for v in out}
    return out


@pytest.mark.parametrize("path", method_files(), ids=lambda p: p.name)
def test_no_method_docstring_carries_measured_figures(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    assert "tokenfuse bench" not in doc and "measured" not in doc.lower(), "figures belong in README"
    allowed = allowed_numbers(path, tree)
    figures = []
    for match in NUMBER.finditer(VERSION_OR_ARXIV.sub("", doc)):
        text = match.group(1)
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        if text not in PAPER_CONSTANTS.get(path.name, ()) and round(value, 4) not in allowed:
            figures.append(text)
    assert not figures, f"{path.name}'s docstring carries figures {figures}: move them to README"


def test_the_figure_heuristic_catches_a_measured_figure():
    path = method_files()[0]
    doc = "On MiniLM the cosine to the full model is 0.936 (keys 0.728), 93.5 % on BBC."
    found = [m.group(1) for m in NUMBER.finditer(VERSION_OR_ARXIV.sub("", doc))]
    assert found == ["0.936", "0.728", "93.5"]
    assert not {0.936, 0.728, 93.5} & allowed_numbers(path, ast.parse(""))
    assert [m.group(1) for m in NUMBER.finditer("keeps 50% of LLaVA-1.5's tokens")] == ["50%"]


def test_readme_compares_every_method_with_its_authors_code():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Methods") :]
    section = section[: section.index("\n## ", 1)]
    header = (
        "| method | authors' repository and commit | what was compared | largest difference | "
        "stated deviations |"
    )
    assert header in section
    rows = section[section.index(header) :].split("\n\n")[0].splitlines()[2:]
    named = {name for row in rows for name in re.findall(r"`([\w-]+)`", row.split("|")[1])}
    assert {name for _, name in EVERY} <= named
    assert all(len(row.split("|")) == 7 for row in rows)  # five cells each
