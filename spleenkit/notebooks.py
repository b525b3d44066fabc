"""Run the numbered notebooks with papermill under a profile, and strip their outputs for git.

A *profile* (``notebooks/profiles/<name>.yaml``) holds parameter overrides only: ``shared``
values (``data_dir``, ``runs_dir``, ...) given to every notebook whose ``parameters`` cell
declares them, and per-notebook values keyed by number or name, which a notebook must declare
(a typo is an error, not a silently ignored value). String values of keys ending in ``_dir``,
``_path``, ``_file`` or ``_folder`` are paths relative to the repository and are made absolute.

The runner executes each notebook with its working directory set to ``notebooks/`` (so the
notebooks' own relative defaults work), in a kernel that runs this very Python (so the kit it
imports is the one installed here), with ``SPLEENKIT_NONINTERACTIVE=1`` (no 3D viewer) and
``SPLEENKIT_STRICT_EXERCISES=1`` (an exercise check that is not answered correctly fails the
notebook, see :mod:`spleenkit.exercises`); every check's verdict is recorded in ``exercises.jsonl``
beside the executed copies.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spleenkit.environment import PeakMemory
from spleenkit.errors import BadInputError, NotebookRunError, first_line
from spleenkit.exercises import RESULTS_ENV, STRICT_ENV
from spleenkit.io import check_writable, write_json, write_text
from spleenkit.memory_cgroup import (
    JOIN_AND_EXEC,
    MIB,
    MemoryCgroup,
    cgroup_unavailable,
    drop_cached_libraries,
    parse_size,
)
from spleenkit.presets import FIELDS, lookup_preset, parse_value, resolve_preset

log = logging.getLogger(__name__)

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[a-z0-9_]+\.ipynb$")
KEEP_OUTPUT_TAG = "keep_output"
NBVAL_CHECK_TAG = "nbval-check-output"
PATH_SUFFIXES = ("_dir", "_path", "_file", "_folder")
PROFILE_KEYS = {"description", "shared", "notebooks", "execution_timeout"}
KERNEL_ENVIRONMENT = {"SPLEENKIT_NONINTERACTIVE": "1", STRICT_ENV: "1"}
EXERCISE_RESULTS_FILE = "exercises.jsonl"  # the exercise checks' verdicts, beside the executed copies

# Where the course lives on GitHub: the repository and the ref (a release tag, a branch or a commit) that the
# Colab and Binder badges open and that Colab's setup cell installs the kit from, one ref for both, so that a
# notebook never runs against another version of the library. The setting is [tool.spleenkit] in the
# checkout's pyproject.toml, and nowhere else; `spleenkit course badges --repo OWNER/NAME --ref REF` changes it
# and rewrites every badge and setup cell (spleenkit.course.set_course_home; tests/test_badges.py holds them).
HOME_TABLE = "[tool.spleenkit]"
HOME_KEYS = ("repository", "ref")
_HOME_LINE = re.compile(r'^(?P<key>[A-Za-z_]+)\s*=\s*"(?P<value>[^"]*)"\s*(?:#.*)?$')


@dataclass(frozen=True)
class CourseHome:
    """The GitHub ``repository`` (OWNER/NAME) and ``ref`` that badges open and Colab installs from."""

    repository: str
    ref: str


def home_table_span(text: str, path: Path) -> tuple[int, int]:
    """Start and end (character offsets) of the [tool.spleenkit] table's body in a pyproject.toml."""
    header = re.search(r"^\[tool\.spleenkit\]\s*$", text, re.MULTILINE)
    if header is None:
        raise BadInputError(f"{path}: no {HOME_TABLE} table naming the course's GitHub repository and ref")
    following = re.search(r"^\[", text[header.end():], re.MULTILINE)
    return header.end(), header.end() + following.start() if following else len(text)


