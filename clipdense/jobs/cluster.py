"""`clipdense cluster up|down|status --local`: a local autoscaling Ray cluster (Ray's `fake_multinode` provider).

`up` runs `RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` in a session of its own, with its own temp
dir, ports and token auth on, and records what it started in `<temp-dir>/clipdense-cluster.json`. The head's
autoscaler then starts and stops worker "nodes" (extra raylets on this machine) as jobs need them.
`down` stops only this cluster: processes whose command line names its temp dir or that belong to its process
group, plus all their descendants (Ray workers, job drivers). It does not run `ray stop`, which would kill every
Ray on the machine; `down --all` does exactly that. Cloud clusters: use `ray up cluster/aws.yaml` etc. (see
cluster/README.md).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from clipdense.config import UserError, read_yaml
from clipdense.jobs.build import find_project_root
from clipdense.jobs.client import read_token

DEFAULT_CONFIG = "cluster/local.yaml"
DEFAULT_TEMP_DIR = "/tmp/clipdense-ray"
STATE_FILE = "clipdense-cluster.json"
# The provider the autoscaler runs: Ray's fake_multinode with one runtime_env dir per node (see fake_nodes.py).
FAKE_NODE_PROVIDER = "clipdense.jobs.fake_nodes.OwnDirFakeNodeProvider"
# Ray puts unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store; Linux caps socket paths at 107 bytes.
MAX_TEMP_DIR_LEN = 40


@dataclass
class LocalCluster:
    temp_dir: str
    gcs_address: str
    dashboard_url: str
    pgid: int
    config: str
    token_path: str | None  # None: auth disabled, or the token comes from $RAY_AUTH_TOKEN

    @staticmethod
    def load(temp_dir: str | Path) -> "LocalCluster | None":
        path = Path(temp_dir) / STATE_FILE
        return LocalCluster(**json.loads(path.read_text())) if path.is_file() else None

    def save(self) -> None:
        (Path(self.temp_dir) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


def load_local_config(path: str | Path) -> dict:
    """The fake_multinode YAML, checked with Ray's own validator (the autoscaler reads it verbatim)."""
    from ray.autoscaler._private.util import validate_config

    config = read_yaml(path)
    try:
        validate_config(config)
    except Exception as e:  # jsonschema.ValidationError, ValueError, RuntimeError: all one-line for the user
        raise UserError(f"{path}: not a valid Ray cluster config: {str(e).splitlines()[0]}") from None
    if config["provider"].get("type") != "fake_multinode":
        raise UserError(f"{path}: provider.type must be fake_multinode for a local cluster")
    if config.get("head_node_type") != "ray.head.default":
        raise UserError(f"{path}: head_node_type must be ray.head.default (the fake provider's head type)")
    return config


def _head_resource_args(config: dict) -> list[str]:
    res = dict(config["available_node_types"]["ray.head.default"].get("resources", {}))
    args = [f"--num-cpus={int(res.pop('CPU', 0))}", f"--num-gpus={int(res.pop('GPU', 0))}"]
    return args + ([f"--resources={json.dumps(res)}"] if res else [])


