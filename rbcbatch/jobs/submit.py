"""Running a job spec on a Ray cluster: submit it through the Ray Jobs API and follow it.

`rbcbatch submit SPEC --address http://HEAD:8265` checks the spec here, sends it as the only file
of the job's working directory, starts `rbcbatch run-job SPEC` on the cluster, then follows the
job: its own log lines are passed on as they come, and the job's end becomes an exit status,
run-job's own where the job got to report one (0 done, 1 some slides failed, 2 an error).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rbcbatch import __version__
from rbcbatch.errors import JobSpecError, RbcbatchError
from rbcbatch.jobs.specs import cluster_path_problems, is_url, load_spec

logger = logging.getLogger(__name__)

# A failed job's last log lines shown: a Python traceback and run-job's summary fit in 40.
TAIL_LINES = 40
# Seconds between two looks at a running job (one status and one log request each).
POLL_S = 1.0
# Lines Ray's job machinery writes into a job's log, not the job's own: Python logging in Ray's
# format ("2026-12-01 22:50:09,315\tINFO job_manager.py:581 -- ..."), Ray's C++ logs
# ("[2026-12-01 22:50:09,315 I 123 456] core_worker.cc:12: ...") and the supervisor's header.
RAY_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+[A-Z]+ \S+:\d+ -- "
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] "
    r"|Running entrypoint for job )"
)
# Exit statuses of `rbcbatch run-job` passed on as they are: 1 some slides failed, 2 a bad spec
# or configuration. Any other end of a failed job is an error here (2).
RUN_JOB_CODES = (1, 2)
# A cluster whose head has just started answers "No available agent to submit job, please try
# again later" until its node's job agent is up (a few seconds here): retry for this long.
AGENT_WAIT_S = 30.0
# The shell's "command not found": the cluster's PATH has no `rbcbatch` (or no such --python).
COMMAND_NOT_FOUND = 127


def job_command(python: str | None = None) -> list[str]:
    """How the job starts rbcbatch on the cluster: the cluster's own `rbcbatch` command (the
    rbcbatch image has it on PATH), or `PYTHON -m rbcbatch.cli` with a named interpreter (a
    cluster started from a virtual environment that is not on its PATH)."""
    if python is None:
        return ["rbcbatch"]
    if os.sep in python and not os.path.isabs(python):
        raise RbcbatchError(
            f"--python {python}: a relative path means nothing where the job runs (its own "
            "working directory); give an absolute path (e.g. $PWD/.venv/bin/python) or a command "
            "name on the cluster's PATH"
        )
    return [python, "-m", "rbcbatch.cli"]


def submission(spec_path: str, staging: Path, python: str | None = None) -> tuple[list[str], dict]:
    """The entrypoint argv and runtime_env that run a spec on a cluster.

    A local spec travels as the only file of the job's working_dir (staged in `staging`), so
    nothing else of this machine is uploaded; a spec at a URL is read there by the job itself.
    """
    command = job_command(python)
    if is_url(spec_path):
        return [*command, "run-job", spec_path], {}
    staged = staging / Path(spec_path).name
    shutil.copyfile(spec_path, staged)
    return [*command, "run-job", staged.name], {"working_dir": str(staging)}


@contextlib.contextmanager
def quiet_ray() -> Iterator[None]:
    """Keep the Jobs client's INFO logging ("Uploading package ...") off the user's console.

    Ray's client modules set their loggers to INFO themselves, so each logger of Ray's that has
    a level below WARNING is raised to WARNING for the duration, then put back.
    """
    loggers = [logging.getLogger("ray")] + [
        lg
        for name, lg in list(logging.root.manager.loggerDict.items())
        if name.startswith("ray.") and isinstance(lg, logging.Logger)
    ]
    raised = [(lg, lg.level) for lg in loggers if logging.NOTSET < lg.level < logging.WARNING]
    for lg, _ in raised:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in raised:
            lg.setLevel(level)


def job_client(address: str):
    """A Ray Jobs API client for the cluster's dashboard at `address` (http://HEAD:8265)."""
    try:
        import aiohttp  # noqa: F401  (what the Jobs client needs beyond ray itself)
        import requests  # noqa: F401
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise RbcbatchError(
            f"submitting needs the Ray Jobs client ({e.name} is missing): "
            "pip install 'ray[default]'"
        ) from e
    try:
        with quiet_ray():
            return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise RbcbatchError(
            f"the Ray job server at {address} wants a token: export RAY_AUTH_MODE=token and "
            "the cluster's token as RAY_AUTH_TOKEN (or in ~/.ray/auth_token), then submit again"
        ) from e
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RbcbatchError(
            f"no Ray job server answered at {address} ({str(e).rstrip('.')}). Give the "
            "head's dashboard address (http://HEAD:8265), forward it first (`ray dashboard "
            "cluster/aws.yaml`, or `kubectl port-forward svc/rbcbatch-head-svc 8265:8265`), and "
            "check that the cluster runs ray[default] (the rbcbatch image does)"
        ) from e


