"""rbcbatch on object storage, end to end: a real S3 server (moto) on loopback, real Ray,
Zarr and DuckDB.

The tiny cohort runs from a bucket into a bucket and from a folder into a folder; the two must
agree row for row and pixel for pixel. Then the ways storage goes wrong: a missing object, a
bucket the credentials may not read (moto enforcing IAM), transient server errors, and the
server going away mid-run and coming back.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import urllib.request
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import zarr
from botocore.exceptions import NoCredentialsError
from typer.testing import CliRunner

from rbcbatch.analytics import connect, query
from rbcbatch.cli import app
from rbcbatch.engine.run import run
from rbcbatch.errors import CatalogError
from rbcbatch.io.sources import read_slide
from rbcbatch.io.storage import (
    REDACTED,
    S3_BLOCK_SIZE,
    StorageError,
    explain,
    options_from_cli,
    redacted,
    resolve_options,
    scrub,
)
from tests.conftest import free_port

pytestmark = pytest.mark.slow

KEY = "rbcbatch-test-key-id"
SECRET = "rbcbatch-test-secret-7f3c"
REGION = "eu-west-1"


def s3_options(endpoint: str, key: str = KEY, secret: str = SECRET, **extra) -> dict:
    return {
        "key": key,
        "secret": secret,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
        **extra,
    }


def few_attempts(endpoint: str, attempts: int = 2, **kw) -> dict:
    """Options that give up quickly, for tests where the endpoint is meant to fail."""
    return s3_options(endpoint, config_kwargs={"retries": {"total_max_attempts": attempts}}, **kw)


def new_bucket(fs: s3fs.S3FileSystem, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    return name


# -- a TCP relay in front of the server: lets a test cut the link or answer with errors ----------
ERROR_500 = (
    b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
)
HEAD_500 = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(ERROR_500)
)


class Relay:
    """Forwards 127.0.0.1:port to the S3 server. `cut()` makes the server unreachable (open
    connections dropped, new ones refused); `restore()` brings it back on the same port;
    `fail_next(n)` answers the next n connections with an S3 500 error."""

    def __init__(self, target: str):
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.to_fail = 0
        self.failed = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener:
            listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def fail_next(self, n: int) -> None:
        self.to_fail, self.failed = n, 0

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.to_fail > 0:
                self.to_fail -= 1
                self.failed += 1
                threading.Thread(target=self._answer_500, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _answer_500(client: socket.socket) -> None:
        with contextlib.suppress(OSError), client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            # a HEAD answer has headers only
            client.sendall(HEAD_500 if head.startswith(b"HEAD ") else HEAD_500 + ERROR_500)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fs(s3_endpoint) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**resolve_options(s3_options(s3_endpoint), "s3://"))


@pytest.fixture(scope="module")
def cohort_url(fs, tiny_cohort) -> str:
    """The tiny cohort (catalog with relative image paths, and its images) in a bucket."""
    bucket = new_bucket(fs, "cohort")
    fs.put(str(tiny_cohort.parent / "catalog.csv"), f"{bucket}/tiny/catalog.csv")
    fs.put(str(tiny_cohort.parent / "images") + "/", f"{bucket}/tiny/images/", recursive=True)
    return f"s3://{bucket}/tiny/catalog.csv"


@pytest.fixture(scope="module")
def local_run(ray_local, tiny_cohort, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("s3_reference") / "run")
    summary = run(str(tiny_cohort), out, workers=2)
    assert summary.processed == 6 and not summary.failed
    return out


@pytest.fixture(scope="module")
def s3_run(ray_local, fs, cohort_url, s3_endpoint) -> str:
    out = f"s3://{new_bucket(fs, 'runs')}/screening/run1"
    summary = run(cohort_url, out, storage_options=s3_options(s3_endpoint), workers=2)
    assert (summary.processed, summary.skipped, summary.failed) == (6, 0, [])
    return out


def cell_rows(run_dir: str, options: dict | None = None, where: str = "true") -> list[dict]:
    """Every committed cell, without the run id, in a fixed order (NaN as "nan": comparable)."""
    sql = f"SELECT * EXCLUDE (run_id) FROM cells WHERE {where} ORDER BY slide_id, cell_id"
    rows = query(run_dir, sql, storage_options=options).to_pylist()
    return [{k: "nan" if v != v else v for k, v in row.items()} for row in rows]


def assert_rows_close(actual: list[dict], expected: list[dict]) -> None:
    """Equal rows, floats to 1e-12 relative (DuckDB's parallel sums vary in the last bit)."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, float):
                assert math.isclose(got[name], value, rel_tol=1e-12), (name, got, want)
            else:
                assert got[name] == value, (name, got, want)


def committed_ids(run_dir: str, options: dict) -> list[str]:
    table = query(run_dir, "SELECT slide_id FROM slides ORDER BY slide_id", storage_options=options)
    return table.column("slide_id").to_pylist()


# -- options -------------------------------------------------------------------------------
def test_options_come_from_the_aws_environment_under_explicit_ones():
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDENV",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "env-token",
        "AWS_ENDPOINT_URL": "http://generic:9000",
        "AWS_ENDPOINT_URL_S3": "http://s3-only:9000",
        "AWS_DEFAULT_REGION": "us-west-1",
        "AWS_REGION": "eu-central-1",
    }
    explicit = {"secret": "cli-secret", "config_kwargs": {"retries": {"total_max_attempts": 2}}}
    options = resolve_options(explicit, "/local/catalog.csv", "s3://bucket/run", env=env)
    assert options["key"] == "AKIDENV"
    assert options["secret"] == "cli-secret"  # explicit wins
    assert options["token"] == "env-token"
    # the S3-specific endpoint and AWS_REGION win over their generic forms
    assert options["client_kwargs"] == {
        "endpoint_url": "http://s3-only:9000",
        "region_name": "eu-central-1",
    }
    assert options["default_block_size"] == S3_BLOCK_SIZE == 262144
    assert options["use_listings_cache"] is False
    # nested dictionaries merge: the explicit attempts, the default mode and timeouts
    assert options["config_kwargs"] == {
        "retries": {"mode": "standard", "total_max_attempts": 2},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    assert resolve_options(options, "s3://bucket/x", env=env) == options  # resolving twice
    # local paths get no s3 options, only what was given
    assert resolve_options(None, "/data/catalog.csv", "/out", env=env) == {}
    assert resolve_options({"auto_mkdir": True}, "/out", env=env) == {"auto_mkdir": True}


def test_options_render_without_credentials():
    options = s3_options("http://127.0.0.1:9", token="session-token-xyz")
    shown = redacted(options)
    assert shown["key"] == shown["secret"] == shown["token"] == REDACTED
    assert shown["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9"
    assert SECRET not in json.dumps(shown) and "session-token-xyz" not in json.dumps(shown)
    assert scrub(f"signature for {SECRET} failed", options) == "signature for *** failed"
    assert scrub(None, options) is None
    message = explain(PermissionError(f"Forbidden {SECRET}"), ["s3://b/run"], options)
    assert message.startswith("storage error on s3://b/run: PermissionError: Forbidden ***;")
    assert "check that the credentials (AWS_ACCESS_KEY_ID" in message
    local = explain(PermissionError("[Errno 13] Permission denied: '/out/run.json'"), ["/out"])
    assert local.endswith("permission denied: check that this user may read and write there")
    missing = explain(NoCredentialsError(), ["s3://b/run"])
    assert missing.endswith("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def test_cli_storage_options_parse_names_and_values():
    parsed = options_from_cli(
        [
            "anon=false",
            "client_kwargs.endpoint_url=http://127.0.0.1:9000",
            "default_block_size=65536",
        ]
    )
    assert parsed == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "default_block_size": 65536,
    }
    with pytest.raises(ValueError, match="name=value"):
        options_from_cli(["endpoint"])


# -- the same cohort on s3 and on disk -----------------------------------------------------
def test_s3_run_equals_local_run(s3_run, local_run, s3_endpoint, tiny_cohort):
    options = s3_options(s3_endpoint)
    s3_cells, local_cells = cell_rows(s3_run, options), cell_rows(local_run)
    assert len(s3_cells) == len(local_cells) > 300
    assert s3_cells == local_cells

    patients = "SELECT * FROM patients ORDER BY patient_id"
    s3_patients = query(s3_run, patients, storage_options=options).to_pylist()
    assert_rows_close(s3_patients, query(local_run, patients).to_pylist())
    assert [p["label"] for p in s3_patients] == ["normal", "hs", "ida"]

    slide_ids = committed_ids(s3_run, options)
    assert len(slide_ids) == 6
    for slide_id in slide_ids:
        remote = zarr.open_group(
            f"{s3_run}/masks.zarr/{slide_id}/labels/cells",
            mode="r",
            storage_options=resolve_options(options, s3_run),
        )
        local = zarr.open_group(f"{local_run}/masks.zarr/{slide_id}/labels/cells", mode="r")
        assert sorted(remote.array_keys()) == sorted(local.array_keys())
        for level in local.array_keys():
            np.testing.assert_array_equal(remote[level][...], local[level][...])
        assert remote.attrs["ome"] == local.attrs["ome"]
        assert remote["0"].shape == (360, 480)

    # the manifest on s3 is the consolidated commit records, image paths resolved into the bucket
    fs = s3fs.S3FileSystem(**resolve_options(options, s3_run))
    manifest = pq.read_table(fs.open(f"{s3_run}/manifest.parquet")).to_pylist()
    assert {m["status"] for m in manifest} == {"ok"}
    assert all(m["uri"].startswith("s3://cohort-") for m in manifest)


def aws_environment(endpoint: str) -> dict:
    return {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_REGION": REGION,
    }


def test_cli_on_s3_reads_the_aws_environment(s3_run, cohort_url, s3_endpoint, local_run):
    cli = CliRunner()
    env = aws_environment(s3_endpoint)
    rerun = cli.invoke(app, ["run", cohort_url, "--out", s3_run], env=env)
    assert rerun.exit_code == 0, rerun.output
    assert "0 slide(s) processed, 6 already committed" in rerun.output
    assert "'secret': '***'" in rerun.output and SECRET not in rerun.output

    sql = "SELECT patient_id, count(*) AS n FROM cells GROUP BY ALL ORDER BY patient_id"
    counted = cli.invoke(app, ["query", s3_run, sql, "--csv"], env=env)
    assert counted.exit_code == 0, counted.output
    expected = query(local_run, sql).to_pylist()
    assert counted.stdout.splitlines()[1:] == [f'"{r["patient_id"]}",{r["n"]}' for r in expected]

    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    elsewhere = [
        "--storage-option",
        f"client_kwargs.endpoint_url={gone}",
        "--storage-option",
        "config_kwargs.retries.total_max_attempts=1",
    ]
    for args, where in (
        (["report", s3_run], s3_run),
        (["run", cohort_url, "--out", s3_run], f"{cohort_url}, {s3_run}"),
    ):
        unreachable = cli.invoke(app, args + elsewhere, env=env)
        message = " ".join(unreachable.output.split())  # unwrapped
        assert unreachable.exit_code == 2, message
        assert f"error: storage error on {where}: EndpointConnectionError" in message
        assert "did not answer" in message
        assert "Traceback" not in message and SECRET not in message


def test_no_credential_lands_in_any_output(s3_run, fs):
    files = fs.find(s3_run.removeprefix("s3://"))
    names = {f.rsplit("/", 1)[1] for f in files}
    assert {"run.json", "manifest.parquet", "failures.parquet"} <= names
    assert sum(f.endswith(".parquet") and "/cells/" in f for f in files) == 3  # one a patient
    for path, blob in fs.cat(files).items():
        assert SECRET.encode() not in blob, path
        assert KEY.encode() not in blob, path


def test_transient_server_errors_are_retried(fs, cohort_url, s3_endpoint, tiny_cohort):
    """botocore's standard retry mode retries a 500 answer; each attempt is a new connection."""
    image = cohort_url.rsplit("/", 1)[0] + "/images/P001_S1.png"
    expected = read_slide("P001_S1", str(tiny_cohort.parent / "images" / "P001_S1.png"))
    relay = Relay(s3_endpoint)
    try:
        relay.fail_next(3)
        options = resolve_options(s3_options(relay.url), image)  # 5 attempts by default
        np.testing.assert_array_equal(read_slide("P001_S1", image, options), expected)
        assert relay.failed == 3

        relay.fail_next(3)
        options = few_attempts(relay.url, 2, skip_instance_cache=True)
        with pytest.raises(OSError, match="Internal Server Error"):
            read_slide("P001_S1", image, resolve_options(options, image))
        assert relay.failed == 2  # two attempts, both answered 500, then a clear error
    finally:
        relay.cut()


# -- missing objects and refused access ----------------------------------------------------
def iam_reader(endpoint: str, bucket: str) -> tuple[str, str]:
    """An IAM user that may do anything in `bucket` and nothing elsewhere; its access key."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
    )
    user = f"reader-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    arns = [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": arns}],
    }
    iam.put_user_policy(UserName=user, PolicyName="own-bucket", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@contextlib.contextmanager
def iam_enforced(endpoint: str):
    """moto checks credentials and IAM policies on every request while inside."""

    def set_free_actions(count: str) -> None:
        request = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).read()

    set_free_actions("0")
    try:
        yield
    finally:
        set_free_actions("inf")


def test_missing_and_forbidden_objects_are_failure_rows(ray_local, fs, s3_endpoint, tiny_cohort):
    images = tiny_cohort.parent / "images"
    open_bucket, locked = new_bucket(fs, "open"), new_bucket(fs, "locked")
    fs.put(str(images / "P001_S1.png"), f"{open_bucket}/images/good.png")
    fs.put(str(images / "P001_S2.png"), f"{locked}/images/secret.png")
    catalog = (
        "slide_id,uri,patient_id,site,um_per_px\n"
        "good,images/good.png,P1,a,0.25\n"
        "missing,images/missing.png,P1,a,0.25\n"
        f"forbidden,s3://{locked}/images/secret.png,P1,a,0.25\n"
    ).encode()
    fs.pipe(f"{open_bucket}/catalog.csv", catalog)
    fs.pipe(f"{locked}/catalog.csv", catalog)
    key, secret = iam_reader(s3_endpoint, open_bucket)
    reader = few_attempts(s3_endpoint, key=key, secret=secret)
    out = f"s3://{open_bucket}/run"

    with iam_enforced(s3_endpoint):
        # a stranger's key is refused before any work starts
        stranger = few_attempts(s3_endpoint, key="AKIDNOBODY", secret="nope")
        with pytest.raises(
            CatalogError, match=f"cannot read catalog s3://{open_bucket}/catalog.csv"
        ):
            run(f"s3://{open_bucket}/catalog.csv", out, storage_options=stranger)
        with pytest.raises(CatalogError, match=f"cannot read catalog s3://{locked}/catalog.csv"):
            run(f"s3://{locked}/catalog.csv", out, storage_options=reader)
        with pytest.raises(StorageError, match=f"s3://{locked}/run.*refused the request"):
            run(f"s3://{open_bucket}/catalog.csv", f"s3://{locked}/run", storage_options=reader)

        summary = run(f"s3://{open_bucket}/catalog.csv", out, storage_options=reader, workers=1)
        assert (summary.processed, summary.n_failed) == (3, 2)
        assert committed_ids(out, reader) == ["good"]
        with pytest.raises(StorageError, match=f"s3://{locked}/run.*refused"):
            connect(f"s3://{locked}/run", storage_options=reader)

    failures = {
        f["slide_id"]: f for f in pq.read_table(fs.open(f"{out}/failures.parquet")).to_pylist()
    }
    assert sorted(failures) == ["forbidden", "missing"]
    assert failures["missing"]["stage"] == "read"
    assert failures["missing"]["message"] == (
        f"no such file or object: s3://{open_bucket}/images/missing.png"
    )
    assert failures["forbidden"]["stage"] == "read"
    assert failures["forbidden"]["message"] == (
        f"permission denied reading s3://{locked}/images/secret.png"
    )


def test_missing_bucket_is_a_clear_catalog_error(s3_endpoint):
    with pytest.raises(CatalogError, match="catalog not found: s3://no-such-bucket-x1/c.csv"):
        run(
            "s3://no-such-bucket-x1/c.csv",
            "s3://no-such-bucket-x1/run",
            storage_options=s3_options(s3_endpoint),
        )


# -- the server going away mid-run --------------------------------------------------------
def test_server_lost_mid_run_keeps_commits_and_a_rerun_finishes(
    ray_local, fs, cohort_url, local_run, s3_endpoint
):
    # four of the cohort's slides, one at a time, so the cut lands with some still to do
    lines = fs.cat(cohort_url).decode().splitlines()[:5]
    catalog = cohort_url.replace("catalog.csv", "outage.csv")
    fs.pipe(catalog, ("\n".join(lines) + "\n").encode())
    slides = sorted(line.split(",")[0] for line in lines[1:])
    in_catalog = f"slide_id IN ({', '.join(repr(s) for s in slides)})"

    out = f"s3://{new_bucket(fs, 'outage')}/run"
    relay = Relay(s3_endpoint)
    through_relay, direct = few_attempts(relay.url), s3_options(s3_endpoint)
    seen: list[str] = []

    def cut_after_first(row: dict) -> None:
        seen.append(row["slide_id"])
        if len(seen) == 1:
            relay.cut()

    try:
        with pytest.raises(StorageError, match=f"{out}.*run the same command again"):
            run(
                catalog,
                out,
                storage_options=through_relay,
                workers=1,
                slides_per_batch=1,
                on_slide=cut_after_first,
            )
        committed = committed_ids(out, direct)
        assert seen[0] in committed
        assert 1 <= len(committed) < len(slides)
        # what was committed before the cut is whole and readable
        where = f"slide_id IN ({', '.join(repr(s) for s in committed)})"
        assert cell_rows(out, direct) == cell_rows(local_run, where=where)

        relay.restore()
        summary = run(catalog, out, storage_options=through_relay, workers=1)
        assert (summary.skipped, summary.processed, summary.failed) == (
            len(committed),
            len(slides) - len(committed),
            [],
        )
    finally:
        relay.cut()
    assert committed_ids(out, direct) == slides
    assert cell_rows(out, direct) == cell_rows(local_run, where=in_catalog)
    manifest = pq.read_table(fs.open(f"{out}/manifest.parquet")).to_pylist()
    assert [(m["slide_id"], m["status"]) for m in manifest] == [(s, "ok") for s in slides]
