"""Course assignments: exercise regions in the real source, a student version, a grader.

The format (see book/src/appendix-teaching.md). An exercise is one region of a Rust file, a whole
function body or a whole expression, between two comment lines:

    // EXERCISE(ch01-layernorm-backward, points = 10): the hint the student sees
    // TESTS: -p kernels --lib -- ops::layernorm::tests::backward_matches_finite_differences
    ...the solution, which CI builds and tests every day...
    // WRONG(forgets the mean term): `(dnorm - dnorm_mean - norm * dnorm_norm_mean)` -> `(dnorm - norm * dnorm_norm_mean)`
    ...
    // END EXERCISE

- TESTS (one line or more) is what `cargo test --release` is given to run the tests that grade
  the exercise: a package and target selection, `--`, then test-name filters (substrings, as
  libtest matches them).
- NEEDS (optional, one line after the TESTS lines) names the exercises whose code the tests
  also run: chapter 3's tests run on thread ranks, whose all-reduce is chapter 2's ring. A wrong
  answer of a needed exercise may fail this one too (a student's broken ring breaks chapter 3).
- WRONG is a plausible wrong answer: in the nearest code line above it, replace the first
  fragment (which must occur there exactly once) by the second. Each fragment must be a whole
  expression, or whole statements ending in `;`, or nothing: the check compiles them in as
  `({ if on { new } else { old } })`, so a fragment cut across an operator (`a - b` out of
  `a - b * c`) changes the solution too, and the check then fails. Its exercise's tests must fail
  on it, and no other exercise's tests may, but those of the exercises that NEED it
  (scripts/check-assignments checks both).

The student version replaces every region's solution by `todo!("hint")`, keeping the two header
lines, so that it compiles and each exercise's tests fail by reaching the todo!.

This file is the library behind scripts/make-student, scripts/grade and scripts/check-assignments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANT_ENV = "SCALE_MUTANT"

HEADER = re.compile(r"^(?P<indent>\s*)// EXERCISE\((?P<name>[a-z0-9][a-z0-9-]*), points = (?P<points>\d+)\): (?P<hint>.+)$")
TESTS = re.compile(r"^\s*// TESTS: (?P<spec>.+)$")
NEEDS = re.compile(r"^\s*// NEEDS: (?P<names>[a-z0-9 -]+)$")
WRONG = re.compile(r"^\s*// WRONG\((?P<label>[^)]+)\): `(?P<old>[^`]+)` -> `(?P<new>[^`]*)`\s*$")
END = re.compile(r"^\s*// END EXERCISE\s*$")


class FormatError(Exception):
    pass


@dataclass
class Wrong:
    id: str  # "exercise/k", the value of SCALE_MUTANT that turns it on
    label: str
    line: int  # 0-based index of the code line it changes
    old: str
    new: str


@dataclass
class Exercise:
    name: str
    points: int
    hint: str
    file: Path  # relative to the repository root
    start: int  # 0-based index of the EXERCISE line
    end: int  # 0-based index of the END EXERCISE line
    indent: str
    tests: list[tuple[str, list[str]]] = field(default_factory=list)  # (cargo selection, filters)
    wrongs: list[Wrong] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)  # exercises whose code its tests also run

    def body_start(self) -> int:
        """The first line after the header (EXERCISE, TESTS and NEEDS lines)."""
        return self.start + 1 + len(self.tests) + (1 if self.needs else 0)


def source_files(repo: Path) -> list[Path]:
    """The repository's files (relative paths): git's view if it has one, else a walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=repo, capture_output=True, check=True,
        ).stdout.decode()
        return sorted({Path(p) for p in out.split("\0") if p and (repo / p).is_file()})
    except (subprocess.CalledProcessError, FileNotFoundError):
        skip = {".git", "target"}
        found = []
        for dirpath, dirs, files in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in skip]
            found += [Path(dirpath, f).relative_to(repo) for f in files]
        return sorted(found)


