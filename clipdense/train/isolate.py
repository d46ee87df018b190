"""A Ray Train run's driver in a child process (the "driver host"), so that a crash inside Ray takes that child, not
the caller (a user's script, a pytest session, a loop of runs).

Ray's core worker aborts its whole process when one of its internal checks fails. One did in our pytest driver
(`subscriber.cc:335 Check failed: !reply.publisher_id().empty()`, Ray 2.60) while a failed run's TrainController
actor was torn down: the driver of a Ray Train run subscribes to that actor, and a long-poll reply that reaches it
while the actor's process exits can arrive empty. Nothing a caller can catch survives that abort, so the process
that drives TorchTrainer is made disposable instead: `run_in_driver_host(fn, ...)` runs `fn` in a child that joins
the caller's Ray cluster for the call (same GCS, namespace and runtime env) and leaves it after, returns its result
or re-raises its exception here, and when the child dies (SIGABRT or any other death) raises `DriverHostDied` after
`retries` fresh tries, each rerun resuming from the run's last checkpoint. A child serves one call at a time and
waits, disconnected from Ray, for the next (its imports are paid once per caller); a child that died while idle
(e.g. while leaving Ray after a call) is replaced unnoticed; a child whose caller died ends too. Its stdout is
inherited, its stderr relayed.
"""
from __future__ import annotations

import atexit
import collections
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from multiprocessing.connection import Connection
from typing import Any, Callable

# The child's program: this module's loop on the two pipe ends it is given (run by name, not as `-m`: the package
# imports this module first, and a second copy as __main__ would pickle its classes by value)
_HOST_MAIN = ("import sys; from clipdense.train.isolate import serve; "
              "serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))")

# The child sets this to "inline": it must not start a host of its own. "inline" also turns isolation off for a
# caller (one process, as before: a crash inside Ray then takes the caller with it).
DRIVER_ENV = "CLIPDENSE_TRAIN_DRIVER"


class DriverHostDied(RuntimeError):
    """The child process driving a Ray Train run died (a crash inside Ray, or it was killed); the caller lives."""


def isolation_wanted() -> bool:
    """True in a Ray driver process (a script, a test session) with Ray initialised and isolation not turned off.
    Inside a Ray worker (a Tune trial) the caller is already a disposable process that Ray watches."""
    if os.environ.get(DRIVER_ENV, "child") == "inline":
        return False
    import ray  # loaded on use: the runner imports without Ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE


def run_in_driver_host(fn: Callable, *args, retries: int = 1, what: str = "the Ray Train run", **kwargs) -> Any:
    """`fn(*args, **kwargs)` in a driver host on this process's Ray cluster; a dead host is replaced and the call
    rerun up to `retries` times (callers pass only calls that resume when rerun), then `DriverHostDied`."""
    init_kwargs = _cluster()
    for attempt in range(retries + 1):
        host = _take_host()
        try:
            result = host.call(init_kwargs, fn, args, kwargs)
        except DriverHostDied as e:
            if attempt == retries:
                raise
            warnings.warn(f"{e}; rerunning {what} in a new driver process ({attempt + 1} of {retries})",
                          RuntimeWarning, stacklevel=2)
            continue
        _give_back(host)
        return result.unwrap()
    raise AssertionError("unreachable")


class _Outcome:
    """What a host sends back: the call's value, or the exception it raised (re-raised by `unwrap`)."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class DriverHost:
    """One child process; `call` runs a function there while the child is connected to the caller's cluster."""

    def __init__(self):
        to_child_r, self._to_child_w = os.pipe()
        self._from_child_r, from_child_w = os.pipe()
        env = {**os.environ, DRIVER_ENV: "inline", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        argv = [sys.executable, "-c", _HOST_MAIN, str(to_child_r), str(from_child_w), str(os.getpid())]
        self.proc = subprocess.Popen(argv, pass_fds=(to_child_r, from_child_w), env=env, stderr=subprocess.PIPE,
                                     text=True, errors="replace")
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(self._to_child_w, readable=False)
        self._recv = Connection(self._from_child_r, writable=False)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=30)
        self._relay = threading.Thread(target=self._relay_stderr, name="clipdense-driver-host-stderr", daemon=True)
        self._relay.start()

    def _relay_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip("\n"))
            sys.stderr.write(line)

    def call(self, init_kwargs: dict, fn: Callable, args: tuple, kwargs: dict) -> _Outcome:
        from ray import cloudpickle  # by value where the caller registered modules so (tests' toy tasks)

        try:
            # the call is unpickled only once the child has joined Ray: it may hold actor handles and object refs
            call = cloudpickle.dumps((fn, args, kwargs))
            self._send.send_bytes(cloudpickle.dumps((_caller_state(), init_kwargs, call)))
            return cloudpickle.loads(self._recv.recv_bytes())
        except (EOFError, OSError):
            note = self.death_note()
            self.close()
            raise DriverHostDied(note) from None

    def death_note(self) -> str:
        """One line: how the host died and the Ray check it failed, if its stderr names one."""
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._relay.join(timeout=5)  # its last lines (Ray's check) are in the tail
        how = f"signal {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        checks = [line for line in self.stderr_tail if "Check failed" in line or "FATAL" in line]
        cause = f": {checks[-1].strip()[-200:]}" if checks else ""
        return f"the Ray Train driver process (pid {self.proc.pid}) died with {how}{cause}"

    def close(self) -> None:
        for conn in (self._send, self._recv):
            conn.close()
        try:
            self.proc.wait(timeout=20)  # it sees the closed pipe and exits
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