def course_home(repo: str | os.PathLike[str] | None = None) -> CourseHome:
    """The course's GitHub home, read from ``[tool.spleenkit]`` (``repository`` and ``ref``, two plain strings) of
    the checkout's pyproject.toml (``repo``, default: :func:`find_repo`)."""
    path = (Path(repo) if repo else find_repo()) / "pyproject.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise BadInputError(f"{path}: cannot read the course's GitHub home ({error.strerror or error})") from None
    begin, end = home_table_span(text, path)
    values = {}
    for line in text[begin:end].splitlines():
        match = _HOME_LINE.match(line.strip())
        if match:
            values[match.group("key")] = match.group("value")
    missing = [key for key in HOME_KEYS if not values.get(key)]
    if missing:
        raise BadInputError(f"{path}: {HOME_TABLE} lacks {' and '.join(missing)} (e.g. repository = "
                            '"OWNER/NAME", ref = "v1.0")')
    return CourseHome(values["repository"], values["ref"])


def __getattr__(name: str) -> str:
    """``GITHUB_REPOSITORY`` and ``GITHUB_REF``: the current :func:`course_home`, read when asked for."""
    if name == "GITHUB_REPOSITORY":
        return course_home().repository
    if name == "GITHUB_REF":
        return course_home().ref
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def colab_url(notebook: str, folder: str = "notebooks", home: CourseHome | None = None) -> str:
    """The Open-in-Colab address of a notebook file name (e.g. ``01_data.ipynb``) in a folder of the repository."""
    home = home or course_home()
    return f"https://colab.research.google.com/github/{home.repository}/blob/{home.ref}/{folder}/{notebook}"


def binder_url(notebook: str, folder: str = "notebooks", home: CourseHome | None = None) -> str:
    """The Binder address that opens a notebook file name (in a folder of the repository) in JupyterLab."""
    home = home or course_home()
    return f"https://mybinder.org/v2/gh/{home.repository}/{home.ref}?labpath={folder}%2F{notebook}"


def badges_markdown(notebook: str, folder: str = "notebooks", home: CourseHome | None = None) -> str:
    """The Colab and Binder badges for the first cell of a notebook (``folder="student"`` for a student copy)."""
    home = home or course_home()
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(notebook, folder, home)}) "
            f"[![Binder](https://mybinder.org/badge_logo.svg)]({binder_url(notebook, folder, home)})")


def colab_install(home: CourseHome | None = None) -> str:
    """What Colab's setup cell installs: the core and ONNX export (notebook 07) from the course's repository and
    ref (Colab brings torch, Jupyter and widgets itself)."""
    home = home or course_home()
    return f"spleenkit[export] @ git+https://github.com/{home.repository}@{home.ref}"


def setup_cell_source(home: CourseHome | None = None) -> str:
    """The setup cell every notebook starts with: install the kit only on Colab, show the kit's progress lines
    (:func:`~spleenkit.environment.show_progress`), then :func:`~spleenkit.environment.colab_setup`."""
    return (
        "# Setup: on Google Colab install the kit first; elsewhere it is already installed (see the README).\n"
        "import sys\n\n"
        'if "google.colab" in sys.modules:\n'
        f'    %pip install -q "{colab_install(home)}"\n'
        "from spleenkit import colab_setup, show_progress\n\n"
        "show_progress()  # long cells show the kit's progress lines as they run\n"
        "on_colab = colab_setup()"
    )


# --------------------------------------------------------------------------- finding things
def find_repo(start: str | os.PathLike[str] | None = None) -> Path:
    """The repository root: the folder holding ``notebooks/profiles``, from ``start`` (default: here) upwards,
    else the checkout the kit is installed from."""
    here = Path(start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[1]]
    for folder in candidates:
        if (folder / "notebooks" / "profiles").is_dir():
            return folder
    raise BadInputError(f"no notebooks/profiles folder in the kit's checkout or in {here} and its parents; "
                        "run from a clone of the spleenkit repository")


def list_notebooks(notebook_dir: str | os.PathLike[str]) -> list[Path]:
    """The numbered notebooks (``NN_short_name.ipynb``) in ``notebook_dir``, in number order."""
    folder = Path(notebook_dir)
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))


