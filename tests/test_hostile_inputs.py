"""What a hostile-but-realistic new user tries, as a table: command, exit code, one-line message.

Each row runs a real job (``jobs/*.py``'s ``main``, in this process, so the imports are paid
once) and checks its exit code, that stderr's last line is ``error: ...`` matching the row's
pattern, that nothing raised, and for the data-loss rows that the user's files still exist.

* ``BEFORE_RAY`` rows need no cluster: they must fail on the arguments, the files, the
  tracking server or the data, before Ray starts or an MLflow run opens. When this module is
  the first to use Ray in the session, that is also asserted (Ray is still not initialised).
* ``WITH_A_RUN`` rows need a finished training run (one tiny real run, ``--no-eval``) and a
  dataset really written by ``jobs/generate.py``: re-using the run's name for another model or
  shape, a second writer of the same name, ``--overwrite`` of a dataset holding a user's file,
  a user's ``X.staging``, re-running ``embed`` into its output, codes with non-UTF-8 bytes.
* The last test checks that no MLflow run this module started is left RUNNING.

Real parts only: real Parquet datasets (the validation corpus' hand-built base, and a
simulated population), real sqlite MLflow, a real local Ray for the second table.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mirror import guards, tracking
from mirror.data import ownership
from mirror.data import schema as S
from mirror.models import get_model_spec

REPO = Path(__file__).resolve().parents[1]


def ray_is_up() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()
TINY_AE = (
    "model.head_hidden=8 model.dx_emb_dim=8 model.wk_emb_dim=4 model.latent_dim=8 model.out_hidden=16 "
    "train.batch_size=32 train.max_steps_per_epoch=2 train.val_max_batches=1 train.eval_batch_size=64"
)


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


corpus = _load("make_broken_corpus", REPO / "tests" / "data" / "make_broken_corpus.py")
JOBS = {name: _load(f"job_{name}", REPO / "jobs" / f"{name}.py")
        for name in ("train", "generate", "evaluate", "embed", "sample", "sweep", "score", "validate")}  # fmt: skip


@dataclass(frozen=True)
class Case:
    id: str
    job: str
    args: str  # formatted with the world's paths, then split like a shell would
    rc: int
    pattern: str  # regex searched in stderr's last line (after "error: " when rc == 2)
    keep: tuple[str, ...] = ()  # files that must still exist afterwards (data-loss rows)
    absent: tuple[str, ...] = ()  # paths that must not have been created
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def last(self) -> str:
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def run_job(job: str, argv: list[str], env: dict[str, str] | None = None) -> Result:
    """``jobs/<job>.py`` main(argv) with stdout/stderr captured; SystemExit is an exit code."""
    mp = pytest.MonkeyPatch()
    for key, value in (env or {}).items():
        mp.setenv(key, value)
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                returned = JOBS[job].main(argv)
                rc = 0 if isinstance(returned, dict) else int(returned)
            except SystemExit as stop:
                rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        mp.undo()
    return Result(rc, out.getvalue(), err.getvalue())


def check(case: Case, ctx: dict[str, str]) -> Result:
    argv = shlex.split(case.args.format(**ctx))
    env = {k: v.format(**ctx) for k, v in case.env.items()}
    result = run_job(case.job, argv, env)
    print(f"ROW {case.id} | {case.job} {case.args} | {result.rc} | {result.last}")  # pytest -s shows it
    assert "Traceback" not in result.err, result.err
    assert result.rc == case.rc, f"{case.id}: rc {result.rc}\n{result.err[-2000:]}"
    if case.rc == 2:  # a refusal: exactly one line says why
        assert result.last.startswith("error: "), result.err[-2000:]
        assert re.search(case.pattern, result.last), f"{case.id}: {result.last!r} !~ {case.pattern!r}"
    else:  # a job's own verdict (validate lists violations on stdout)
        lines = (result.out + result.err).splitlines()
        assert any(re.search(case.pattern, line) for line in lines), f"{case.id}: no line ~ {case.pattern!r}"
    for path in case.keep:
        assert Path(path.format(**ctx)).exists(), f"{case.id}: {path.format(**ctx)} was deleted"
    for path in case.absent:
        assert not Path(path.format(**ctx)).exists(), f"{case.id}: {path.format(**ctx)} was written"
    return result


def write_sweep(path: Path, **changes) -> Path:
    raw = {
        "model": "wae",
        "parameters": {"model.lam": {"space": "loguniform", "low": 0.1, "high": 10.0}},
        "metric": "val/loss",
        "mode": "min",
        "scheduler": "fifo",
        "samples": 1,
        "evaluate": "none",
        **changes,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Table 1: refused before Ray starts


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Paths every row can name: a valid dataset, broken variants, files, configs, stores."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    corpus.write(copy.deepcopy(corpus.BASE), data)

    bad_json = root / "bad_json"
    corpus.write(copy.deepcopy(corpus.BASE), bad_json)
    (bad_json / S.DATASET_JSON).write_text('{"name": "x", "schema_version": 1,,}')

    ssn = root / "ssn"  # an extra column in one train shard
    corpus.write(copy.deepcopy(corpus.BASE), ssn)
    shard = S.split_files(ssn, S.TRAIN)[1]
    table = pq.read_table(shard)
    pq.write_table(table.append_column("ssn", pa.array(["078-05-1120"] * table.num_rows)), shard)

    two = copy.deepcopy(corpus.BASE)  # held_out patient 32 copied into train as well
    _, _, row = two.locate(corpus.HELD_OUT_ID)
    train = two.shards[S.TRAIN][0]
    train.insert(next(i for i, r in enumerate(train) if r[S.SUBJECT_ID] > corpus.HELD_OUT_ID), dict(row))
    corpus.write(two, root / "two_splits")

    (root / "a_file").write_text("not a dataset\n")
    (root / "cfg_bad.yaml").write_text("model: [unclosed\n")
    (root / "cfg_list.yaml").write_text("model: [64, 2]\ntrain: {epochs: 1}\n")
    (root / "cfg_scalar.yaml").write_text("just a sentence\n")
    (root / "cfg_bad.json").write_text('{"train": {"epochs": 1},}')
    user = root / "user_dir"  # a user's study folder, not a dataset
    (user / "data").mkdir(parents=True)
    (user / "data" / "my_study_results.csv").write_text("patient,outcome\n1,ok\n")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("mine\n")
    write_sweep(root / "sweep_metric.yaml", metric="val/accuracy")
    write_sweep(root / "sweep_ok.yaml")
    write_sweep(root / "sweep_bad_choice.yaml", parameters={"train.epochs": {"space": "choice", "values": [0, 2]}})
    (root / "cfg_epochs0.yaml").write_text("train: {epochs: 0}\n")
    ctx = {
        "root": str(root), "data": str(data), "missing": str(root / "missing"), "file": str(root / "a_file"),
        "bad_json": str(bad_json), "ssn": str(ssn), "two_splits": str(root / "two_splits"),
        "storage": str(root / "ray_results"), "closed": str(closed_port()), "uri": f"sqlite:///{root / 'mlflow.db'}",
        "tiny": TINY_AE,
    }  # fmt: skip
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", ctx["uri"])
    mp.delenv("RAY_ADDRESS", raising=False)
    yield ctx
    mp.undo()


T = "--model ae --data {data} --storage-path {storage} --workers 1"
BEFORE_RAY = [
    # Arguments and config
    Case("data missing", "train", "--model ae --data {missing}", 2, r"--data \S+missing: no such directory"),
    Case("data is a file", "train", "--model ae --data {file}", 2, r"is a file, expected a dataset directory"),
    Case("--set without =", "train", T + " --set train.epochs", 2, r"--set 'train.epochs': expected key=value"),
    Case("--config missing", "train", T + " --config {root}/nope.yaml", 2, r"--config \S+nope.yaml: no such file"),
    Case("--config malformed YAML", "train", T + " --config {root}/cfg_bad.yaml", 2, r"cfg_bad.yaml: not valid YAML"),
    Case("--config malformed JSON", "train", T + " --config {root}/cfg_bad.json", 2, r"cfg_bad.json: not valid JSON"),
    Case("--config model: not a mapping", "train", T + " --config {root}/cfg_list.yaml", 2,
         r"section 'model' must be a mapping.*received list"),
    Case("--config a scalar", "train", T + " --config {root}/cfg_scalar.yaml", 2, r"expected a mapping .*received str"),
    Case("unknown model", "train", "--model gpt --data {data}", 2, r"unknown model 'gpt'; valid models: ae, (\w+, )*wae"),
    Case("unknown --set key", "train", T + " --set train.epoch=2", 2, r"unknown key 'epoch'"),
    Case("train.batch_size=0", "train", T + " --set train.batch_size=0", 2, r"train.batch_size: expected >= 1, received 0"),
    Case("--epochs 0", "train", T + " --epochs 0", 2, r"train.epochs: expected >= 1, received 0",
         absent=("{storage}",)),
    Case("--epochs -3", "train", T + " --epochs -3", 2, r"train.epochs: expected >= 1, received -3"),
    Case("--workers 0", "train", "--model ae --data {data} --workers 0", 2, r"train.workers: expected >= 1"),
    Case("--cpus-per-worker 0", "train", T + " --cpus-per-worker 0", 2, r"train.cpus_per_worker: expected > 0"),
    Case("warmup fraction 1.5", "train", T + " --set train.warmup_fraction=1.5", 2, r"warmup_fraction: expected a fraction"),
    Case("eval batch 0", "train", T + " --set train.eval_batch_size=0", 2, r"eval_batch_size: expected >= 1"),
    Case("--storage-path a file", "train", "--model ae --data {data} --storage-path {file}", 2,
         r"--storage-path \S+a_file: is a file, expected a directory"),
    Case("--config with train.epochs: 0", "train", T + " --config {root}/cfg_epochs0.yaml", 2,
         r"train.epochs: expected >= 1, received 0"),
    # Names
    Case("path traversal", "train", T + " --run-name ../../escape", 2, r"--run-name '\.\./\.\./escape': expected",
         absent=("{root}/escape", "{storage}")),
    Case("absolute run name", "train", T + " --run-name /tmp/x", 2, r"--run-name '/tmp/x': expected"),
    Case("quote in run name", "train", T + ' --run-name "it\'s"', 2, r"--run-name \"it's\": expected"),
    Case("space in run name", "train", T + ' --run-name "my run"', 2, r"--run-name 'my run': expected"),
    Case("dot-dot run name", "train", T + " --run-name a..b", 2, r"without '\.\.'"),
    # Services
    Case("MLflow server unreachable", "train", T, 2, r"MLFLOW_TRACKING_URI=http://127.0.0.1:\d+: cannot reach",
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}"}),
    Case("sqlite store in a missing dir", "train", T, 2, r"directory \S+ does not exist",
         env={"MLFLOW_TRACKING_URI": "sqlite:///{root}/no/such/dir/mlflow.db"}),
    # Data
    Case("broken dataset.json", "train", "--model ae --data {bad_json}", 2, r"bad_json/metadata/dataset.json: not valid JSON"),
    Case("extra column ssn", "train", "--model ae --data {ssn} --workers 1", 2,
         r"data/train/part-00001.parquet: schema: unknown columns \['ssn'\]"),
    Case("patient in two splits", "train", "--model ae --data {two_splits} --workers 1", 2,
         r"data/train/part-00000.parquet row \d+ \(subject 32\): split: in 'train' but belongs to 'held_out'"),
    Case("validate: non-UTF-8 codes", "validate", str(REPO / "tests/data/broken/encoding"), 1,
         r"metadata/codes.parquet row 7: encoding: column 'name' is not valid UTF-8"),
    # generate
    Case("generate --patients 0", "generate", "--patients 0 --out {root}/g0", 2, r"--patients: expected >= 1, received 0",
         absent=("{root}/g0",)),
    Case("generate --chunk-size 1000", "generate", "--patients 10 --out {root}/g1 --chunk-size 1000", 2,
         r"--chunk-size: expected a positive multiple of 4096"),
    Case("generate --workers 0", "generate", "--patients 10 --out {root}/g2 --workers 0", 2, r"--workers: expected >= 1"),
    Case("generate --out a file", "generate", "--patients 10 --out {file}", 2, r"is a file, expected a directory"),
    Case("generate --overwrite a user's folder", "generate", "--patients 10 --out {root}/user_dir --overwrite", 2,
         r"not a dataset written by jobs/generate.py", keep=("{root}/user_dir/data/my_study_results.csv",)),
    Case("generate into a user's folder", "generate", "--patients 10 --out {root}/user_dir", 2,
         r"already holds data", keep=("{root}/user_dir/data/my_study_results.csv",)),
    # evaluate, embed, sample, score
    Case("evaluate unknown run", "evaluate", "--run 0123456789abcdef", 2, r"--run 0123456789abcdef: no such MLflow run"),
    Case("embed into a non-empty --out", "embed", "--run x --data {data} --out {root}/nonempty", 2,
         r"--out \S+nonempty: directory is not empty", keep=("{root}/nonempty/keep.txt",)),
    Case("embed --actors 0", "embed", "--run x --data {data} --out {root}/e --actors 0", 2, r"--actors: expected >= 1"),
    Case("embed unknown run", "embed", "--run nope --data {data} --out {root}/e", 2, r"--run nope: no such MLflow run",
         absent=("{root}/e",)),
    Case("sample --patients 0", "sample", "--run x --patients 0 --out {root}/s", 2, r"--patients: expected >= 1"),
    Case("sample into a non-empty --out", "sample", "--run x --patients 5 --out {root}/nonempty", 2,
         r"directory is not empty", keep=("{root}/nonempty/keep.txt",)),
    Case("sample unknown run", "sample", "--run nope --patients 5 --out {root}/s", 2, r"no such MLflow run"),
    Case("score --real missing", "score", "--real {missing} --synthetic {data}", 2, r"--real \S+: no such directory"),
    Case("score unknown --run", "score", "--real {data} --synthetic {data} --run nope --out {root}/sc.json", 2,
         r"--run nope: no such MLflow run", absent=("{root}/sc.json",)),
    # sweep
    Case("sweep metric no trial reports", "sweep", "{root}/sweep_metric.yaml --data {data}", 2,
         r"metric: 'val/accuracy' is not reported by model 'wae'; it reports .*val/loss"),
    Case("sweep --name traversal", "sweep", "{root}/sweep_ok.yaml --data {data} --name ../up", 2, r"--name '\.\./up': expected"),
    Case("sweep --samples 0", "sweep", "{root}/sweep_ok.yaml --data {data} --samples 0", 2, r"--samples: expected >= 1"),
    Case("sweep with batch size 0", "sweep", "{root}/sweep_ok.yaml --data {data} --set train.batch_size=0", 2,
         r"train.batch_size: expected >= 1, received 0"),
    Case("sweep searching a bad value", "sweep", "{root}/sweep_bad_choice.yaml --data {data}", 2,
         r"parameters.train.epochs.*train.epochs: expected >= 1, received 0"),
    Case("sweep --set without =", "sweep", "{root}/sweep_ok.yaml --data {data} --set oops", 2, r"expected key=value"),
    Case("sweep on data in two splits", "sweep", "{root}/sweep_ok.yaml --data {two_splits}", 2, r"split: in 'train'"),
]


@pytest.mark.parametrize("case", BEFORE_RAY, ids=lambda c: c.id)
def test_refused_before_ray_in_one_line(case: Case, world: dict[str, str]) -> None:
    was_up = ray_is_up()  # an earlier test module may have started Ray in this process
    check(case, world)
    assert not Path(world["storage"]).exists(), "nothing may be written to the storage path"
    assert was_up or not ray_is_up(), f"{case.id}: Ray was started"


def test_non_ray_host_at_ray_address_is_unreachable_not_auth(world: dict[str, str]) -> None:
    """A web server at RAY_ADDRESS accepts TCP but speaks no gRPC; a real CLI process says so."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"], "RAY_ADDRESS": f"127.0.0.1:{port}"}
        cmd = [sys.executable, "jobs/train.py", *shlex.split(T.format(**world)), "--run-name", "no-ray-here"]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.close()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(rf"cannot reach the Ray cluster at '127.0.0.1:{port}': .*not a Ray head", last), last
    assert "token" not in last and "auth" not in last
    assert not (Path(world["storage"]) / "no-ray-here.lock").exists()  # lock released


