"""Run an experiment on Flower's simulation engine (Ray backend), in this process.

By default Ray's processes are started by ``ray.init`` here and stopped by ``ray.shutdown`` (Flower's
backend calls it) when the run finishes, fails, or is interrupted; a
:class:`~fedlora.run.processes.ProcessTracker` then waits for every descendant it saw and stops any
straggler by PID. With ``federation.ray_address`` the run attaches to a running Ray cluster instead:
``ray.shutdown`` then only disconnects, the cluster's nodes keep running and Flower ends its actors.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import ray
from flwr.simulation import run_simulation
from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

from clients.app import app as client_app
from fedlora.core.config import ConfigError, ExperimentConfig
from fedlora.core.protocol.stopping import STOP, RunInterrupted
from fedlora.core.records.rundir import RunDirectory
from fedlora.privacy.mechanisms import mechanism_for
from fedlora.run.environment import quiet_environment
from fedlora.run.processes import ProcessTracker
from fedlora.run.progress import Listener
from fedlora.run.server_app import make_server_app
from fedlora.server.sampling import virtual_nodes


def backend_config(cfg: ExperimentConfig, *, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend settings: resources per client actor, and how to start or reach Ray.

    Without ``federation.ray_address`` a quiet local Ray on loopback; with it, ``ray.init`` attaches
    to that cluster (the driver must run on one of its nodes, as Ray requires).
    """
    address = cfg.federation.ray_address
    init_args: dict[str, Any] = {
        "logging_level": "info" if verbose else "error",
        "log_to_driver": verbose,
        "configure_logging": True,
    }
    if address:
        init_args["address"] = address
        if _is_loopback(address):  # nodes started with --node-ip-address=127.0.0.1
            init_args["_node_ip_address"] = "127.0.0.1"
    else:
        init_args.update({"include_dashboard": False, "_node_ip_address": "127.0.0.1"})
    return {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
        "init_args": init_args,
    }


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _is_loopback(address: str) -> bool:
    host, _ = _split_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ray_address(address: str, *, timeout: float = 5.0) -> None:
    """Raise :class:`ConfigError` at once when no Ray head answers at ``address`` (HOST:PORT); "" = local.

    Ray itself would retry for a minute and then print a long traceback.
    """
    if not address:
        return
    host, port = _split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            f"federation.ray_address = {address!r}: no Ray head answers there ({exc.strerror or exc}); "
            f"start one with `ray start --head --port {port}` or fix --ray-address"
        ) from None


def _start_ray(config: dict[str, Any]) -> None:
    """Start Ray here; Flower's backend reuses it and shuts it down at the end of the run."""

    ray.init(runtime_env={"env_vars": worker_env()}, **config["init_args"])


def worker_env() -> dict[str, str]:
    """What the client actors' processes get from this one, on any Ray cluster (a head started
    elsewhere does not have this process's environment): its module path, and its OpenMP wait policy
    when set (``fedlora compare --jobs N`` sets it for the runs sharing the cores)."""
    pythonpath = os.pathsep.join([*sys.path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {"PYTHONPATH": pythonpath}
    if "OMP_WAIT_POLICY" in os.environ:
        env["OMP_WAIT_POLICY"] = os.environ["OMP_WAIT_POLICY"]
    return env


def _stop_handler(tracker: ProcessTracker) -> Callable[[int, object], None]:
    """SIGINT/SIGTERM: the first asks the server loop to stop; a second one stops everything now."""

    def handle(signum: int, frame: object) -> None:
        if not STOP.is_set():
            STOP.set()
            os.write(2, b"stopping after the clients' current messages (send the signal again to force)\n")
            return
        tracker.sample()
        tracker.kill_now()
        os._exit(130)

    return handle


def _install(signals: dict[signal.Signals, Any], handler: Any, in_main: bool) -> None:
    if in_main:
        for sig in signals:
            signal.signal(sig, handler)


def simulate(
    cfg: ExperimentConfig,
    run_dir: RunDirectory,
    listener: Listener | None = None,
    *,
    verbose: bool = False,
    resume: bool = False,
) -> None:
    """Run ``cfg``'s ``federation.num_clients`` clients on Flower's simulation engine; blocks until done.

    The clients are partitions of the data; Flower's virtual SuperNodes are a small pool of workers,
    two per client actor (:func:`fedlora.server.sampling.virtual_nodes`), each message naming the
    partition it plays, so time and memory per round do not grow with the number of clients.

    With ``resume`` the run continues after the run directory's checkpoint. Clients keep their state
    between rounds under the run directory (``client_state/``), so a resumed run replays exactly.

    SIGINT and SIGTERM stop the run gracefully (see :mod:`fedlora.core.protocol.stopping`), raising
    KeyboardInterrupt here once Ray is down; a second signal stops every process at once and exits 130.
    """
    quiet_environment()

    if not verbose:
        # Flower logs every client's exception with its traceback at ERROR; the server loop logs one
        # line per failed client itself, and errors of the ServerApp reach the caller as exceptions.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        logging.getLogger("ray").setLevel(logging.ERROR)
    config = backend_config(cfg, verbose=verbose)
    in_main = threading.current_thread() is threading.main_thread()
    STOP.clear()
    with ProcessTracker() as tracker:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            # Before ray.init (a signal during start-up stops at the first check) and again after
            # it, since ray.init installs handlers of its own.
            _install(previous, _stop_handler(tracker), in_main)
            _start_ray(config)
            resources = config["client_resources"]  # the actors Flower will start on this cluster
            _install(previous, _stop_handler(tracker), in_main)
            run_simulation(
                server_app=make_server_app(
                    cfg, run_dir, listener, resume=resume, client_state_dir=run_dir.client_state_path
                ),
                client_app=client_app,
                num_supernodes=virtual_nodes(cfg, mechanism_for(cfg), pool_size_from_resources(resources)),
                backend_config=config,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
        except RunInterrupted as exc:
            raise KeyboardInterrupt from exc
        finally:
            _shutdown_ray()
            if in_main:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


def _shutdown_ray() -> None:
    """Stop Ray's processes if the run was interrupted before Flower's backend did it."""

    if ray.is_initialized():
        ray.shutdown()