def notebook_number(path: str | os.PathLike[str]) -> str:
    """The two-digit number of a notebook file name ("01" for ``01_data.ipynb``)."""
    match = NOTEBOOK_PATTERN.match(Path(path).name)
    if not match:
        raise BadInputError(f"{path}: not a numbered notebook (expected NN_short_name.ipynb)")
    return match.group(1)


def _key_matches(key: Any, path: Path) -> bool:
    if isinstance(key, int) and not isinstance(key, bool):  # YAML reads an unquoted 01 as the integer 1
        key = f"{key:02d}"
    key = str(key)
    if key.isdigit():
        return key.zfill(2) == notebook_number(path)
    return key in {path.name, path.stem}


def select_notebooks(notebooks: Sequence[Path], only: Iterable[str | int] | None) -> list[Path]:
    """The notebooks named in ``only`` (numbers like 1 or "01", or names), in number order; all when empty."""
    wanted = list(only or [])
    if not wanted:
        return list(notebooks)
    unknown = [w for w in wanted if not any(_key_matches(w, nb) for nb in notebooks)]
    if unknown:
        raise BadInputError(f"no notebook numbered or named {', '.join(map(str, unknown))}; "
                            f"have {', '.join(nb.name for nb in notebooks)}")
    return [nb for nb in notebooks if any(_key_matches(w, nb) for w in wanted)]


# --------------------------------------------------------------------------- profiles
def profile_path(profile: str, repo: Path) -> Path:
    """The YAML file of a profile name (or the given path when ``profile`` is a file)."""
    if profile.endswith((".yaml", ".yml")):
        return Path(profile)
    return repo / "notebooks" / "profiles" / f"{profile}.yaml"


def available_profiles(repo: Path) -> list[str]:
    """The profile names in ``notebooks/profiles``."""
    return sorted(p.stem for p in (repo / "notebooks" / "profiles").glob("*.yaml"))


def _resolve_paths(values: dict[str, Any], repo: Path) -> dict[str, Any]:
    resolved = {}
    for key, value in values.items():
        if isinstance(value, str) and key.endswith(PATH_SUFFIXES) and value and not Path(value).is_absolute():
            value = str((repo / value).resolve())
        resolved[key] = value
    return resolved


def load_profile(profile: str, repo: Path | None = None) -> dict[str, Any]:
    """Read and check a profile; paths in it are made absolute against the repository."""
    repo = repo or find_repo()
    path = profile_path(profile, repo)
    if not path.is_file():
        raise BadInputError(f"{path}: no such profile; known profiles: {', '.join(available_profiles(repo))}")
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:  # one line: what is wrong and where (PyYAML's own message quotes the text)
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise BadInputError(f"{path}: not valid YAML ({problem}{where})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path}: cannot read the profile ({first_line(error)})") from error
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a profile is a mapping with the keys {', '.join(sorted(PROFILE_KEYS))}")
    unknown = sorted(set(data) - PROFILE_KEYS)
    if unknown:
        raise BadInputError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(PROFILE_KEYS))}")
    shared = data.get("shared") or {}
    per_notebook = data.get("notebooks") or {}
    if not isinstance(shared, dict) or not isinstance(per_notebook, dict):
        raise BadInputError(f"{path}: 'shared' and 'notebooks' must be mappings")
    for key, values in per_notebook.items():
        if not isinstance(values, dict):
            raise BadInputError(f"{path}: the parameters of notebook {key!r} must be a mapping")
    return {
        "name": path.stem,
        "path": str(path),
        "description": data.get("description", ""),
        "execution_timeout": data.get("execution_timeout"),
        "shared": _resolve_paths(shared, repo),
        "notebooks": {key: _resolve_paths(values, repo) for key, values in per_notebook.items()},
    }


