"""Every document and section the README, the docs and the code cite exists in docs/, and the output
schema in docs/design.md lists every run.h5 column with the unit the file stores."""

import re
from pathlib import Path

import pytest

from mpi_afl.storage.runlog.schema import COLUMN_DOCS, TABLES
from mpi_helpers import REPO

DOCS = REPO / "docs"


def sources() -> list[Path]:
    files = [REPO / "README.md", *DOCS.glob("*.md"), *REPO.glob("bench/*.md"), *REPO.glob("bench/*.py")]
    for pattern in ("mpi_afl/**/*.py", "mpi_afl/presets/*.toml", "tests/*.py", "examples/*.py", "jobs/*"):
        files += REPO.glob(pattern)
    return [f for f in files if f.is_file()]


def headings(doc: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")]


# docs/<name>.md, then optional section numbers (§3.1, "§3.3/§3.5", "§3.1 and §3.4"), then an optional
# "Title" (it may be cut by a line break in a comment: then the part on the line is a prefix).
CITATION = re.compile(r'docs/(\w+)\.md((?:\s*(?:,|/|and)?\s*§\d+(?:\.\d+)*)*)(?:\s+"([^"\n]+)("?))?')
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")
LINK = re.compile(r"\]\((\w+\.md)(?:#([\w-]+))?\)")   # relative links inside docs/


def citations() -> list[tuple[str, str, str | None, str | None, bool]]:
    """(where, doc, section number, title, title complete) for every citation."""
    found = []
    for path in sources():
        text = path.read_text()
        where = str(path.relative_to(REPO))
        for m in CITATION.finditer(text):
            numbers = SECTION.findall(m.group(2)) or [None]
            for number in numbers:
                found.append((where, m.group(1), number, m.group(3), bool(m.group(4))))
        if path.parent == DOCS:
            for m in LINK.finditer(text):
                found.append((where, m.group(1)[:-3], None, m.group(2), True))
    return found


def test_citations_are_found():
    cited = citations()
    assert len(cited) > 50   # the scan works: the code cites the docs all over
    assert {doc for _, doc, _, _, _ in cited} == {"algorithms", "design", "extending"}


@pytest.mark.parametrize("where, doc, number, title, complete", citations())
def test_cited_doc_and_section_exist(where, doc, number, title, complete):
    path = DOCS / f"{doc}.md"
    assert path.is_file(), f"{where} cites docs/{doc}.md, which does not exist"
    titles = headings(path)
    if number is not None:
        assert any(re.match(rf"{re.escape(number)}[. ]", h) for h in titles), \
            f"{where} cites docs/{doc}.md §{number}; sections: {titles}"
    if title is not None:
        wanted = title.strip().lower()
        anchors = {re.sub(r"[^\w -]", "", h.lower()).replace(" ", "-") for h in titles}
        ok = any(h.lower() == wanted or (not complete and h.lower().startswith(wanted)) for h in titles) \
            or wanted in anchors
        assert ok, f"{where} cites docs/{doc}.md {title!r}; sections: {titles}"


def test_no_citation_of_the_old_names():
    old = re.compile(r"(?<![\w/])(ALGORITHMS|DESIGN)\.md")
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in sources()
                 for n, line in enumerate(p.read_text().splitlines(), 1) if old.search(line)]
    assert not offenders, f"cite docs/algorithms.md or docs/design.md instead: {offenders}"


def test_design_lists_every_column_with_its_unit():
    text = (DOCS / "design.md").read_text()
    for table, fields in TABLES.items():
        assert f"**`{table}`**" in text, table
        for column, dtype in fields:
            unit = COLUMN_DOCS[table][column][0] or "-"
            assert re.search(rf"\| `{column}` \| {re.escape(dtype)} \| {re.escape(unit)} \|", text), (table, column)


def _design_table(start: str, end: str) -> list[list[str]]:
    """The rows of the table in docs/design.md between the texts `start` and `end`: cells, backticks removed."""
    text = (DOCS / "design.md").read_text()
    part = text[text.index(start):text.index(end, text.index(start))]
    return [[cell.strip().strip("`") for cell in line.strip("|").split("|")]
            for line in part.splitlines() if re.match(r"^\| `", line)]


@pytest.mark.mpi
@pytest.mark.slow
def test_summary_json_schema_matches_real_summaries(tmp_path):
    """A FedRevive run in one process and a FedEcho run under mpiexec with workers and a distillation group
    (distill.ranks=1): every key they write (top level, the objects in evals / ranks / workers / distill_ranks,
    algorithm_stats) is in docs/design.md's tables, every `always` key is in both summaries, and every listed
    key, optional ones included, is written by one of them."""
    from mpi_helpers import FAST, launch, summary
    small = [*FAST, "--distill.ngf=8", "--distill.nz=16", "--distill.synth_batch=16", "--distill.kd_steps=2",
             "--distill.kd_batch=8", "--distill.freeze_versions=2", "--distill.warmup_versions=4",
             "--server.buffer_size=1", "--max-versions", "12"]
    summaries = []
    for ranks, algorithm, group in ((1, "fedrevive", 0), (4, "fedecho", 1)):
        out = tmp_path / algorithm
        proc = launch(ranks, [*small, "--algorithm", algorithm, f"--distill.ranks={group}", "--out", str(out)])
        assert proc.returncode == 0, proc.stderr
        summaries.append(summary(out))
    keys = _design_table("**summary.json**", "The objects in the lists")
    fields = _design_table("The objects in the lists", "`algorithm_stats` holds only")
    stats = _design_table("`algorithm_stats` holds only", "**Throughput.**")
    assert len(keys) > 20 and all(len(row) == 4 and row[2] for row in keys + stats)   # key, unit, present, meaning

    written = set().union(*(s.keys() for s in summaries))
    assert written == {row[0] for row in keys}, (written - {row[0] for row in keys}, {row[0] for row in keys} - written)
    for s in summaries:
        assert {row[0] for row in keys if row[2] == "always"} <= s.keys()
    for name in sorted({row[0] for row in fields}):
        entries = [entry for s in summaries for entry in s.get(name, [])]
        documented = {row[1] for row in fields if row[0] == name}
        assert entries and all(set(entry) == documented for entry in entries), (name, documented, entries[:1])
    assert {row[0] for row in fields} == {row[0] for row in keys if row[0] in ("evals", "ranks", "workers",
                                                                               "distill_ranks")}
    reported = set().union(*(s["algorithm_stats"].keys() for s in summaries))
    assert reported == {row[0] for row in stats}, (reported ^ {row[0] for row in stats})
    assert [r["role"] for r in summaries[1]["ranks"]] == ["server", "distil", "worker", "worker"]
    assert "workers" not in summaries[0] and "distill_ranks" not in summaries[0]   # one process: optional keys


def test_user_facing_files_speak_of_the_software_not_its_development_history():
    """README, docs/, experiments/, bench/, examples/ and the package's code and comments say what the software
    does and what the measurements show, never which work session or tracker issue produced them."""
    files = [REPO / "README.md", *(p for top in ("docs", "experiments", "bench", "examples", "mpi_afl")
                                   for p in (REPO / top).rglob("*") if p.is_file())]
    pattern = re.compile(r"\bsessions?\b|\bissue[ _-]?[0-9]", re.IGNORECASE)
    found = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if pattern.search(rel):
            found.append(f"{rel}: file name")
        if path.suffix not in (".md", ".py", ".toml", ".sh", ".sbatch", ".txt", ".jsonl"):
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, "development history in user-facing files:\n" + "\n".join(found)
