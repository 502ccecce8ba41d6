"""Job specs: a YAML file names a job (screening, nightly, training, shift) and its inputs.

A spec is the same pipeline with different inputs, so one spec runs on a laptop
(`rbcbatch run-job SPEC`) or on a Ray cluster (`rbcbatch submit SPEC --address http://HEAD:8265`,
which `rbcbatch.jobs.submit` does; a KubeRay RayJob; a nightly CronJob). Specs are checked
against `job_schema()` (published as `schemas/job.schema.json`) before anything runs, and a bad
one is refused with the JSON path of the field at fault. A spec never holds a secret: storage credentials are named by the
environment variables that hold them (`storage_env`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import fsspec
import yaml
from jsonschema import Draft202012Validator

from rbcbatch.engine.config import CLASSIFIERS, SEGMENTERS, RunConfig
from rbcbatch.engine.run import RunSummary, run
from rbcbatch.errors import JobSpecError, RbcbatchError
from rbcbatch.store.run_store import RunStore

KINDS = ("screening", "nightly", "training", "shift")
TRAINABLE = ("segmenter", "classifier")
# A storage option path as fsspec/s3fs spell it; dots nest ("client_kwargs.endpoint_url").
OPTION_PATH = r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Key names that hold credentials wherever they appear (outside storage_env, whose keys are
# option names such as "secret" and whose values are variable names).
SECRET_KEY = re.compile(
    r"(secret|passw|token|credential|private_key|access_key|api_?key|^key$)", re.IGNORECASE
)
# AWS access key ids look like variable names; one in storage_env is a pasted credential.
AWS_KEY_ID = re.compile(r"^(AKIA|ASIA)[A-Z0-9]{16}$")
# Schema of a field a variant does not take ({"not": {}} rather than `false`, whose errors
# jsonschema reports without the field's path).
NOT_ALLOWED = {"not": {}}
# Fields holding a location the job reads or writes, per kind (checked before a cluster submit).
LOCATION_FIELDS = {
    "screening": ("catalog", "out"),
    "nightly": ("catalog", "out"),
    "training": ("out", "data"),
    "shift": ("run", "out"),
}


def _run_properties() -> dict:
    """Fields shared by screening and nightly runs (the arguments of `rbcbatch run`)."""
    return {
        "catalog": {
            "type": "string",
            "minLength": 1,
            "description": "Catalog CSV or Parquet: a path (relative to where the job runs) "
            "or a URL.",
        },
        "out": {
            "type": "string",
            "minLength": 1,
            "description": "Run folder (path or URL). Committed slides in it are skipped.",
        },
        "segmenter": {"enum": sorted(SEGMENTERS), "default": RunConfig.segmenter},
        "classifier": {"enum": sorted(CLASSIFIERS), "default": RunConfig.classifier},
        "workers": {
            "type": ["integer", "null"],
            "minimum": 1,
            "description": "Actors in the pool; null: one per CPU (or GPU) of the cluster.",
        },
        "address": {
            "type": ["string", "null"],
            "description": "Ray cluster address; null: RAY_ADDRESS, else a local Ray.",
        },
        "storage_env": {
            "type": "object",
            "description": "Storage options taken from the environment: option path (dots nest) "
            "-> name of the environment variable holding its value. Never the value itself.",
            "propertyNames": {"pattern": OPTION_PATH},
            "additionalProperties": {"type": "string", "pattern": ENV_NAME},
        },
    }


def job_schema() -> dict:
    """The JSON schema of a job spec (draft 2020-12); enums come from the model registries."""
    common = {
        "name": {"type": "string", "description": "A label for people and logs."},
        "description": {"type": "string"},
    }

    def kind_schema(kind: str, required: list[str], properties: dict, **extra) -> dict:
        return {
            "type": "object",
            "required": ["kind", *required],
            "properties": {"kind": {"const": kind}, **common, **properties},
            "additionalProperties": False,
            **extra,
        }

    definitions = {
        "screening": kind_schema(
            "screening",
            ["catalog", "out"],
            {
                **_run_properties(),
                "new_config": {
                    "type": "boolean",
                    "default": False,
                    "description": "Allow a changed configuration in an existing run folder "
                    "(every slide is redone).",
                },
            },
        ),
        "nightly": kind_schema(
            "nightly",
            ["catalog", "out", "skip_committed"],
            {
                **_run_properties(),
                "skip_committed": {
                    "const": True,
                    "description": "A nightly run processes only the catalog's slides not "
                    "committed in `out` yet (new ones, and earlier failures); it never redoes "
                    "committed slides and refuses a changed configuration.",
                },
            },
        ),
        "training": kind_schema(
            "training",
            ["what", "out"],
            {
                "what": {"enum": list(TRAINABLE)},
                "out": {"type": "string", "minLength": 1, "description": "Weights file to write."},
                "epochs": {"type": "integer", "minimum": 1, "description": "Classifier only."},
                "steps": {"type": "integer", "minimum": 1, "description": "Segmenter only."},
                "minutes": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "Wall-time budget; training stops at the best checkpoint.",
                },
                "seed": {"type": "integer"},
                "data": {
                    "type": "string",
                    "description": "Folder holding chula_rbc12/ and anerbc_sample/ "
                    "(default: RBCBATCH_SHARED_DATA or ../shared/data).",
                },
            },
            allOf=[
                {
                    "if": {"properties": {"what": {"const": "segmenter"}}},
                    "then": {"properties": {"epochs": NOT_ALLOWED}},
                },
                {
                    "if": {"properties": {"what": {"const": "classifier"}}},
                    "then": {"properties": {"steps": NOT_ALLOWED}},
                },
            ],
        ),
        "shift": kind_schema(
            "shift",
            ["run", "reference_site"],
            {
                "run": {"type": "string", "minLength": 1, "description": "A run folder."},
                "reference_site": {"type": "string", "minLength": 1},
                "by": {"enum": ["site", "scanner"], "default": "site"},
                "out": {"type": "string", "description": "Folder for the shift report."},
            },
        ),
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rbcbatch job spec",
        "description": "One job: a screening run, a nightly incremental run, training, or a "
        "dataset-shift analysis. Storage credentials are named by environment variable only.",
        "type": "object",
        "required": ["kind"],
        "properties": {"kind": {"enum": list(KINDS)}},
        "allOf": [
            {
                "if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
                "then": {"$ref": f"#/$defs/{kind}"},
            }
            for kind in KINDS
        ],
        "$defs": definitions,
    }


# -- loading and checking ------------------------------------------------------------------------
def json_path(parts) -> str:
    """$.a.b[2] for a path of keys and indices."""
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def secret_problems(spec: dict) -> list[str]:
    """Fields that hold (or look like they hold) a credential; the value is never repeated."""
    problems = []

    def walk(node, path: list) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = [*path, key]
                if path == [] and key == "storage_env":
                    problems.extend(_storage_env_problems(value))
                elif isinstance(key, str) and SECRET_KEY.search(key):
                    problems.append(
                        f"{json_path(here)}: looks like a secret; a job spec never holds one. "
                        "Put the value in an environment variable and name that variable under "
                        "storage_env (e.g. storage_env: {secret: AWS_SECRET_ACCESS_KEY})"
                    )
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, [*path, i])

    walk(spec, [])
    return problems


def _storage_env_problems(storage_env) -> list[str]:
    if not isinstance(storage_env, dict):
        return []  # the schema says what is wrong with it
    problems = []
    for option, variable in storage_env.items():
        where = json_path(["storage_env", option])
        if not isinstance(variable, str) or not re.match(ENV_NAME, variable):
            problems.append(
                f"{where}: is not an environment variable name; storage_env names the variable "
                "that holds the value (e.g. AWS_SECRET_ACCESS_KEY), never the value itself"
            )
        elif AWS_KEY_ID.match(variable):
            problems.append(
                f"{where}: looks like an AWS access key id, not a variable name; put it in an "
                "environment variable (e.g. AWS_ACCESS_KEY_ID) and name that variable here"
            )
    return problems


def schema_problems(spec) -> list[str]:
    """Every way `spec` breaks the job schema, as 'JSON path: what is wrong', sorted."""
    validator = Draft202012Validator(job_schema())
    problems = set()
    for error in validator.iter_errors(spec):
        problems.update(_describe(error))
    return sorted(problems)


def _describe(error) -> list[str]:
    """Messages for one jsonschema error, naming the field rather than its parent."""
    path = list(error.absolute_path)
    instance = error.instance
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in instance]
        return [f"{json_path([*path, name])}: required field is missing" for name in missing]
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(instance) - set(known))
        job = f"a {instance['kind']} job" if "kind" in instance else "this job"
        return [
            f"{json_path([*path, name])}: unknown field for {job} (known: {', '.join(known)})"
            for name in extra
        ]
    if error.validator == "not" and error.schema == NOT_ALLOWED:
        return [f"{json_path(path)}: not used here ({_why_not_allowed(path)})"]
    return [f"{json_path(path)}: {error.message}"]


def _why_not_allowed(path: list) -> str:
    name = path[-1] if path else ""
    return {
        "epochs": "epochs are for the classifier; the segmenter takes steps",
        "steps": "steps are for the segmenter; the classifier takes epochs",
    }.get(name, "this field does not apply to this job")


def check_spec(spec, source: str = "spec") -> dict:
    """The spec if it is a valid job; else JobSpecError listing every problem with its path."""
    if not isinstance(spec, dict):
        raise JobSpecError(source, ["$: a job spec is a YAML mapping with a `kind`"])
    problems = secret_problems(spec) or schema_problems(spec)
    if problems:
        raise JobSpecError(source, problems)
    return spec


def read_spec_text(path: str) -> str:
    """The spec file's text, from a local path or any fsspec URL."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise JobSpecError(path, ["$: no such file"]) from None
    except OSError as e:
        raise JobSpecError(path, [f"$: cannot be read ({type(e).__name__}: {e})"]) from e