def notebook_parameters(notebook: Path, profile: dict[str, Any],
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The parameters a profile gives one notebook: the shared values it declares, then its own values. The recipe
    settings among them (``epochs``, ``patch_size``, a recipe name ...) go through the recipe's door with the
    notebook's defaults, so a bad value is refused before anything runs (:func:`check_recipe_parameters`)."""
    import papermill

    inspected = papermill.inspect_notebook(notebook)
    declared = set(inspected)
    parameters = {k: v for k, v in profile["shared"].items() if k in declared}
    own: dict[str, Any] = {}
    for key, values in profile["notebooks"].items():
        if _key_matches(key, notebook):
            own.update(values)
    missing = sorted(set(own) - declared)
    if missing:
        raise BadInputError(f"{profile['path']}: {notebook.name} has no parameter(s) {', '.join(missing)} "
                            f"in its parameters cell (it declares {', '.join(sorted(declared)) or 'none'})")
    parameters.update(own)
    parameters.update({k: v for k, v in (overrides or {}).items() if k in declared})
    defaults = {}
    for name, facts in inspected.items():
        with contextlib.suppress(ValueError, SyntaxError, TypeError):
            defaults[name] = ast.literal_eval(facts["default"])
    check_recipe_parameters({**defaults, **parameters})
    return parameters


def check_recipe_parameters(parameters: Mapping[str, Any]) -> None:
    """Put a notebook's recipe parameters through the recipe's door (:func:`~spleenkit.presets.resolve_preset`):
    ``preset`` and every ``*_preset`` must name a recipe, and the parameters named as recipe settings (``epochs``,
    ``patch_size``, ``amp`` ...; None: the recipe's own) must fit it, or the run stops here naming the value."""
    recipes = {name: value for name, value in parameters.items()
               if (name == "preset" or name.endswith("_preset")) and value is not None}
    for value in recipes.values():
        lookup_preset(value)
    settings = {name: value for name, value in parameters.items() if name in FIELDS}
    resolve_preset(recipes.get("preset", "seed"), flags=settings)


def read_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Overrides as values: text (``--set NAME=VALUE``) read by :func:`~spleenkit.presets.parse_value`, the one
    rule for text values."""
    return {key: parse_value(value) if isinstance(value, str) else value for key, value in (overrides or {}).items()}


def check_overrides(overrides: dict[str, Any], notebooks: Sequence[Path]) -> None:
    """Refuse an override no notebook to run declares in its parameters cell (a typo such as ``data_dri``
    would otherwise be dropped and the run would use the default), suggesting the closest declared name."""
    import difflib

    import papermill

    if not overrides:
        return
    declared: set[str] = set()
    for notebook in notebooks:
        declared |= set(papermill.inspect_notebook(notebook))
    for name in sorted(set(overrides) - declared):
        close = difflib.get_close_matches(name, sorted(declared), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise BadInputError(f"--set {name}: no notebook to run declares a parameter {name!r}; {hint}"
                            f"the parameters are {', '.join(sorted(declared)) or 'none'}")


# --------------------------------------------------------------------------- running
@dataclass
class NotebookResult:
    """What happened to one notebook: its status ("ok", "failed", "not run"), time, copy and error."""

    notebook: str
    status: str
    seconds: float = 0.0
    output: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    peak_mib: float | None = None  # the kernel's process tree at its largest (None: not measured here)
    # under a memory limit (a cgroup, as Binder enforces it): the group's highest charge (page cache included), the
    # charges that failed at the limit, and processes killed for memory; None without a limit
    cgroup_max_usage_mib: float | None = None
    cgroup_failcnt: int | None = None
    cgroup_resident_mib: float | None = None  # its highest memory that is not droppable file cache
    oom_kills: int | None = None


@dataclass
class RunSummary:
    """The outcome of one runner call, written as ``summary.json`` beside the executed copies."""

    profile: str
    output_dir: str
    python: str
    results: list[NotebookResult]
    seconds: float = 0.0
    # the memory limit asked for: {"limit_mib": ..., "applied": bool, "reason": why not applied}; None: none asked
    memory_limit: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """True when every selected notebook ran without error."""
        return all(r.status == "ok" for r in self.results)

    @property
    def failures(self) -> list[NotebookResult]:
        """The notebooks that failed."""
        return [r for r in self.results if r.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"profile": self.profile, "output_dir": self.output_dir, "python": self.python, "ok": self.ok,
                "seconds": round(self.seconds, 1), "memory_limit": self.memory_limit,
                "notebooks": [asdict(r) for r in self.results]}


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def describe_failure(notebook: str, error: BaseException) -> str:
    """A readable account of a failed notebook: the failing cell's source and the traceback without colours."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(error, PapermillExecutionError):
        source = "\n".join("    " + line for line in (error.source or "").splitlines())
        traceback = _ANSI.sub("", "\n".join(error.traceback or []))
        return f"{notebook} failed in cell {error.cell_index} (In [{error.exec_count}]):\n{source}\n{traceback}"
    return f"{notebook} failed: {type(error).__name__}: {_ANSI.sub('', str(error))}"


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def this_python_kernel(cgroup_procs: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """A kernel spec named ``python3`` that runs this interpreter, shadowing any other for the duration.

    Without it papermill may pick a ``python3`` kernel of another environment (a user-wide
    kernel spec, say), where the kit is missing or is another version. With ``cgroup_procs`` (a memory
    cgroup's ``cgroup.procs``, see :mod:`spleenkit.memory_cgroup`) each kernel joins that group before it
    starts, so the kernel and every process it starts live under the group's memory limit.
    """
    kernel = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    if cgroup_procs is not None:
        kernel = [sys.executable, "-c", JOIN_AND_EXEC, str(cgroup_procs), *kernel]
    with tempfile.TemporaryDirectory(prefix="spleenkit-kernel-") as folder:
        spec_dir = Path(folder) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        spec = {"argv": kernel, "display_name": "Python 3 (spleenkit)", "language": "python"}
        write_json(spec_dir / "kernel.json", spec, indent=1)
        jupyter_path = os.pathsep.join(p for p in (folder, os.environ.get("JUPYTER_PATH")) if p)
        with _environment({"JUPYTER_PATH": jupyter_path}):
            yield "python3"


def run_notebooks(profile: str = "quick", only: Iterable[str | int] | None = None,
                  out_dir: str | os.PathLike[str] | None = None, repo: str | os.PathLike[str] | None = None,
                  overrides: dict[str, Any] | None = None, kernel_name: str | None = None,
                  keep_going: bool = False, log_output: bool = False,
                  memory_limit: str | int | None = None) -> RunSummary:
    """Execute the numbered notebooks in order under a profile and write executed copies and ``summary.json``.

    ``overrides`` replace shared profile values (e.g. ``data_dir``) for the notebooks that declare
    them. After a failure the later notebooks are "not run" (they read earlier run folders) unless
    ``keep_going``. ``kernel_name`` None means a kernel running this Python. Each notebook's peak memory
    (its kernel and every process the kernel starts, see :class:`~spleenkit.environment.PeakMemory`) is
    recorded as ``peak_mib``: the figure to hold against a memory limit such as Binder's 2 GiB.

    ``memory_limit`` (``"1800M"``: Binder's 2 GiB less its Jupyter server) runs every kernel, with the processes
    it starts, inside a Linux memory cgroup with that limit, as Binder enforces it
    (:class:`~spleenkit.memory_cgroup.MemoryCgroup`): a notebook that does not fit is killed and fails, and each
    notebook's cgroup figures are recorded (``cgroup_resident_mib``, ``cgroup_max_usage_mib``, ``cgroup_failcnt``,
    ``oom_kills``; see :class:`~spleenkit.memory_cgroup.MemoryWindow`). Where
    no cgroup can be made (not root, no cgroup v1, not Linux, a named kernel) the notebooks run without the
    limit and ``summary.memory_limit["reason"]`` says why.
    """
    import papermill

    repo = Path(repo).resolve() if repo else find_repo()
    settings = load_profile(profile, repo)
    notebook_dir = repo / "notebooks"
    notebooks = select_notebooks(list_notebooks(notebook_dir), only)
    if not notebooks:
        raise BadInputError(f"{notebook_dir}: no numbered notebooks (NN_short_name.ipynb) to run")
    shared_overrides = _resolve_paths(read_overrides(overrides), repo)
    check_overrides(shared_overrides, notebooks)
    limit_bytes = None if memory_limit is None else parse_size(memory_limit)
    settings["shared"].update(shared_overrides)
    plan = [(nb, notebook_parameters(nb, settings, shared_overrides)) for nb in notebooks]  # check all first
    out = Path(out_dir).resolve() if out_dir else repo / "runs" / settings["name"] / "notebooks"
    check_writable(out)  # a file in its place, a read-only disk: one line, before any notebook runs

    summary = RunSummary(profile=settings["name"], output_dir=str(out), python=sys.executable, results=[])
    started = time.perf_counter()
    failed = False
    results_file = out / EXERCISE_RESULTS_FILE
    results_file.unlink(missing_ok=True)
    with contextlib.ExitStack() as stack:
        group = None
        if limit_bytes is not None:
            reason = "a named kernel (--kernel) starts outside the runner's control" if kernel_name else \
                cgroup_unavailable()
            summary.memory_limit = {"limit_mib": round(limit_bytes / MIB, 1), "applied": reason is None,
                                    "reason": reason}
            if reason:
                log.warning("memory limit of %.0f MiB not applied: %s", limit_bytes / MIB, reason)
            else:
                group = stack.enter_context(MemoryCgroup(limit_bytes))
        kernel = _named_kernel(kernel_name) if kernel_name else \
            this_python_kernel(group.procs_file if group else None)
        name = stack.enter_context(kernel)
        stack.enter_context(_environment({**KERNEL_ENVIRONMENT, RESULTS_ENV: str(results_file)}))
        for notebook, parameters in plan:
            result = NotebookResult(notebook=notebook.name, status="not run", parameters=parameters)
            summary.results.append(result)
            if failed and not keep_going:
                continue
            output = out / notebook.name
            log.info("running %s with %s", notebook.name, parameters or "its defaults")
            if group is not None:
                group.start_window()
                drop_cached_libraries(sys.prefix, sys.base_prefix)  # charged to the kernel's group when loaded
            tick = time.perf_counter()
            # the kernel and what it starts (torchrun), not the runner; with a limit, the group's resident memory too
            memory = PeakMemory(include_root=False, also=group.sample if group is not None else None)
            try:
                with memory:
                    papermill.execute_notebook(
                        str(notebook), str(output), parameters=parameters, cwd=str(notebook_dir), kernel_name=name,
                        progress_bar=False, log_output=log_output, execution_timeout=settings["execution_timeout"],
                    )
                result.status = "ok"
            except Exception as error:  # noqa: BLE001 - any failure is reported per notebook, not raised mid-run
                result.status = "failed"
                result.error = describe_failure(notebook.name, error)
                failed = True
                log.error("%s failed (%s: %s)", notebook.name, type(error).__name__, getattr(error, "ename", ""))
            result.seconds = round(time.perf_counter() - tick, 1)
            result.peak_mib = memory.peak_mib
            if group is not None:
                window = group.end_window()
                result.cgroup_max_usage_mib, result.cgroup_failcnt = window.max_usage_mib, window.failcnt
                result.cgroup_resident_mib, result.oom_kills = window.resident_mib, window.oom_kills
                if window.oom_kills and result.error:
                    result.error = (f"{notebook.name}: {window.oom_kills} process(es) killed for memory (OOM) at the "
                                    f"limit of {window.limit_mib:.0f} MiB\n{result.error}")
            result.output = str(output) if output.exists() else None
            log.info("%s: %s in %.1f s, peak memory %s MiB%s", notebook.name, result.status, result.seconds,
                     result.peak_mib, "" if group is None else
                     f", memory cgroup: {result.cgroup_resident_mib} MiB resident, {result.cgroup_max_usage_mib} MiB "
                     f"charged at most, {result.oom_kills} OOM kill(s)")
    summary.seconds = time.perf_counter() - started
    write_summary(summary)
    return summary


@contextmanager
def _named_kernel(name: str) -> Iterator[str]:
    yield name


def write_summary(summary: RunSummary) -> Path:
    """Write ``summary.json`` into the output folder (atomically) and return its path."""
    return write_json(Path(summary.output_dir) / "summary.json", summary.to_dict())


def _cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name and its bfloat16 instructions, read without PyTorch (the runner never loads it)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown CPU"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}
    model = " ".join(fields.get("model name", "unknown CPU").split())
    flags = set(fields.get("flags", "").split())
    extras = [flag.upper() for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return f"{model}, {os.cpu_count()} cores" + (f" ({', '.join(extras)})" if extras else "")


def memory_record(summary: RunSummary) -> dict[str, Any]:
    """What the course outline's memory table is made from: each notebook's peak (kernel and children, every page
    counted once), and under a memory limit the cgroup's highest charge and OOM kills, with the machine and date."""
    return {
        "measured": time.strftime("%Y-%m-%d"),
        "profile": summary.profile,
        "cpu": _cpu_model(),
        "memory_limit_mib": (summary.memory_limit or {}).get("limit_mib") if (summary.memory_limit or {}).get(
            "applied") else None,
        "notebooks": {r.notebook: {"status": r.status, "peak_mib": r.peak_mib,
                                   "cgroup_resident_mib": r.cgroup_resident_mib,
                                   "cgroup_max_usage_mib": r.cgroup_max_usage_mib,
                                   "cgroup_failcnt": r.cgroup_failcnt, "oom_kills": r.oom_kills}
                      for r in summary.results},
    }


def format_table(results: Sequence[NotebookResult]) -> str:
    """A plain-text table of notebook / status / seconds / peak MiB, with a total line (and the largest peak);
    under a memory limit also the cgroup's highest resident memory and highest charge, and its OOM kills."""
    width = max([len("notebook"), *(len(r.notebook) for r in results)])
    limited = any(r.cgroup_max_usage_mib is not None for r in results)

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    def largest(values: Iterable[float | None]) -> float | None:
        present = [value for value in values if value is not None]
        return max(present) if present else None

    def extra(row: NotebookResult | None) -> str:
        if not limited:
            return ""
        if row is None:  # the total line
            return (f"  {mib(largest(r.cgroup_resident_mib for r in results)):>15}  "
                    f"{mib(largest(r.cgroup_max_usage_mib for r in results)):>16}  "
                    f"{sum(r.oom_kills or 0 for r in results):>3}")
        return (f"  {mib(row.cgroup_resident_mib):>15}  {mib(row.cgroup_max_usage_mib):>16}  "
                f"{'-' if row.oom_kills is None else row.oom_kills:>3}")

    head = f"  {'cgroup resident':>15}  {'cgroup max usage':>16}  {'OOM':>3}" if limited else ""
    rule = f"  {'-' * 15}  {'-' * 16}  {'-' * 3}" if limited else ""
    lines = [f"{'notebook':<{width}}  {'status':<8}  {'seconds':>8}  {'peak MiB':>8}{head}",
             f"{'-' * width}  {'-' * 8}  {'-' * 8}  {'-' * 8}{rule}"]
    lines += [f"{r.notebook:<{width}}  {r.status:<8}  {r.seconds:>8.1f}  {mib(r.peak_mib):>8}{extra(r)}"
              for r in results]
    lines.append(f"{'total':<{width}}  {'':<8}  {sum(r.seconds for r in results):>8.1f}  "
                 f"{mib(largest(r.peak_mib for r in results)):>8}{extra(None)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- outputs in git
def keeps_output(cell: dict[str, Any]) -> bool:
    """True for a cell whose outputs stay in git: tagged ``keep_output`` or with nbstripout's ``keep_output: true``."""
    metadata = cell.get("metadata", {})
    return KEEP_OUTPUT_TAG in metadata.get("tags", []) or bool(metadata.get("keep_output"))


def unkept_outputs(notebook: Any) -> list[int]:
    """Indices of code cells holding outputs or execution counts that are not marked to be kept."""
    return [index for index, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" and not keeps_output(cell)
            and (cell.get("outputs") or cell.get("execution_count"))]


_RUN_METADATA = ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime")


def strip_notebook(notebook: Any) -> bool:
    """Remove outputs, execution counts and run metadata except from cells marked to keep; True if changed.

    A kept cell keeps its execution count as well: nbval takes a cell without one for never run.
    """
    before = repr(notebook)
    for key in ("papermill", "widgets", "toc"):
        notebook.metadata.pop(key, None)
    for cell in notebook.cells:
        for key in _RUN_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        if keeps_output(cell):  # nbval compares only cells with an execution count: keep it too
            continue
        cell.outputs = []
        cell.execution_count = None
    return repr(notebook) != before


def strip_notebooks(paths: Iterable[str | os.PathLike[str]], check: bool = False) -> list[Path]:
    """Strip each notebook file in place (or, with ``check``, only report); returns the files that needed it."""
    import nbformat

    changed = []
    for path in map(Path, paths):
        if not path.is_file():
            raise BadInputError(f"{path}: no such notebook")
        try:
            notebook = nbformat.read(path, as_version=4)
        except Exception as error:  # noqa: BLE001 - nbformat raises several kinds for a broken file
            raise BadInputError(f"{path}: not a readable notebook ({error})") from error
        if strip_notebook(notebook):
            changed.append(path)
            if not check:
                write_notebook(notebook, path)
    return changed


def write_notebook(notebook: Any, path: str | os.PathLike[str]) -> Path:
    """Write a notebook as ``nbformat.write`` formats it, through the kit's atomic writer."""
    import nbformat

    text = nbformat.writes(notebook)
    return write_text(path, text if text.endswith("\n") else text + "\n")


def notebooks_with_kept_outputs(notebook_dir: str | os.PathLike[str]) -> list[Path]:
    """The numbered notebooks that hold at least one kept output (these are the ones nbval compares)."""
    import nbformat

    found = []
    for path in list_notebooks(notebook_dir):
        notebook = nbformat.read(path, as_version=4)
        if any(keeps_output(cell) and cell.get("outputs") for cell in notebook.cells):
            found.append(path)
    return found


def refresh_kept_outputs(path: str | os.PathLike[str], kernel_name: str | None = None) -> list[int]:
    """Execute a notebook with its default parameters (as nbval will) and store the new outputs of its kept cells.

    Run it after changing what a kept cell shows (the synthetic generator, say); the other cells
    stay stripped. Returns the indices of the cells whose outputs were stored.
    """
    import nbformat
    import papermill

    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="spleenkit-refresh-") as folder:
        executed_path = Path(folder) / path.name
        kernel = this_python_kernel() if kernel_name is None else _named_kernel(kernel_name)
        with kernel as name, _environment(KERNEL_ENVIRONMENT):
            try:
                papermill.execute_notebook(str(path), str(executed_path), cwd=str(path.parent), kernel_name=name,
                                           progress_bar=False)
            except Exception as error:  # noqa: BLE001 - shown as the notebook's failure
                raise NotebookRunError(describe_failure(path.name, error)) from error
        executed = {cell.get("id"): cell for cell in nbformat.read(executed_path, as_version=4).cells}
    notebook = nbformat.read(path, as_version=4)
    stored = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and keeps_output(cell):
            twin = executed.get(cell.get("id"))
            if twin is None or twin.source != cell.source:
                raise BadInputError(f"cell {index} was not found in the executed copy", path)
            cell.outputs = twin.outputs
            cell.execution_count = twin.execution_count
            stored.append(index)
    strip_notebook(notebook)
    write_notebook(notebook, path)
    return stored


def notebook_title(path: str | os.PathLike[str]) -> str:
    """The first heading of a notebook's first markdown cell (its title)."""
    import nbformat

    notebook = nbformat.read(Path(path), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
            break
    return Path(path).stem


def require_ok(summary: RunSummary) -> None:
    """Raise :class:`NotebookRunError` with every failure's account when a run did not succeed."""
    if not summary.ok:
        raise NotebookRunError("\n\n".join(r.error or r.notebook for r in summary.failures))