def test_overwrite_ownership_needs_proof_and_nothing_foreign(tmp_path: Path) -> None:
    """What --overwrite may delete: a generation's files (proven by the marker it writes first,
    so an interrupted one counts), never a dataset from elsewhere or a foreign file."""
    from mirror.data.simulator import SIMULATOR_NAME

    interrupted = tmp_path / "interrupted"
    (interrupted / "metadata").mkdir(parents=True)
    (interrupted / "metadata" / ownership.GENERATED_MARKER).write_text(SIMULATOR_NAME)
    (interrupted / "data" / "train").mkdir(parents=True)
    (interrupted / "data" / "train" / "part-00000.parquet").write_bytes(b"PAR1")
    owned = ownership.owned_dataset_files(interrupted, SIMULATOR_NAME)
    assert [p.name for p in owned] == ["part-00000.parquet", ownership.GENERATED_MARKER]
    ownership.remove_owned_dataset(interrupted, owned)
    assert list(interrupted.iterdir()) == []

    imported = tmp_path / "imported"  # a valid dataset, but not the simulator's: refused
    corpus.write(copy.deepcopy(corpus.BASE), imported)
    with pytest.raises(ownership.NotWrittenByGenerator, match="not a dataset written by jobs/generate.py"):
        ownership.owned_dataset_files(imported, SIMULATOR_NAME)

    (interrupted / "metadata").mkdir()
    (interrupted / "metadata" / ownership.GENERATED_MARKER).write_text(SIMULATOR_NAME)
    (interrupted / "ground_truth").mkdir()
    (interrupted / "ground_truth" / "notes.md").write_text("mine")
    with pytest.raises(ownership.NotWrittenByGenerator, match=r"ground_truth/notes.md was not written"):
        ownership.owned_dataset_files(interrupted, SIMULATOR_NAME)
    assert (interrupted / "ground_truth" / "notes.md").exists()