def load_spec(path: str | Path) -> dict:
    """Read and check a job spec file (YAML)."""
    path = str(path)
    try:
        spec = yaml.safe_load(read_spec_text(path))
    except yaml.YAMLError as e:
        raise JobSpecError(path, [f"$: not valid YAML ({e})"]) from e
    return check_spec(spec, path)


# -- running -------------------------------------------------------------------------------------
def env_storage_options(storage_env: dict | None, env=None) -> dict:
    """Storage options from the environment variables a spec names (nested by dotted paths)."""
    env = os.environ if env is None else env
    options: dict = {}
    for option, variable in (storage_env or {}).items():
        if variable not in env:
            raise RbcbatchError(
                f"storage_env.{option} names the environment variable {variable}, which is not "
                "set here; export it (or remove the entry to use the store's default credentials)"
            )
        *parents, leaf = option.split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = env[variable]
    return options


@dataclass
class SlideStates:
    """What a run folder held for a catalog before a run: how many slides of each kind."""

    in_catalog: int
    committed: int
    new: int  # never committed nor failed in this folder
    retried: int  # failed in an earlier run, not committed since


def slide_states(catalog: str, out: str, storage_options: dict | None = None) -> SlideStates:
    """Sort the catalog's slides into committed, new and earlier failures of the run folder."""
    from rbcbatch.io.catalog import load_catalog

    ids = {s.slide_id for s in load_catalog(catalog, storage_options).slides}
    store = RunStore(out, storage_options)
    committed = store.committed() & ids
    failed_before = {
        r["slide_id"] for r in store.read_records("_failed") if r.get("stage") != "catalog"
    }
    pending = ids - committed
    return SlideStates(
        in_catalog=len(ids),
        committed=len(committed),
        new=len(pending - failed_before),
        retried=len(pending & failed_before),
    )