def _auth_env(env: dict, auth: bool, token_file: str | None) -> str | None:
    """Set RAY_AUTH_* in `env`; make sure a token exists. Returns the token file used (None: env var or no auth)."""
    if not auth:
        env["RAY_AUTH_MODE"] = "disabled"
        return None
    env["RAY_AUTH_MODE"] = "token"
    if token_file is None and env.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(token_file or env.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not path.is_file():
        if token_file:
            raise UserError(f"token file not found: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
        print(f"generated a Ray auth token in {path}", file=sys.stderr)
    env.pop("RAY_AUTH_TOKEN", None)
    env["RAY_AUTH_TOKEN_PATH"] = str(path)
    return str(path)


def autoscaler_config(config: dict, gcs_address: str) -> dict:
    """The copy of the local cluster YAML that the head's autoscaler reads."""
    config = copy.deepcopy(config)
    # The fake provider starts worker raylets against provider.gcs_address (default: port 6379).
    config["provider"]["gcs_address"] = gcs_address
    config["provider"].setdefault("launch_multiple", True)
    # Ray's fake_multinode with one runtime_env dir per node: stock fake nodes share one, and a node that joins
    # deletes the job packages that other nodes' workers run in (fake_nodes.py).
    config["provider"].update(type="external", module=FAKE_NODE_PROVIDER)
    return config


def up_local(config_path: str | Path = DEFAULT_CONFIG, temp_dir: str | Path = DEFAULT_TEMP_DIR, port: int = 6379,
             dashboard_port: int = 8265, token_file: str | None = None, auth: bool = True,
             timeout_s: float = 180) -> LocalCluster:
    """Start the head of a local autoscaling cluster; workers come and go with demand."""
    from ray._private.services import get_node_ip_address

    if not Path(config_path).is_file() and str(config_path) == DEFAULT_CONFIG:
        config_path = find_project_root() / DEFAULT_CONFIG
    config = load_local_config(config_path)
    temp_dir = Path(temp_dir).resolve()
    if len(str(temp_dir)) > MAX_TEMP_DIR_LEN:
        raise UserError(f"--temp-dir {temp_dir} is too long (> {MAX_TEMP_DIR_LEN} chars): Ray's unix sockets "
                        "live under it; use a short path such as /tmp/cdray")
    old = LocalCluster.load(temp_dir)
    if old and cluster_processes(old.temp_dir, old.pgid, old.gcs_address):
        raise UserError(f"a local cluster is already running from {temp_dir} ({old.dashboard_url}); "
                        "stop it with `clipdense cluster down --local`")
    for name, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if _port_in_use(p):
            raise UserError(f"{name} {p} is already in use (another Ray?): pick another port")
    temp_dir.mkdir(parents=True, exist_ok=True)
    node_ip = get_node_ip_address()
    resolved = temp_dir / "autoscaling.yaml"
    resolved.write_text(yaml.safe_dump(autoscaler_config(config, f"{node_ip}:{port}"), sort_keys=False))

    env = dict(os.environ, RAY_FAKE_CLUSTER="1", RAY_USAGE_STATS_ENABLED="0")
    token_path = _auth_env(env, auth, token_file)
    cmd = [_ray_cli(), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard_port}",
           f"--temp-dir={temp_dir}", f"--autoscaling-config={resolved}", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", *_head_resource_args(config)]
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        # A new session: every daemon `ray start` leaves behind shares its process group, which `down` uses.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
    cluster = LocalCluster(temp_dir=str(temp_dir), gcs_address=f"{node_ip}:{port}",
                           dashboard_url=f"http://127.0.0.1:{dashboard_port}", pgid=proc.pid,
                           config=str(Path(config_path).resolve()), token_path=token_path)
    cluster.save()
    if rc != 0:
        down_local(temp_dir)
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["(no output)"]
        why = "timed out" if rc is None else f"exited {rc}"
        raise UserError(f"ray start {why} (log: {log}): {tail[0][:300]}")
    return cluster


def _psutil():
    """psutil as Ray ships it: importing ray puts its vendored third-party packages on sys.path."""
    importlib.import_module("ray")
    return importlib.import_module("psutil")


def cluster_processes(temp_dir: str | Path, pgid: int | None = None, gcs_address: str | None = None) -> list:
    """psutil processes of one local cluster: those naming its temp dir or GCS address, or in its process group,
    and all their descendants."""
    psutil = _psutil()

    names = [re.escape(str(temp_dir)) + r"(/|\s|$)"]
    if gcs_address:
        names.append(r"--(gcs[-_])?address=" + re.escape(gcs_address) + r"(\s|$)")
    named = re.compile("|".join(names))
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid in skip:
                continue
            if named.search(cmd) or (pgid and os.getpgid(p.pid) == pgid and "ray" in cmd.lower()):
                roots.append(p)
        except (psutil.Error, OSError):
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True) if c.pid not in skip})
        except psutil.Error:
            continue
    return list(found.values())


