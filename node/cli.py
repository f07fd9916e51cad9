"""`pacsnode` command line: thin entry points over the node's modules."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Collection, MutableMapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from node.config import Config, ConfigError, config_path, load_config
from node.engine.cores import usable_cores
from node.heap import freeze_startup_heap

log = logging.getLogger("pacsnode")
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.logging.level,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "celery", "kombu", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def db_upgrade(config: Config) -> None:
    """Apply Alembic migrations up to head."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", config.database.url.replace("%", "%%"))
    command.upgrade(cfg, "head")


class BundleCheckError(RuntimeError):
    """A configured model bundle is missing, unreadable or not the version config.yaml pins."""


def ensure_bundles(config: Config, training: Collection[str] = (), check_devices: bool = True) -> None:
    """Check every enabled pipeline's bundle (and pinned version) and device before anything starts.

    Pipelines named in `training` are having their demo weights made in the background
    (node/first_run.py, `pacsnode run`): only their device is checked. Any other missing bundle
    is an error, as is a bundle that is not the pinned version. `check_devices=False`: not the
    devices (torch is not installed yet: `pacsnode run` checks them once it is).
    """
    from pipelines.bundle import BundleError, read_metadata  # metadata only: no torch here
    from pipelines.device import DeviceError, check_device  # torch only in a child process

    for name, pc in config.pipelines.items():
        if not pc.enabled:
            continue
        try:  # device: cuda on a machine without CUDA stops here, never runs on the CPU instead
            if check_devices:
                check_device(pc.device)
        except DeviceError as e:
            raise BundleCheckError(f"pipelines.{name}.device: {e}") from e
        if name in training:
            continue
        if not (pc.bundle / "configs" / "metadata.json").exists():
            pinned = f" (version {pc.version})" if pc.version else ""
            raise BundleCheckError(
                f"pipelines.{name}: model bundle {pc.bundle}{pinned} is missing; install it with "
                "`python -m training export`"
                + (", or drop `version` to start on demo weights" if pc.version else "")
            )
        try:
            meta = read_metadata(pc.bundle, pc.version)
        except BundleError as e:
            raise BundleCheckError(f"pipelines.{name}: {e}") from e
        log.info("pipeline %s: bundle %s version %s%s", name, pc.bundle, meta.version,
                 " (demo weights)" if meta.demo else "")  # fmt: skip


class GateCheckError(RuntimeError):
    """A validator the configured gate needs is not installed."""


def check_gate(config: Config) -> None:
    """Refuse to start a process that validates result objects when a configured validator is
    missing (the gate fails closed); say at start when the config chose a weaker gate."""
    from node.writers.validate import REREAD, TOOLS, ValidatorMissing, require_tools

    kinds = config.object_kinds()
    try:
        require_tools(config.validation.required(kinds))
    except ValidatorMissing as e:
        raise GateCheckError(
            f"validation.tools: {e}. Install them, or remove them from validation.tools to run a weaker gate "
            "(each object then records which checks ran on it)"
        ) from e
    skipped = [t for t in TOOLS if t not in config.validation.tools and (t != "dcmpschk" or "gsps" in kinds)]
    if skipped:
        log.warning("validation gate without %s (validation.tools): result objects are checked by %s",
                    ", ".join(skipped), ", ".join([REREAD, *config.validation.tools]))