@dataclass
class JobOutcome:
    """What a job did, what to tell the person who ran it, and the exit status to give."""

    kind: str
    exit_code: int
    lines: list[str] = field(default_factory=list)
    summary: RunSummary | None = None
    states: SlideStates | None = None
    result: object = None


def run_job(spec: dict, say: Callable[[str], None] | None = None) -> JobOutcome:
    """Run a checked spec with the library function its kind names."""
    say = say or (lambda line: None)
    runner = {
        "screening": _run_screening,
        "nightly": _run_screening,
        "training": _run_training,
        "shift": _run_shift,
    }[spec["kind"]]
    return runner(spec, say)


def _run_screening(spec: dict, say: Callable[[str], None]) -> JobOutcome:
    """A screening run; nightly is the same run, told as what was new since the last one."""
    storage_options = env_storage_options(spec.get("storage_env")) or None
    config = RunConfig(
        segmenter=spec.get("segmenter", RunConfig.segmenter),
        classifier=spec.get("classifier", RunConfig.classifier),
    )
    states = None
    if spec["kind"] == "nightly":
        states = slide_states(spec["catalog"], spec["out"], storage_options)
        say(
            f"nightly: {states.new} new slide(s) and {states.retried} earlier failure(s) to "
            f"process; {states.committed} of {states.in_catalog} already committed, skipped"
        )
    summary = run(
        spec["catalog"],
        spec["out"],
        config,
        address=spec.get("address"),
        workers=spec.get("workers"),
        storage_options=storage_options,
        new_config=spec.get("new_config", False),
    )
    lines = [
        f"run {summary.run_id}: {summary.processed} slide(s) processed, {summary.skipped} already "
        f"committed, {summary.objects} objects, {summary.seconds:.1f} s -> {spec['out']}"
    ]
    if states is not None:
        lines.append(
            f"nightly: {states.new} new slide(s) processed ({states.retried} earlier failure(s) "
            "retried)"
        )
    for row in summary.failed[:20]:
        lines.append(f"failed {row['slide_id']!r}: {row['message']}")
    if summary.n_failed:
        lines.append(f"{summary.n_failed} of {summary.total} slide(s) failed; see failures.parquet")
    return JobOutcome(spec["kind"], 1 if summary.n_failed else 0, lines, summary, states)


