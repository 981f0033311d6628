"""A deployment as real processes on 127.0.0.1, for the tests that start
them: `splitft server` and `splitft client`s over gRPC with TLS and tokens,
on the tiny model (:mod:`simrun`'s assets)."""

import os
import re
import socket
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import load_file
from simrun import base_settings, make_assets

from splitft.config import load_config
from splitft.federation.simulation import Simulation


def make_deployment_assets(root):
    """The tiny model, its data, and `splitft certs` for 3 clients."""
    root = make_assets(root)
    done = splitft(
        "certs", str(root / "certs"), "--server-name", "localhost", "--clients", "3"
    )
    assert done.returncode == 0, done.stderr
    return root


SETTINGS = [
    "federation.num_clients=3",
    "federation.rounds=2",
    "federation.local_steps=2",
    "federation.cut_layers=[1, 2, 3]",
    "federation.round_timeout_s=60",
]


def splitft(*args, **kw):
    cmd = [sys.executable, "-m", "splitft.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def splitft_all(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Several `splitft` commands at once (their start-up, mostly imports,
    overlaps), each as :func:`splitft` returns it."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "splitft.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    done = []
    for p, args in zip(procs, commands, strict=True):
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args, env=None):
    cmd = [sys.executable, "-m", "splitft.cli", *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def server(assets, out, name, port, *extra, resume=None, env=None):
    certs = assets / "certs"
    where = ["--address", f"127.0.0.1:{port}", "--certs", str(certs)]
    if resume:
        return start("server", "--resume", str(resume), *where, env=env)
    settings = [*base_settings(assets, out), f"name={name}", *SETTINGS, *extra]
    return start("server", *settings, *where, env=env)


def client_flags(certs, cid: int, port: int) -> list[str]:
    """A `splitft client`'s flags to reach 127.0.0.1:``port`` as ``cid``
    with the files `splitft certs` wrote to ``certs``."""
    return [
        "--server",
        f"127.0.0.1:{port}",
        "--client-id",
        str(cid),
        "--token-file",
        str(certs / "clients" / f"client-{cid}.token"),
        "--ca",
        str(certs / "ca.pem"),
    ]


def client(assets, out, cid, port, *extra, env=None):
    settings = [*base_settings(assets, out), *SETTINGS, *extra]
    return start(
        "client", *settings, *client_flags(assets / "certs", cid, port), env=env
    )


def finish(*procs, timeout=240):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append((p.returncode, out))
    return outs


def simulated(assets, tmp_path):
    cfg = load_config(None, [*base_settings(assets, tmp_path), "name=sim", *SETTINGS])
    Simulation(cfg).run(table=False)
    return load_file(tmp_path / "sim" / "adapter" / "adapter_model.safetensors")


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def signalled_at(output: str) -> float:
    """When the process's fault point sent its signal (``splitft-fault: ...
    t=<unix time>`` on stderr)."""
    found = re.findall(r"splitft-fault: \S+ at \S+ t=([0-9.]+)", output)
    assert found, output[-2000:]
    return float(found[-1])


def wait_ended(proc, timeout=240):
    """(exit code, output, unix time it ended) of a started process."""
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, time.time()


class Watched:
    """A started process whose output is read as it comes (a thread), so a
    test can wait for a line and later take the rest."""

    def __init__(self, proc):
        self.proc, self.lines = proc, []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 240.0) -> None:
        until = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > until:
                raise AssertionError(f"never said {text!r}:\n{self.output[-3000:]}")
            time.sleep(0.05)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def end(self, timeout: float = 240.0):
        """(exit code, output, unix time it ended)."""
        code = self.proc.wait(timeout=timeout)
        ended = time.time()
        self._reader.join(timeout=10)
        return code, self.output, ended


def record_stop(what: str, sig: str, seconds: float) -> None:
    """Print (and, with SPLITFT_STOP_TIMES=FILE, keep) how long a process
    took from a signal to its exit."""
    line = f"stop {what} {sig} {seconds:.2f} s"
    print(line)
    if os.environ.get("SPLITFT_STOP_TIMES"):
        with open(os.environ["SPLITFT_STOP_TIMES"], "a") as f:
            f.write(line + "\n")