def parse_file(repo: Path, rel: Path) -> list[Exercise]:
    lines = (repo / rel).read_text().splitlines()
    found: list[Exercise] = []
    current: Exercise | None = None
    for i, line in enumerate(lines):
        where = f"{rel}:{i + 1}"
        if m := HEADER.match(line):
            if current:
                raise FormatError(f"{where}: EXERCISE inside exercise {current.name}")
            current = Exercise(m["name"], int(m["points"]), m["hint"].strip(), rel, i, -1, m["indent"])
        elif current is None:
            if END.match(line) or TESTS.match(line) or NEEDS.match(line) or WRONG.match(line):
                raise FormatError(f"{where}: outside any EXERCISE region")
            if "// EXERCISE" in line:
                raise FormatError(f"{where}: malformed EXERCISE line (want `// EXERCISE(name, points = N): hint`)")
        elif m := TESTS.match(line):
            if i != current.body_start():
                raise FormatError(f"{where}: TESTS lines must follow the EXERCISE line")
            selection, sep, filters = m["spec"].partition(" -- ")
            if not sep or not filters.split():
                raise FormatError(f"{where}: TESTS wants `<cargo selection> -- <test filters>`")
            current.tests.append((selection.strip(), filters.split()))
        elif m := NEEDS.match(line):
            if i != current.body_start() or not current.tests or current.needs:
                raise FormatError(f"{where}: one NEEDS line, right after the TESTS lines")
            current.needs = m["names"].split()
        elif m := WRONG.match(line):
            target = i - 1
            while target > current.start and (not lines[target].strip() or lines[target].strip().startswith("//")):
                target -= 1
            if lines[target].count(m["old"]) != 1:
                raise FormatError(f"{where}: `{m['old']}` must occur exactly once in line {target + 1}")
            k = len(current.wrongs) + 1
            current.wrongs.append(Wrong(f"{current.name}/{k}", m["label"], target, m["old"], m["new"]))
        elif END.match(line):
            if not current.tests:
                raise FormatError(f"{where}: exercise {current.name} has no TESTS line")
            current.end = i
            found.append(current)
            current = None
        elif "// WRONG" in line:
            raise FormatError(f"{where}: malformed WRONG line (want // WRONG(label): `old` -> `new`)")
    if current:
        raise FormatError(f"{rel}:{current.start + 1}: exercise {current.name} has no END EXERCISE")
    return found


def find_exercises(repo: Path = ROOT) -> list[Exercise]:
    exercises = []
    for rel in source_files(repo):
        if rel.suffix == ".rs" and "// EXERCISE" in (repo / rel).read_text(errors="replace"):
            exercises += parse_file(repo, rel)
    names = [e.name for e in exercises]
    if dupes := {n for n in names if names.count(n) > 1}:
        raise FormatError(f"exercise names used twice: {sorted(dupes)}")
    for e in exercises:
        if unknown := [n for n in e.needs if n not in names or n == e.name]:
            raise FormatError(f"{e.file}:{e.start + 1}: {e.name} NEEDS unknown exercises {unknown}")
    return sorted(exercises, key=lambda e: e.name)


def needing(name: str, exercises: list[Exercise]) -> set[str]:
    """The exercises that NEED `name`, directly or through others: a wrong answer of `name` may
    fail them too."""
    found: set[str] = set()
    frontier = {name}
    while frontier:
        frontier = {e.name for e in exercises if frontier & set(e.needs)} - found
        found |= frontier
    return found