def training_call(spec: dict) -> tuple[Callable, dict]:
    """The training function a training spec names, and its keyword arguments."""
    if spec["what"] == "classifier":
        from rbcbatch.dev.train_classifier import train_classifier

        kwargs: dict = {"out": spec["out"]}
        if "epochs" in spec:
            kwargs["epochs"] = spec["epochs"]
        if "minutes" in spec:
            kwargs["time_limit_s"] = spec["minutes"] * 60
        if "data" in spec:
            kwargs["data"] = Path(spec["data"])
        if "seed" in spec:
            kwargs["seed"] = spec["seed"]
        return train_classifier, kwargs
    from rbcbatch.dev.train_segmenter import MAIN_PHASE, train_segmenter

    kwargs = {"out_weights": spec["out"]}
    if "steps" in spec:
        kwargs["phase"] = replace(MAIN_PHASE, steps=spec["steps"])
    if "minutes" in spec:
        kwargs["minutes"] = spec["minutes"]
    if "data" in spec:
        kwargs["anerbc_root"] = Path(spec["data"]) / "anerbc_sample"
    if "seed" in spec:
        kwargs["seed"] = spec["seed"]
    return train_segmenter, kwargs


def _run_training(spec: dict, say: Callable[[str], None]) -> JobOutcome:
    fn, kwargs = training_call(spec)
    say(f"training the {spec['what']} -> {spec['out']}")
    card = fn(**kwargs)
    return JobOutcome("training", 0, [f"wrote {spec['out']} and its model card"], result=card)


def _run_shift(spec: dict, say: Callable[[str], None]) -> JobOutcome:
    """A dataset-shift analysis of a run folder (rbcbatch.analytics.shift), as `rbcbatch shift` does it."""
    from rbcbatch.analytics.shift import shift_analysis, write_shift_outputs

    by = spec.get("by", "site")
    out = spec.get("out") or f"{spec['run'].rstrip('/')}/shift"
    say(f"shift: {spec['run']} by {by} against {spec['reference_site']}")
    report = shift_analysis(spec["run"], by=by, reference=spec["reference_site"])
    written = write_shift_outputs(report, out)
    lines = [
        f"{row.group}: AUC {row.auc:.3f} (p {row.p_value:.3g}), MMD {row.mmd:.4f}, "
        f"{row.n_cells} cells per side" + (", OUT OF DISTRIBUTION" if row.flagged else "")
        for row in report.scores.itertuples()
    ]
    lines += [f"wrote {path}" for path in written]
    return JobOutcome("shift", 0, lines, result=report)


# -- checks before a cluster submit (rbcbatch.jobs.submit sends the job) -------------------------
def is_url(location: str) -> bool:
    return "://" in location


def cluster_path_problems(spec: dict) -> list[str]:
    """Locations a cluster cannot resolve: relative local paths mean nothing on another node."""
    problems = []
    for name in LOCATION_FIELDS[spec["kind"]]:
        value = spec.get(name)
        if value and not is_url(value) and not os.path.isabs(value):
            problems.append(
                f"$.{name}: {value!r} is a relative local path; on a cluster give a URL "
                "(s3://...) or an absolute path that every node can read"
            )
    return problems