def _worker_argv(config_file: Path, queue: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", "--config", str(config_file), "worker", "-Q", queue]


def inference_workers_argv(config_file: Path, workers: int, cores: int) -> list[list[str]]:
    """The command lines of `pacsnode run`'s inference workers: one as before, or N with distinct
    names and the cores split between them. One worker builds a job's objects on one thread: on a
    16-core host two workers of 8 threads encoded studies 1.60 and 2.57 times as fast as one of 16
    in two runs (bench/throughput.py, README)."""
    if workers == 1:
        return [_worker_argv(config_file, "inference")]
    threads = str(max(1, cores // workers))
    return [[*_worker_argv(config_file, "inference"), "-n", f"inference{i}@%h", "--threads", threads]
            for i in range(1, workers + 1)]


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    """All in one: migrate, start workers, the API and the listener. A missing demo bundle is
    trained in the background (node/first_run.py): the listener answers at once, and the
    inference worker starts when every bundle is ready. On a fresh virtualenv the inference
    dependencies (torch, ...) may still be being installed by `./dev run`: the training and the
    inference worker then wait for that install to end."""
    from node import metrics
    from node.first_run import (
        DemoTraining,
        inference_install,
        needs_training,
        start_training,
        wait_for_inference_deps,
    )
    from node.jobs import reconcile

    db_upgrade(config)
    metrics.reset(config)  # before any child starts: the counters of the last run are gone
    missing = needs_training(config)
    deps_ready = inference_install()["state"] == "ready"
    try:
        check_gate(config)
        # Without torch the device cannot be checked yet: it is once the install has ended.
        ensure_bundles(config, training=missing, check_devices=deps_ready)
    except (BundleCheckError, GateCheckError) as e:
        print(f"pacsnode: {e}", file=sys.stderr)
        return 2
    # The workers of a previous run were ours and are gone: every unfinished job goes again.
    reconcile(config, stale_after=0)
    env = {**os.environ, "PACSNODE_CONFIG": str(args.config_file)}
    children = [subprocess.Popen(_worker_argv(args.config_file, "export"), env=env)]
    if config.api.enabled:
        children.append(subprocess.Popen([sys.executable, "-m", "node.cli", "--config", str(args.config_file), "api"], env=env))
    trainings: list[DemoTraining] = start_training(config, missing, quick=args.quick_demo) if deps_ready else []
    inference = inference_workers_argv(args.config_file, config.queue.inference_workers, usable_cores())
    lock = threading.Lock()
    stopping = threading.Event()

    def start_inference_when_ready() -> None:
        if not deps_ready:
            if not wait_for_inference_deps(stopping):
                return  # logged; the jobs stay queued, nothing received is lost
            try:
                ensure_bundles(config, training=missing)
            except BundleCheckError as e:
                log.error("%s: the inference worker does not start", e)
                return
            with lock:
                if stopping.is_set():
                    return
                trainings.extend(start_training(config, missing, quick=args.quick_demo))
        if not all([t.wait(config) for t in trainings]):
            return  # logged by wait(); the jobs stay queued, nothing received is lost
        try:
            ensure_bundles(config)
        except BundleCheckError as e:
            log.error("%s: the inference worker does not start", e)
            return
        with lock:
            if not stopping.is_set():
                children.extend(subprocess.Popen(argv, env=env) for argv in inference)
                log.info("inference worker started: the studies that waited for the model bundle go now")

    if trainings or not deps_ready:
        threading.Thread(target=start_inference_when_ready, name="start-inference", daemon=True).start()
    else:  # every bundle is there: the worker loads its models while the listener starts
        children.extend(subprocess.Popen(argv, env=env) for argv in inference)
    try:
        return _serve(config, args.config_file)
    finally:
        with lock:
            stopping.set()
        for t in trainings:
            t.proc.terminate()
        for w in children:
            w.terminate()
        for w in children:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()


def cmd_listener(args: argparse.Namespace, config: Config) -> int:
    return _serve(config, args.config_file)


def cmd_listener_process(args: argparse.Namespace, config: Config) -> int:
    from node.listener_processes import serve_further

    return serve_further(config, args.number, args.channel_fd)


def _serve(config: Config, config_file: Path) -> int:
    from node.completion import CompletionService
    from node.dimse import CountingServer
    from node.handlers import IngestContext
    from node.listener import start_listener
    from node.listener_processes import ListenerProcesses
    from node.services.retention import RetentionThread

    ctx = IngestContext(config)
    further = ListenerProcesses(config, config_file, ctx.tracker)
    server = start_listener(config, ctx, server_class=partial(CountingServer, hand_off=further.hand_off))
    further.start()
    freeze_startup_heap()  # young collections are cheap here: an instance makes few objects
    completion = CompletionService(config, ctx.tracker)
    completion.start()
    retention = RetentionThread(config)
    retention.start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"pacsnode listening as {config.listener.ae_title} on port {config.listener.port}", flush=True)
    stop.wait()
    log.info("shutting down")
    further.stop()  # first: new connections stay here, and theirs end before the port closes
    server.shutdown()
    completion.stop()
    retention.stop()
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


#: OpenMP threads that wait spin for a bounded time, then sleep (libgomp, which torch's CPU build
#: uses, reads this once, when torch loads it): GOMP_SPINCOUNT=10000, about 0.1 ms. Sleeping at
#: once (OMP_WAIT_POLICY=PASSIVE) wakes the threads through the kernel for each of the network's
#: several hundred parallel operations, which a VM makes expensive: DenseNet121 at 224 px on
#: idle cores 96 ms a forward against 55 ms spinning briefly (bench/openmp_wait.py, #12).
#: torch's own 3 ms spin and any spinning lose badly when another program keeps a core busy;
#: the inference worker then runs on fewer threads (node/engine/cores.py). An OMP_WAIT_POLICY
#: or GOMP_SPINCOUNT in the environment is left as it is.
OPENMP_SPINCOUNT = "10000"
#: The environment variables that say how libgomp's threads wait.
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def openmp_defaults(environ: MutableMapping[str, str]) -> None:
    """Set the workers' OpenMP wait default in `environ` unless it already says how threads wait
    (GOMP_SPINCOUNT overrides OMP_WAIT_POLICY in libgomp, so it is set only when neither is)."""
    if not any(name in environ for name in OPENMP_WAIT_VARIABLES):
        environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from node.queue import EXPORT_QUEUE, configure, requeue_orphaned_messages
    from node.services.retention import remove_orphaned_staging

    openmp_defaults(os.environ)  # before torch loads
    if args.queues.split(",") != [EXPORT_QUEUE]:  # it runs models and the gate: both must be there
        try:
            check_gate(config)
            ensure_bundles(config)
        except (BundleCheckError, GateCheckError) as e:
            print(f"pacsnode: {e}", file=sys.stderr)
            return 2
    if args.threads is not None:
        # Before any model loads: torch's default is one thread per core, so two inference
        # workers on one host would each start as many threads as there are cores.
        import torch

        torch.set_num_threads(args.threads)
    remove_orphaned_staging(config)  # a worker killed while writing a result left its staged file
    requeue_orphaned_messages(config)  # or while taking a message from the embedded queue
    app = configure(config)
    import node.tasks  # noqa: F401  (registers the tasks)

    queues = args.queues.split(",")
    pool = ["--pool=threads", f"--concurrency={args.concurrency or 4}"] if queues == [EXPORT_QUEUE] else ["--pool=solo"]
    # Two workers on one host need distinct node names (-n inference1@%h): the name is the
    # job's `worker` column and Celery's identity for remote control.
    name = args.name or f"{'+'.join(queues)}@%h"
    argv = ["worker", "-Q", ",".join(queues), "--loglevel", config.logging.level, "-n", name, *pool]
    app.worker_main(argv)
    return 0


def cmd_db(args: argparse.Namespace, config: Config) -> int:
    db_upgrade(config)
    print("database at head")
    return 0


def _print(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    widths = {c: max(len(c), *(len(str(r.get(c) if r.get(c) is not None else "-")) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c) if r.get(c) is not None else "-").ljust(widths[c]) for c in columns).rstrip())


def cmd_studies(args: argparse.Namespace, config: Config) -> int:
    from node.services.studies import list_studies

    rows = list_studies(config, state=args.state, q=args.q, limit=args.limit).items
    for r in rows:
        r["first_received_at"] = r["received_at"]
        r["skipped"] = r["skip_reason"]
    _print(rows, args.json, ["id", "study_instance_uid", "state", "instances", "completion_rule", "jobs", "skipped"])
    return 0


def cmd_jobs(args: argparse.Namespace, config: Config) -> int:
    from node.engine.errors import Stage
    from node.services.jobs import list_jobs

    # The stages a job's time is spent in, in turn (their sub-timings, e.g. encode_sr, are parts).
    TIMED_STAGES = {Stage.READ, Stage.INFERENCE, Stage.ENCODE, Stage.VALIDATE, Stage.SEND}

    rows = list_jobs(config, state=args.state, limit=args.limit).items
    for r in rows:
        t = r["timings"]
        r["total_s"] = round(sum(v for k, v in t.items() if k in TIMED_STAGES), 3) if t else None
        if not args.json:
            r["study_instance_uid"] = _ellipsis(r["study_instance_uid"], 28)
            r["updated"] = (r["updated_at"] or "")[:19].replace("T", " ") or None
            r["error"] = _ellipsis(" ".join(r["error"].split()), 80) if r["error"] else None
    _print(rows, args.json, ["id", "study_instance_uid", "pipeline", "state", "attempt", "worker", "updated",
                             "total_s", "error_stage", "error"])
    return 0


def _ellipsis(text: str, width: int) -> str:
    """Shorten text for a table cell (--json has the full value)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`--since`: an ISO time (local time when it has no zone) or an age such as 30m, 12h, 2d."""
    m = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(m.group(1))})
    try:
        return datetime.fromisoformat(value).astimezone()
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--since: {value!r} is neither an ISO time nor an age like 12h") from e