def rust_string(text: str) -> str:
    """`text` as the literal format string of todo!: quotes, backslashes and braces escaped."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("{", "{{").replace("}", "}}")
    return f'"{escaped}"'


def student_lines(lines: list[str], e: Exercise) -> list[str]:
    header = lines[e.start : e.body_start()]
    return header + [f"{e.indent}todo!({rust_string(e.hint)})", lines[e.end]]


def mutant_line(line: str, w: Wrong) -> str:
    """The line with `w` switched on at run time: `{ if SCALE_MUTANT == id { new } else { old } }`.

    A fragment ending in `;` is a statement, anything else an expression (then parenthesised)."""
    test = f'std::env::var_os("{MUTANT_ENV}").is_some_and(|m| m == "{w.id}")'
    swap = f"{{ if {test} {{ {w.new} }} else {{ {w.old} }} }}"
    return line.replace(w.old, swap if w.old.rstrip().endswith(";") else f"({swap})")


def write_tree(repo: Path, out: Path, mode: str, apply: str | None = None) -> list[Exercise]:
    """Copies `repo` to `out` with every exercise region rewritten.

    mode "student": the solution becomes todo!(hint). mode "mutants": every WRONG answer is
    compiled in, off unless SCALE_MUTANT names it. mode "wrong": only WRONG `apply`, as plain text
    (what a student who made that mistake would have written)."""
    exercises = find_exercises(repo)
    if mode == "wrong" and apply not in {w.id for e in exercises for w in e.wrongs}:
        raise FormatError(f"no wrong answer {apply!r}")
    if out.exists() and any(out.iterdir()):
        raise FormatError(f"{out} exists and is not empty")
    by_file: dict[Path, list[Exercise]] = {}
    for e in exercises:
        by_file.setdefault(e.file, []).append(e)
    for rel in source_files(repo):
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel not in by_file:
            shutil.copy2(repo / rel, dest)
            continue
        text = (repo / rel).read_text()
        lines = text.splitlines()
        for e in sorted(by_file[rel], key=lambda e: e.start, reverse=True):
            if mode == "student":
                lines[e.start : e.end + 1] = student_lines(lines, e)
            for w in e.wrongs:
                if mode == "mutants":
                    lines[w.line] = mutant_line(lines[w.line], w)
                elif mode == "wrong" and w.id == apply:
                    lines[w.line] = lines[w.line].replace(w.old, w.new)
        dest.write_text("\n".join(lines) + ("\n" if text.endswith("\n") else ""))
        shutil.copymode(repo / rel, dest)
    return exercises


def workspace_target_names(repo: Path) -> set[str]:
    """The names, as they appear in artifact file names, of the workspace's packages and targets."""
    out = subprocess.run(["cargo", "metadata", "--no-deps", "--format-version", "1"], cwd=repo, capture_output=True, text=True, check=True).stdout
    names = set()
    for package in json.loads(out)["packages"]:
        names.add(package["name"].replace("-", "_"))
        names |= {t["name"].replace("-", "_") for t in package["targets"]}
    return names


def seed_target_dir(main: Path, dest: Path, workspace: set[str], profile: str = "release") -> None:
    """Gives `dest` the dependencies' artifacts of `main`, so that a build there compiles only the
    workspace's crates. Artifacts are hard links (no copy); fingerprints are copied, since cargo
    rewrites those in place. The workspace's own artifacts are left out: cargo names them by crate
    name and relative path, the same in every copy of the repository, so a copy building into
    `main` itself would overwrite ours with its own."""

    def ours(name: str) -> bool:
        stem = name.split(".")[0].rsplit("-", 1)[0]
        return stem in workspace or stem.replace("-", "_") in workspace or (stem.startswith("lib") and stem[3:] in workspace)

    for sub, link in [("deps", True), ("build", True), (".fingerprint", False)]:
        source = main / profile / sub
        if not source.is_dir():
            continue
        (dest / profile / sub).mkdir(parents=True, exist_ok=True)
        for entry in source.iterdir():
            target = dest / profile / sub / entry.name
            if ours(entry.name) or target.exists():
                continue
            if entry.is_dir():
                shutil.copytree(entry, target, symlinks=True, copy_function=os.link if link else shutil.copy2)
            elif link:
                os.link(entry, target)
            else:
                shutil.copy2(entry, target)


# --- running tests -------------------------------------------------------------------------------

RESULT = re.compile(r"^test (?P<name>\S+) \.\.\. (?P<result>ok|FAILED|ignored)", re.M)
FAILURE_BLOCK = re.compile(r"^---- (?P<name>\S+) stdout ----$(?P<body>.*?)(?=^---- |^failures:$|^test result:)", re.M | re.S)


@dataclass
class TargetRun:
    """One `cargo test` of one selection: every test's result and, for failures, its output."""

    results: dict[str, str]
    failures: dict[str, str]
    error: str | None  # why no test ran (a build error, a timeout), else None