def down_local(temp_dir: str | Path = DEFAULT_TEMP_DIR, grace_s: float = 10) -> int:
    """Stop every process of the local cluster in `temp_dir` (SIGTERM, then SIGKILL); returns how many."""
    psutil = _psutil()

    state = LocalCluster.load(temp_dir)
    pgid, gcs = (state.pgid, state.gcs_address) if state else (None, None)
    stopped: set[int] = set()
    for _ in range(3):  # a second pass catches workers spawned while the first was stopping things
        procs = cluster_processes(Path(temp_dir).resolve(), pgid, gcs)
        if not procs:
            break
        # The autoscaler first, so it launches no new nodes while the rest goes down.
        procs.sort(key=lambda p: 0 if "monitor.py" in " ".join(_cmdline(p)) else 1)
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
                stopped.add(p.pid)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        kill_and_wait(alive, timeout_s=5)
    state_file = Path(temp_dir) / STATE_FILE
    if state_file.exists():
        state_file.unlink()
    return len(stopped)


def kill_and_wait(procs: list, timeout_s: float) -> None:
    """SIGKILL each psutil process (one already gone is skipped) and wait up to `timeout_s` for them to end."""
    psutil = _psutil()
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def alive_nodes(dashboard_url: str, token_path: str | None = None, timeout_s: float = 10) -> list[dict]:
    """ALIVE nodes as the dashboard's state API reports them (node_id, is_head_node, resources_total)."""
    import requests

    token = read_token(token_path) if token_path else read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.get(f"{dashboard_url}/api/v0/nodes", params={"limit": 1000}, headers=headers, timeout=timeout_s)
    r.raise_for_status()
    return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]


def status_local(temp_dir: str | Path = DEFAULT_TEMP_DIR) -> str:
    state = LocalCluster.load(temp_dir)
    if state is None:
        raise UserError(f"no local cluster recorded in {temp_dir} (start one with `clipdense cluster up --local`)")
    nodes = alive_nodes(state.dashboard_url, state.token_path)
    workers = [n for n in nodes if not n["is_head_node"]]
    cpus = sum(n["resources_total"].get("CPU", 0) for n in nodes)
    return (f"local cluster {state.temp_dir}: dashboard {state.dashboard_url}, GCS {state.gcs_address}, "
            f"{len(nodes)} nodes ({len(workers)} workers), {cpus:g} CPUs")


def main_cluster(argv: list[str]) -> int:
    """Entry for `clipdense cluster up|down|status --local [...]`; returns the exit code."""
    p = argparse.ArgumentParser(prog="clipdense cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--local", action="store_true", help="the local autoscaling cluster (the only kind managed here)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"fake_multinode cluster YAML (default {DEFAULT_CONFIG})")
    p.add_argument("--temp-dir", default=DEFAULT_TEMP_DIR, help=f"this cluster's Ray temp dir ({DEFAULT_TEMP_DIR})")
    p.add_argument("--port", type=int, default=6379, help="GCS port")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--token-file", help="Ray auth token file (default: ~/.ray/auth_token, generated if missing)")
    p.add_argument("--no-auth", action="store_true", help="start without token authentication")
    p.add_argument("--all", action="store_true", help="down: `ray stop --force`, i.e. every Ray on this machine")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if not args.local:
            raise UserError("only --local clusters are managed here; for clouds use `ray up` with cluster/aws.yaml "
                            "or cluster/gcp.yaml, or the KubeRay manifests in cluster/kuberay (see cluster/README.md)")
        if args.action == "up":
            c = up_local(args.config, args.temp_dir, args.port, args.dashboard_port, args.token_file,
                         auth=not args.no_auth)
            print(f"local cluster up: dashboard {c.dashboard_url}, GCS {c.gcs_address}, temp dir {c.temp_dir}")
            print(f"submit a job:  clipdense submit probe nodes=2 --address {c.dashboard_url}"
                  + (f" --token-file {c.token_path}" if c.token_path else ""))
            return 0
        if args.action == "down":
            if args.all:
                return subprocess.call([_ray_cli(), "stop", "--force"])
            n = down_local(args.temp_dir)
            print(f"local cluster in {args.temp_dir}: stopped {n} processes")
            return 0
        print(status_local(args.temp_dir))
        return 0
    except UserError as e:
        print(f"clipdense cluster: error: {e}", file=sys.stderr)
        return 2