def _actor() -> str:
    """Who runs an admin command, for the audit trail: user@host (admins work from several machines)."""
    return f"{getpass.getuser()}@{socket.gethostname()}"[:64]


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    """Re-run one job, or every failed job (since a time); each replay is an audited Event."""
    from node.jobs import TransitionError
    from node.services import jobs

    if args.failed:
        ids = jobs.failed_job_ids(config, args.since)
        if not ids:
            print("no failed jobs to replay", file=sys.stderr)
    elif args.job_id is not None:
        ids = [args.job_id]
    else:
        print("replay: give a JOB_ID or --failed", file=sys.stderr)
        return 2
    new_ids = []
    for job_id in ids:
        try:
            new_ids.append({"replayed": job_id, "job": jobs.replay_job(config, job_id, _actor(), args.reason)})
        except (LookupError, TransitionError) as e:
            print(f"replay: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(new_ids))
    else:
        for r in new_ids:
            print(f"job {r['replayed']} replayed as job {r['job']}")
    return 0


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    """List the model bundles the config names (and any bundles in --path folders)."""
    from node.services.ops import models

    rows = models(config, [Path(p) for p in args.path])
    _print(rows, args.json, ["name", "version", "demo", "status", "path"])
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    """Cancel a job that has not finished; audited like a replay."""
    from node.jobs import TransitionError
    from node.services.jobs import cancel_job

    try:
        cancel_job(config, args.job_id, actor=_actor(), reason=args.reason)
    except (LookupError, TransitionError) as e:
        print(f"cancel: {e}", file=sys.stderr)
        return 1
    print(f"job {args.job_id} cancelled")
    return 0


def cmd_resend(args: argparse.Namespace, config: Config) -> int:
    """Send a finished job's existing results again (no inference); audited."""
    from node.jobs import TransitionError
    from node.services.jobs import resend_job

    try:
        resend_job(config, args.job_id, actor=_actor(), reason=args.reason)
    except (LookupError, TransitionError) as e:
        print(f"resend: {e}", file=sys.stderr)
        return 1
    print(f"job {args.job_id} is sending its results again")
    return 0


def cmd_purge(args: argparse.Namespace, config: Config) -> int:
    """Remove settled studies' files from the spool now (storage.retention_days, or --days); audited."""
    from node.services.retention import purge

    try:
        report = purge(config, days=args.days, dry_run=args.dry_run, include_failed=args.include_failed, actor=_actor())
    except ValueError as e:
        print(f"purge: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        verb = "would remove" if report.dry_run else "removed"
        print(f"{len(report.studies)} studies with no activity since {report.cutoff.isoformat()}: "
              f"{verb} {report.files} files ({report.bytes / 2**20:.1f} MB)")
    return 0


def cmd_rules(args: argparse.Namespace, config: Config) -> int:
    """`rules test FILE.dcm`: which routing rule matches the file, and why each rule did or did not."""
    from node.services.errors import Invalid
    from node.services.ops import rules_test

    try:
        d = rules_test(config, args.file.read_bytes(), args.calling_ae, args.called_ae, args.address)
    except (OSError, Invalid) as e:
        print(f"rules test: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in d.items() if k != "mode"}, indent=2))
        return 0
    print(f"mode {d['mode']}:")
    for line in d["trace"]:
        print(f"  {line}")
    if d["action"] == "skip":
        print(f"=> skip by rule {d['rule'] or '-'}: {d['reason']}")
    else:
        dests = "every destination" if d["destinations"] is None else ", ".join(d["destinations"])
        print(f"=> process by rule {d['rule']}: {', '.join(d['pipelines'])} at priority {d['priority']}, results to {dests}")
    return 0


def cmd_users(args: argparse.Namespace, config: Config) -> int:
    """`users add NAME --role ROLE --password-stdin`, `users passwd NAME --password-stdin`,
    `users list`, `users remove NAME`; each change is audited with the operating system user."""
    from node.services import users
    from node.services.errors import Invalid, NotFound

    db_upgrade(config)
    if args.action in ("add", "passwd", "remove") and not args.name:
        print(f"users {args.action}: give NAME", file=sys.stderr)
        return 2
    if args.action in ("add", "passwd") and not args.password_stdin:
        print(f"users {args.action}: give --password-stdin (the password is read from standard input)", file=sys.stderr)
        return 2
    try:
        if args.action == "add":
            users.add_user(config, args.name, args.role, _read_password(), actor=_actor())
            print(f"user {args.name} added with role {args.role}")
        elif args.action == "passwd":
            users.set_password(config, args.name, _read_password(), actor=_actor())
            print(f"password of {args.name} changed (their browser sessions ended)")
        elif args.action == "remove":
            users.remove_user(config, args.name, actor=_actor())
            print(f"user {args.name} removed (its tokens and sessions with it)")
        else:
            _print(users.list_users(config), args.json, ["id", "name", "role", "tokens", "created_at"])
    except (Invalid, NotFound) as e:
        print(f"users {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def _read_password() -> str:
    return sys.stdin.readline().rstrip("\r\n")


def cmd_tokens(args: argparse.Namespace, config: Config) -> int:
    """`tokens create --user NAME [--expires DAYS]` (printed once), `tokens list`, `tokens revoke ID`."""
    from node.services import users
    from node.services.errors import Invalid, NotFound

    db_upgrade(config)
    try:
        if args.action == "create":
            if not args.user:
                print("tokens create: give --user NAME", file=sys.stderr)
                return 2
            token_id, token = users.create_token(config, args.user, args.expires, actor=_actor())
            print(token)
            print(f"token {token_id} for {args.user}: shown once, store it now", file=sys.stderr)
        elif args.action == "revoke":
            if args.id is None:
                print("tokens revoke: give the token ID", file=sys.stderr)
                return 2
            users.revoke_token(config, args.id, actor=_actor())
            print(f"token {args.id} revoked")
        else:
            _print(users.list_tokens(config), args.json, ["id", "user", "created_at", "expires_at", "revoked_at", "last_used_at"])
    except (Invalid, NotFound) as e:
        print(f"tokens {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_api(args: argparse.Namespace, config: Config) -> int:
    """The HTTP service alone; `--workers N` runs N processes on one port. Several such
    processes (on one host or many, behind a proxy) share only the database, and api.state_dir
    for metrics summed across the processes of one host."""
    import uvicorn

    from node.services.users import ensure_first_admin

    db_upgrade(config)
    ensure_first_admin(config)
    a = config.api
    options: dict[str, Any] = {"host": a.host, "port": a.port, "log_level": config.logging.level.lower(),
                               "server_header": False, "timeout_keep_alive": 5,
                               # uvicorn's access log prints query strings (a search may be a
                               # Patient ID); the app logs requests itself (pacsnode.access).
                               "access_log": False,
                               # Behind a proxy, X-Forwarded-For names the client in the audit log,
                               # but only when the request comes from a proxy the config trusts.
                               "proxy_headers": bool(a.trusted_proxies),
                               "forwarded_allow_ips": ",".join(a.trusted_proxies) or None}
    if a.tls:
        options |= {"ssl_certfile": str(a.tls.certificate), "ssl_keyfile": str(a.tls.private_key)}
    print(f"pacsnode API on {'https' if a.tls else 'http'}://{a.host}:{a.port}", flush=True)
    if args.workers > 1:
        # uvicorn's worker processes import the app themselves: the factory reads PACSNODE_CONFIG.
        os.environ["PACSNODE_CONFIG"] = str(args.config_file)
        uvicorn.run("node.api.app:create_app_from_env", factory=True, workers=args.workers, **options)
    else:
        from node.api.app import create_app

        app = create_app(config)
        freeze_startup_heap(busy=True)  # as create_app_from_env does in each of uvicorn's processes
        uvicorn.run(app, **options)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacsnode", description="DICOM AI node for chest radiographs")
    p.add_argument("--config", help="config file (default: $PACSNODE_CONFIG or ./config.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", dest="config_sub", help=argparse.SUPPRESS)
        sp.set_defaults(fn=fn)
        return sp

    run = add("run", cmd_run, "all in one: listener, completion, workers (embedded default)")
    run.add_argument("--quick-demo", action="store_true",
                     help="a missing demo bundle is trained small (seconds, for trying the node and for tests)")
    add("listener", cmd_listener, "DICOM listener and study completion only")
    lp = add("listener-process", cmd_listener_process,
             "(started by the listener for listener.processes > 1) one more process serving connections it hands over")
    lp.add_argument("--number", type=int, required=True)
    lp.add_argument("--channel-fd", type=int, required=True)
    w = add("worker", cmd_worker, "a Celery worker")
    w.add_argument("-Q", "--queues", default="inference", help="inference, export or both, comma separated")
    w.add_argument("--concurrency", type=int, default=None, help="threads for an export worker")
    w.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads of an inference worker (default: one per core); with N inference "
                        "workers on one host, cores / N each")
    w.add_argument("-n", "--name", default=None, help="node name, default QUEUES@%%h; unique per process")
    db = add("db", cmd_db, "database administration")
    db.add_argument("action", choices=["upgrade"])
    for name, fn, hlp in (("studies", cmd_studies, "list studies"), ("jobs", cmd_jobs, "list jobs")):
        sp = add(name, fn, hlp)
        sp.add_argument("--json", action="store_true")
        sp.add_argument("--limit", type=int, default=100)
        if name == "studies":
            sp.add_argument("--state", choices=["receiving", "complete", "skipped"])
            sp.add_argument("--q", help="exact Study Instance UID, Accession Number or Patient ID")
        if name == "jobs":
            sp.add_argument("--state", choices=[s for s in ("queued", "running", "encoded", "sending", "done", "failed", "cancelled", "superseded")])
    r = add("replay", cmd_replay, "re-run a job, or all failed jobs")
    r.add_argument("job_id", nargs="?", type=int)
    r.add_argument("--failed", action="store_true")
    r.add_argument("--since", type=parse_since,
                   help="with --failed: only jobs failed since this ISO time or age (30m, 12h, 2d)")
    r.add_argument("--reason", default="manual replay", help="recorded in the audit trail")
    r.add_argument("--json", action="store_true")
    m = add("models", cmd_models, "model bundles")
    m.add_argument("action", choices=["list"])
    m.add_argument("--path", action="append", default=[], help="also list bundles in this folder")
    m.add_argument("--json", action="store_true")
    c = add("cancel", cmd_cancel, "cancel a queued or running job")
    c.add_argument("job_id", type=int)
    c.add_argument("--reason", default="cancelled by operator", help="recorded in the audit trail")
    rs = add("resend", cmd_resend, "send a finished job's results again (no inference)")
    rs.add_argument("job_id", type=int)
    rs.add_argument("--reason", default="re-sent by operator", help="recorded in the audit trail")
    pg = add("purge", cmd_purge, "remove settled studies' files from the spool (rows and audit stay)")
    pg.add_argument("--days", type=_positive_float, help="no activity for this many days (default: storage.retention_days)")
    pg.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    pg.add_argument("--include-failed", action="store_true", help="also studies with a failed job nobody replayed")
    pg.add_argument("--json", action="store_true")
    u = add("users", cmd_users, "users of the API and dashboard")
    u.add_argument("action", choices=["add", "passwd", "list", "remove"])
    u.add_argument("name", nargs="?")
    u.add_argument("--role", choices=["viewer", "operator", "admin"], default="viewer")
    u.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u.add_argument("--json", action="store_true")
    tk = add("tokens", cmd_tokens, "API tokens (Authorization: Bearer)")
    tk.add_argument("action", choices=["create", "list", "revoke"])
    tk.add_argument("id", nargs="?", type=int, help="revoke: the token's id")
    tk.add_argument("--user")
    tk.add_argument("--expires", type=float, metavar="DAYS", help="create: valid this many days (default: until revoked)")
    tk.add_argument("--json", action="store_true")
    ap = add("api", cmd_api, "the HTTP service (REST API, dashboard, metrics, STOW-RS) alone")
    ap.add_argument("--workers", type=int, default=1, help="processes serving the port (default 1)")
    rl = add("rules", cmd_rules, "routing rules")
    rl.add_argument("action", choices=["test"])
    rl.add_argument("file", type=Path, help="a DICOM file, routed as the first instance of its series")
    rl.add_argument("--calling-ae", help="as if sent by this AE title")
    rl.add_argument("--called-ae", help="as if sent to this AE title (default: ours)")
    rl.add_argument("--address", help="as if sent from this address")
    rl.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.config_file = config_path(args.config_sub or args.config).resolve()
    try:
        config = load_config(args.config_file)
    except ConfigError as e:
        print(f"pacsnode: {e}", file=sys.stderr)
        return 2
    _setup_logging(config)
    return int(args.fn(args, config) or 0)


if __name__ == "__main__":
    sys.exit(main())