def first_failure_line(output: str) -> str:
    """The message of the first panic in a test's output (the line after `panicked at`)."""
    lines = output.strip().splitlines()
    for i, line in enumerate(lines):
        if "panicked at" in line:
            message = line.split("panicked at", 1)[1].split(":", 3)[-1].strip()
            return message or (lines[i + 1].strip() if i + 1 < len(lines) else line.strip())
    return lines[0].strip() if lines else "failed"


def run_target(repo: Path, selection: str, filters: list[str], env: dict[str, str], timeout: int) -> TargetRun:
    cmd = ["cargo", "test", "--release", *selection.split(), "--no-fail-fast", "--", *filters]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        return TargetRun({}, {}, f"timed out after {timeout} s: cargo test {selection}")
    results = {m["name"]: m["result"] for m in RESULT.finditer(log)}
    failures = {m["name"]: m["body"] for m in FAILURE_BLOCK.finditer(log)}
    error = None
    if not results and proc.returncode != 0:
        lines = log.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("error")), None)
        if first is None:
            error = f"cargo test {selection} failed: {lines[-1] if lines else 'no output'}"
        else:
            where = next((line.strip()[4:] for line in lines[first + 1 : first + 4] if line.strip().startswith("--> ")), "")
            error = f"did not build: {lines[first]}" + (f" at {where}" if where else "")
    return TargetRun(results, failures, error)


def matches(test: str, filters: list[str]) -> bool:
    return any(f in test for f in filters)


@dataclass
class Grade:
    exercise: Exercise
    passed: bool
    tests: dict[str, str]  # test name -> ok / FAILED
    failure: str | None  # the first failure line

    def as_json(self) -> dict:
        e = self.exercise
        return {
            "exercise": e.name, "points": e.points, "score": e.points if self.passed else 0,
            "passed": self.passed, "tests": self.tests, "failure": self.failure,
            "file": str(e.file), "line": e.start + 1,
        }


def grade(repo: Path, exercises: list[Exercise], env: dict[str, str] | None = None, timeout: int = 900) -> list[Grade]:
    """Runs the tests of `exercises` in `repo`, one `cargo test` per distinct selection."""
    env = dict(os.environ if env is None else env)
    env.setdefault("CARGO_TERM_COLOR", "never")
    selections: dict[str, list[str]] = {}
    for e in exercises:
        for selection, filters in e.tests:
            selections.setdefault(selection, [])
            selections[selection] += [f for f in filters if f not in selections[selection]]
    runs = {s: run_target(repo, s, filters, env, timeout) for s, filters in selections.items()}
    grades = []
    for e in exercises:
        tests: dict[str, str] = {}
        failure = None
        for selection, filters in e.tests:
            run = runs[selection]
            if run.error:
                failure = failure or run.error
                continue
            mine = {t: r for t, r in run.results.items() if matches(t, filters) and r != "ignored"}
            if not mine:
                failure = failure or f"no test matched {' '.join(filters)} in cargo test {selection}"
            tests.update(mine)
            for t, r in sorted(mine.items()):
                if r == "FAILED" and failure is None:
                    failure = f"{t}: {first_failure_line(run.failures.get(t, ''))}"
        grades.append(Grade(e, failure is None, tests, failure))
    return grades


def print_table(grades: list[Grade], out=sys.stdout) -> None:
    width = max([len("exercise")] + [len(g.exercise.name) for g in grades])
    print(f"{'exercise':<{width}}  points  result  first failure", file=out)
    for g in grades:
        score = f"{g.exercise.points if g.passed else 0}/{g.exercise.points}"
        result = "passed" if g.passed else "FAILED"
        failure = (g.failure or "")[:160]
        print(f"{g.exercise.name:<{width}}  {score:>6}  {result:<6}  {failure}".rstrip(), file=out)
    earned = sum(g.exercise.points for g in grades if g.passed)
    total = sum(g.exercise.points for g in grades)
    print(f"{'total':<{width}}  {f'{earned}/{total}':>6}", file=out)