_idle: list[DriverHost] = []
_lock = threading.Lock()


def _cluster() -> dict:
    """ray.init kwargs that join the cluster this process is connected to: the same GCS, namespace and runtime
    env (in a Ray job the child reads the job's own from the environment), printing workers' output as here."""
    import ray  # as above: loaded on use

    ctx = ray.get_runtime_context()
    log_to_driver = getattr(ctx.worker, "logger_thread", None) is not None  # what this driver was started with
    init = {"address": ctx.gcs_address, "namespace": ctx.namespace, "log_to_driver": log_to_driver}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        init["runtime_env"] = dict(ctx.runtime_env)
    return init


def _take_host() -> DriverHost:
    """An idle host that is still alive, else a new one; one that died after its call (while leaving Ray) is
    reported in one line and replaced."""
    dead = []
    with _lock:
        while _idle:
            host = _idle.pop()
            if host.proc.poll() is None:
                break
            dead.append(host)
        else:
            host = None
    for gone in dead:
        warnings.warn(f"{gone.death_note()} after its call returned (nothing lost)", RuntimeWarning, stacklevel=3)
        gone.close()
    return host or DriverHost()


def _give_back(host: DriverHost) -> None:
    with _lock:
        _idle.append(host)


@atexit.register
def close_driver_hosts() -> None:
    """Let every idle host disconnect from Ray and exit (also called by tests)."""
    with _lock:
        hosts = list(_idle)
        _idle.clear()
    for host in hosts:
        host.close()


def serve(to_child: int, from_child: int, caller_pid: int) -> None:
    """The host's loop, until the caller closes the pipe: join the caller's cluster, run the call, send its
    outcome, leave the cluster (a crash while leaving loses nothing: the caller replaces a dead idle host)."""
    import ray  # the child's side; loaded on use as above
    from ray import cloudpickle

    _exit_with_caller(caller_pid)
    recv, send = Connection(to_child, writable=False), Connection(from_child, readable=False)
    while True:
        try:
            caller, init_kwargs, call = cloudpickle.loads(recv.recv_bytes())
        except EOFError:
            return
        try:
            _take_caller_state(caller)
            ray.init(**init_kwargs)
            fn, args, kwargs = cloudpickle.loads(call)
            outcome = _Outcome(value=fn(*args, **kwargs))
        except Exception as e:
            outcome = _Outcome(error=e)
        send.send_bytes(_pickled(outcome))
        ray.shutdown()


def _exit_with_caller(caller_pid: int, poll_s: float = 0.5) -> None:
    """End this host as soon as its caller is gone. An idle host sees the closed pipe, but one mid-call would drive
    a run nobody waits for: after a head machine was lost with its driver, the orphaned host retried the dead
    cluster at full CPU for over a minute. (Not PR_SET_PDEATHSIG: that fires when the caller's creating *thread*
    ends, and hosts are reused across threads.)"""
    def watch():
        while os.getppid() == caller_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="clipdense-driver-host-watchdog", daemon=True).start()


def _caller_state() -> dict:
    """What the call sees of its caller beyond its arguments: the working dir (relative paths) and the environment
    (an endpoint or a tracker's mode set after the child started)."""
    return {"cwd": os.getcwd(), "env": dict(os.environ)}


def _take_caller_state(caller: dict) -> None:
    os.chdir(caller["cwd"])
    os.environ.clear()
    os.environ.update({**caller["env"], DRIVER_ENV: "inline"})


def _pickled(outcome: _Outcome) -> bytes:
    """The outcome pickled; an exception that does not pickle comes back as its type and first line."""
    from ray import cloudpickle  # as above

    try:
        return cloudpickle.dumps(outcome)
    except Exception:
        first = (str(outcome.error).strip().splitlines() or [""])[0]
        return cloudpickle.dumps(_Outcome(error=RuntimeError(f"{type(outcome.error).__name__}: {first}")))