# --------------------------------------------------------------------------------------------
# Table 2: against a finished run and a generated dataset


@pytest.fixture(scope="module")
def trained(world: dict[str, str], ray_cluster) -> dict[str, str]:
    """A dataset from jobs/generate.py (generated twice: --overwrite of its own output works)
    and one tiny ae run trained with --no-eval, which must end FINISHED."""
    gen = Path(world["root"]) / "generated"
    for extra in ("", " --overwrite"):
        result = run_job("generate", shlex.split(f"--patients 600 --seed 2 --out {gen} --workers 2{extra}"))
        assert result.rc == 0, result.err[-3000:]
    assert (gen / S.METADATA_DIR / ownership.GENERATED_MARKER).exists()
    args = f"--model ae --data {gen} --storage-path {world['storage']} --workers 1 --epochs 1 --run-name first-ae --no-eval --set {TINY_AE}"
    result = run_job("train", shlex.split(args))
    assert result.rc == 0, result.err[-3000:]
    run_id = tracking.find_run("first-ae", uri=world["uri"])
    run = tracking.get_run(run_id, uri=world["uri"])
    assert run.info.status == "FINISHED"  # --no-eval too
    assert set(get_model_spec("ae").metric_names) <= set(run.data.metrics)  # sweeps check these
    assert not (Path(world["storage"]) / "first-ae.lock").exists()
    other = tracking.start_run("a-run-without-checkpoint", params={}, tags={}, uri=world["uri"])
    tracking.end_run(other, uri=world["uri"])
    checkpoint = guards.latest_checkpoint(world["storage"], "first-ae")
    return {**world, "gen": str(gen), "run": run_id, "ckpt": str(checkpoint), "parent": other}