def submit(spec_path: str | Path, address: str, python: str | None = None) -> str:
    """Check a spec, then send `rbcbatch run-job SPEC` to a cluster; returns the submission id.

    `python`: the interpreter that runs rbcbatch on the cluster (see `job_command`).
    """
    spec_path = str(spec_path)
    spec = load_spec(spec_path)
    problems = cluster_path_problems(spec)
    if problems:
        raise JobSpecError(spec_path, problems)
    with tempfile.TemporaryDirectory(prefix="rbcbatch-job-") as staging:
        argv, runtime_env = submission(spec_path, Path(staging), python)
        client = job_client(address)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                with quiet_ray():
                    return client.submit_job(
                        entrypoint=shlex.join(argv),
                        runtime_env=runtime_env,
                        metadata={"rbcbatch_kind": spec["kind"], "rbcbatch_version": __version__},
                    )
            except (ConnectionError, RuntimeError) as e:
                if "try again later" in str(e) and time.monotonic() < deadline:
                    logger.info("the job server at %s is not ready yet (%s); retrying", address, e)
                    time.sleep(1.0)
                    continue
                raise RbcbatchError(f"the Ray job server at {address} refused the job: {e}") from e


@dataclass
class JobEnd:
    """How a submitted job ended, and what `rbcbatch submit` tells and exits with."""

    job_id: str
    status: str  # SUCCEEDED, FAILED or STOPPED (ray.job_submission.JobStatus)
    driver_exit_code: int | None  # the entrypoint's exit status; None when it never ran
    message: str = ""  # the job server's account of the end
    error_type: str | None = None  # ray.job_submission.JobErrorType, for a failed job
    log_tail: list[str] = field(default_factory=list)  # its log's last lines, when it failed

    @property
    def exit_code(self) -> int:
        """0 when the job succeeded; run-job's own 1 or 2 where it gave one; else 2."""
        if self.status == "SUCCEEDED":
            return 0
        if self.status == "FAILED" and self.driver_exit_code in RUN_JOB_CODES:
            return self.driver_exit_code
        return 2

    def report(self, address: str) -> list[str]:
        """The lines that end a followed job: its status, and why and its log's tail if not ok."""
        if self.status == "SUCCEEDED":
            return [f"job {self.job_id} SUCCEEDED"]
        code = "" if self.driver_exit_code is None else f" (exit status {self.driver_exit_code})"
        # An entrypoint that exited non-zero is told by its status and its log; anything else
        # (a runtime env that could not be set up, a lost supervisor, a stop) by the server.
        why = "" if self.error_type == "JOB_ENTRYPOINT_COMMAND_ERROR" else self.message.strip()
        lines = [f"job {self.job_id} {self.status}{code}" + (f": {why}" if why else "")]
        if self.driver_exit_code == COMMAND_NOT_FOUND:
            lines.append(
                "the cluster could not start rbcbatch: install it in the cluster's Python (the "
                "rbcbatch image has it), or name that Python with --python /path/to/python"
            )
        if self.log_tail:
            lines.append(
                f"the last {len(self.log_tail)} line(s) of its log (all of it: "
                f"ray job logs {self.job_id} --address {address}):"
            )
            lines += [f"  {line}" for line in self.log_tail]
        return lines


def own_lines(text: str) -> list[str]:
    """The job's own output in a piece of its log, without Ray's lines."""
    return [line for line in text.splitlines() if line.strip() and not RAY_LINE.match(line)]


def follow(
    job_id: str,
    address: str,
    say: Callable[[str], None] | None = None,
    poll_s: float = POLL_S,
) -> JobEnd:
    """Follow a submitted job until it ends, passing its own log lines to `say` as they come."""
    say = say or (lambda line: None)
    client = job_client(address)
    shown = 0  # characters of the log already looked at
    while True:
        status = _ask(address, job_id, client.get_job_status, job_id)
        logs = _ask(address, job_id, client.get_job_logs, job_id)
        done = status.is_terminal()  # read before the logs, so these are the last of them
        upto = len(logs) if done else logs.rfind("\n", shown) + 1  # whole lines only
        if upto > shown:
            for line in own_lines(logs[shown:upto]):
                say(line)
            shown = upto
        if done:
            break
        time.sleep(poll_s)
    info = _ask(address, job_id, client.get_job_info, job_id)
    failed = str(status) != "SUCCEEDED"
    return JobEnd(
        job_id=job_id,
        status=str(status),
        driver_exit_code=info.driver_exit_code,
        message=info.message or "",
        error_type=getattr(info.error_type, "value", info.error_type) or None,
        log_tail=log_tail(logs) if failed else [],
    )


def log_tail(logs: str, lines: int = TAIL_LINES) -> list[str]:
    """A job log's last lines of its own output (all of its last lines if it has none)."""
    own = own_lines(logs)
    return (own or [line for line in logs.splitlines() if line.strip()])[-lines:]


def _ask(address: str, job_id: str, request: Callable, *args):
    """One Jobs API request while following; a lost server is an error saying what goes on."""
    try:
        with quiet_ray():
            return request(*args)
    except (ConnectionError, RuntimeError, OSError) as e:
        raise RbcbatchError(
            f"lost the Ray job server at {address} while following job {job_id} ({e}); the job "
            f"may still be running: ray job status {job_id} --address {address}"
        ) from e