G = "--data {gen} --storage-path {storage} --workers 1 --epochs 1 --run-name first-ae --set {tiny}"
WITH_A_RUN = [
    Case("same run name, other model", "train", "--model wae " + G, 2,
         r"--run-name first-ae: MLflow run \w+ of that name trained model 'ae', not 'wae'", keep=("{ckpt}/checkpoint.pt",)),
    Case("same run name, other shapes", "train", "--model ae " + G + " model.latent_dim=16", 2,
         r"checkpoint \S+ does not fit this config \(model.latent_dim: 8 -> 16; parameter", keep=("{ckpt}/checkpoint.pt",)),
    Case("same run name, other storage path", "train", "--model ae " + G.replace("{storage}", "{root}/elsewhere"), 2,
         r"keeps its checkpoints in \S+first-ae, not under --storage-path \S+elsewhere", absent=("{root}/elsewhere/first-ae",)),
    Case("generate --overwrite over a user's file", "generate", "--patients 600 --seed 2 --out {gen} --overwrite", 2,
         r"data/my_study_results.csv was not written by jobs/generate.py",
         keep=("{gen}/data/my_study_results.csv", "{gen}/metadata/dataset.json", "{gen}/data/train/part-00000.parquet")),
    Case("evaluate a run without checkpoint", "evaluate", "--run {parent}", 2, r"has no 'mirror.checkpoint' tag"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", WITH_A_RUN, ids=lambda c: c.id)
def test_refused_against_a_finished_run(case: Case, trained: dict[str, str], tmp_path: Path) -> None:
    ctx = dict(trained)
    user_file = Path(ctx["gen"]) / "data" / "my_study_results.csv"
    user_file.write_text("patient,outcome\n1,ok\n")
    before = tracking.get_run(ctx["run"], uri=ctx["uri"]).info
    try:
        check(case, ctx)
    finally:
        user_file.unlink(missing_ok=True)
    after = tracking.get_run(ctx["run"], uri=ctx["uri"]).info
    assert (after.status, after.end_time) == ("FINISHED", before.end_time), "the earlier run was touched"


@pytest.mark.slow
def test_second_writer_of_a_run_name_is_refused(trained: dict[str, str]) -> None:
    """While one jobs/train.py holds the name (its lock), another is refused, and the lock of a
    process that is gone is taken over."""
    lock = guards.RunLock.acquire(trained["storage"], "first-ae")
    try:
        case = Case("same run name, concurrently", "train", "--model ae " + G, 2,
                    r"--run-name first-ae: another jobs/train.py is running it \(pid \d+ on ")  # fmt: skip
        check(case, trained)
    finally:
        lock.release()
    stale = Path(trained["storage"]) / "gone.lock"
    stale.write_text(f'{{"pid": 999999999, "host": "{socket.gethostname()}", "since": "then"}}')
    guards.RunLock.acquire(trained["storage"], "gone").release()
    assert not stale.exists()


@pytest.mark.slow
def test_sample_never_deletes_a_users_staging_dir(trained: dict[str, str]) -> None:
    out = Path(trained["root"]) / "synthetic"
    users = out.with_name(out.name + ".staging")
    (users / "notes").mkdir(parents=True)
    (users / "notes" / "plan.txt").write_text("my draft\n")
    # Gate bounds no sample can meet: the job refuses after it made its own staging folder, and
    # must clean up only its own. (A barely trained model used to fail here by itself; it no
    # longer reliably does, so the failure is made certain.)
    case = Case("sample beside a user's X.staging", "sample",
                f"--run {{run}} --patients 20 --out {out} --max-mia-auc 0 --max-presence 0", 3,
                r"nothing exported", keep=(f"{users}/notes/plan.txt",))  # fmt: skip
    check(case, trained)
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir() if "staging" in p.name) == [users.name]


@pytest.mark.slow
def test_sample_refuses_a_dataset_with_non_utf8_codes(trained: dict[str, str]) -> None:
    codes = Path(trained["gen"]) / S.CODES_PARQUET
    original = codes.read_bytes()
    table = pq.read_table(codes)
    names = [v.encode() for v in table.column("name").to_pylist()]
    names[3] = names[3][:3] + b"\xff" + names[3][3:]
    index = table.schema.get_field_index("name")
    broken = table.set_column(index, "name", pa.array(names, pa.binary()).view(pa.string()))
    pq.write_table(broken, codes)
    try:
        case = Case("sample from non-UTF-8 codes", "sample", "--run {run} --patients 5 --out {root}/s8", 2,
                    r"its dataset \S+ is invalid: metadata/codes.parquet row 3: encoding", absent=("{root}/s8",))  # fmt: skip
        check(case, trained)
    finally:
        codes.write_bytes(original)


@pytest.mark.slow
def test_embed_rerun_into_its_output_is_refused(trained: dict[str, str]) -> None:
    out = Path(trained["root"]) / "z"
    first = run_job("embed", ["--run", trained["run"], "--data", trained["gen"], "--out", str(out), "--actors", "1"])
    assert first.rc == 0, first.err[-3000:]
    rows = sum(pq.read_metadata(p).num_rows for p in out.rglob("*.parquet"))
    assert rows == 600
    assert not [p for p in out.parent.iterdir() if ".z.staging-" in p.name]
    case = Case("embed again into its --out", "embed", f"--run {{run}} --data {{gen}} --out {out}", 2,
                r"directory is not empty")  # fmt: skip
    check(case, trained)
    assert sum(pq.read_metadata(p).num_rows for p in out.rglob("*.parquet")) == 600


def test_no_mlflow_run_is_left_running(world: dict[str, str]) -> None:
    """Every run this module's jobs started ended FINISHED, FAILED or KILLED."""
    if not Path(world["uri"][len("sqlite:///") :]).exists():
        return
    client = tracking.client(world["uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = [
        (r.info.run_name, r.info.status)
        for r in client.search_runs(experiments, max_results=1000)
        if r.info.status not in ("FINISHED", "FAILED", "KILLED")
    ]
    assert not running
