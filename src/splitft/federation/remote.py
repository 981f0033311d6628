"""A deployed client (``splitft client``): its model part, its data, its rounds.

It joins the server, then asks for plans until the server says stop,
waiting when told to and reconnecting when the server is away (it may have
restarted from its last checkpoint). It imports neither the coordinator nor
the simulation: what it loads is the run's model (:mod:`splitft.models.load`)
and its share of the data (:mod:`splitft.data.federated`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from splitft import lora, runs
from splitft.config import ConfigError, RunConfig, from_dict, to_dict
from splitft.data.federated import client_rows, load_run_data
from splitft.data.format import pad_token_id
from splitft.models.load import load_for_run
from splitft.models.parts import WeightStore, load_tokenizer
from splitft.split.client import JoinFailed, ServerRefused, ServerStopped, SplitClient
from splitft.split.messages import Stop, Wait
from splitft.transport.health import read_file
from splitft.transport.network import check_address

log = logging.getLogger(__name__)


class JoinRefused(runs.RunError):
    """The server would not have this client (its reason says why)."""


# refusals of who the client is: asking again would not help
IDENTITY = {
    "UNAUTHENTICATED": "check --token-file and --client-id: the token "
    "`splitft certs` wrote for this id, and the server's tokens.json",
    "PERMISSION_DENIED": "check --client-id: an id below the server's "
    "federation.num_clients, the one this token was made for",
}


class IdentityRefused(ConfigError):
    """The server refused who this client is: a flag to fix, not a server to
    wait for (one line, exit 2)."""


def _identity_refused(client_id: int, code: str, error: str) -> IdentityRefused:
    return IdentityRefused(
        f"client {client_id}: the server refused this client ({code}: {error}); "
        f"{IDENTITY[code]}"
    )


def run_client(
    client: SplitClient,
    transport,
    retry_s: float = 2.0,
    give_up_s: float = 600.0,
    memory_bytes: int = 0,
) -> int:
    """Join, then train every round the server plans for this client.

    ``memory_bytes`` (if > 0) is declared at Join: the server's planner keeps
    this client's part of the model within it.

    A refused round (it closed, or the server restarted) is logged and the
    client asks again. A server that cannot be reached, or that stopped to
    resume later (``Stop(resumes=True)``: it was interrupted), is waited for
    ``give_up_s`` seconds; the client joins it again when it is back.
    Returns the number of rounds trained.

    Raises:
        ConnectionError: the server was away for more than ``give_up_s``.
    """
    client.memory_bytes = memory_bytes  # declared in its Join (run_round sends it)
    cid = client.client_id
    trained, away_since = 0, None

    def away(why: str) -> None:
        nonlocal away_since
        now = time.monotonic()
        if away_since is None:
            log.warning("client %d: %s; waiting for the server", cid, why)
        away_since = away_since or now
        if now - away_since > give_up_s:
            raise ConnectionError(
                f"client {cid}: the server has been away for {give_up_s:g} s "
                f"({why}); start this client again once it is back"
            )
        client.joined = False  # the server may have restarted: join again
        time.sleep(retry_s)
        wait = getattr(transport, "wait_for_server", None)
        if wait is not None:  # back as soon as its port opens (health checks)
            wait(max(give_up_s - (now - away_since), 0.0), setting_up=True)

    while True:
        try:
            result = client.run_round(transport, -1)
        except ConnectionError as e:
            away(str(e))
            continue
        except ServerStopped as e:  # mid-round: it will not answer this round
            result = Stop(cid, str(e), e.resumes)
        except JoinFailed as e:
            if e.code in IDENTITY:
                raise _identity_refused(cid, e.code, str(e)) from None
            raise JoinRefused(f"the server refused to join: {e}") from None
        except ServerRefused as e:
            if e.code in IDENTITY:
                raise _identity_refused(cid, e.code, str(e)) from None
            log.warning("client %d: round refused: %s", cid, e)
            # a server restarted without this client's Join (killed before
            # its first checkpoint) refuses its upload: join again (the same
            # num_samples is accepted again; another is refused, and says so)
            client.joined = False
            time.sleep(retry_s)
            continue
        if isinstance(result, Stop) and result.resumes:
            away(f"the server stopped: {result.reason}")
            continue
        if away_since is not None:
            log.info("client %d: the server is back", cid)
            away_since = None
        if isinstance(result, Stop):
            log.info("client %d: the server stopped (%s)", cid, result.reason)
            return trained
        if isinstance(result, Wait):
            time.sleep(result.retry_after_seconds)
            continue
        trained += 1
        log.info("client %d: trained a round", cid)


def build_client(cfg: RunConfig, client_id: int, data: Path | None = None):
    """A client on its data: a file of its own, or its partition of the config's
    data (split as the simulation splits it). Returns (client, model config)."""
    fed = cfg.federation
    if not 0 <= client_id < fed.num_clients:
        raise ConfigError(
            f"--client-id {client_id} is not allowed: 0 to "
            f"federation.num_clients - 1 = {fed.num_clients - 1}"
        )
    loaded = load_for_run(cfg)
    device, model_dir, model_config = loaded.device, loaded.folder, loaded.model_config
    tokenizer = load_tokenizer(model_dir)
    if data is not None:  # this client's own file: all of it is its data
        tree = to_dict(cfg)
        tree["data"].update(source=str(data))
        tree["federation"].update(num_clients=1)
        tree["partition"].update(method="iid")
        own = from_dict(RunConfig, tree)
        own.data.eval_size = 0  # the server evaluates; the client trains on all
        partition = load_run_data(own, tokenizer).partitions[0]
    else:
        partition = load_run_data(cfg, tokenizer).partitions[client_id]
    client = SplitClient.from_run(
        cfg,
        client_id,
        WeightStore.for_base(model_dir, cfg.client.base_dtype, device=device),
        model_config,
        client_rows(cfg, partition),
        pad_token_id(tokenizer),
        len(partition),
    )
    return client, model_config


def client_main(
    cfg: RunConfig,
    server: str,
    client_id: int,
    token_file: Path,
    ca: Path | None,
    server_name: str | None = None,
    insecure: bool = False,
    data: Path | None = None,
    memory_mb: float = 0.0,
    wait_for_server_s: float = 600.0,
) -> int:
    """``splitft client``: one client on its own data, until the server stops.

    It waits up to ``wait_for_server_s`` for the server's health check to say
    SERVING before it joins, and as long for a server that went away (it may
    be restarting from its last checkpoint)."""
    if not (wait_for_server_s >= 0 and math.isfinite(wait_for_server_s)):
        raise ConfigError(
            f"--wait-for-server {wait_for_server_s} is not allowed: seconds >= 0"
        )
    if not (memory_mb >= 0 and math.isfinite(memory_mb)):
        raise ConfigError(
            f"--memory-mb {memory_mb} is not allowed: a number of megabytes > 0 "
            "(or 0: the config's device profile)"
        )
    from splitft.transport.network import NetworkTransport
    from splitft.transport.security import read_token

    check_address(server, insecure, allow_insecure_remote=True)
    if not insecure and ca is None:
        raise ConfigError(
            "--ca FILE is required (the CA from `splitft certs`), or --insecure"
        )
    token = read_token(token_file)
    ca_cert = None if insecure else read_file(ca)
    client, model_config = build_client(cfg, client_id, data)
    limit = message_limit_for(cfg, model_config)
    with NetworkTransport(
        server,
        client_id,
        token,
        ca_cert=ca_cert,
        server_name=server_name,
        max_message_bytes=limit,
    ) as transport:
        log.info(
            "client %d: %d examples, server %s", client_id, client.num_samples, server
        )
        try:
            transport.wait_for_server(wait_for_server_s)
            trained = run_client(
                client,
                transport,
                give_up_s=wait_for_server_s,
                memory_bytes=int(memory_mb * 1e6),
            )
        except ConnectionError as e:  # waited --wait-for-server: one line
            raise runs.RunError(
                f"{e} (--wait-for-server {wait_for_server_s:g})"
            ) from None
    log.info("client %d: done after %d rounds", client_id, trained)
    return trained


def message_limit_for(cfg: RunConfig, model_config) -> int:
    """The message size limit, derived the same way on both sides."""
    from splitft.transport.network import message_limit

    adapter = lora.init_global_adapter(model_config, cfg.lora, 0)
    return message_limit(
        model_config.hidden_size,
        cfg.data.max_length,
        cfg.train.batch_size,
        sum(t.numel() * t.element_size() for t in adapter.values()),
    )


__all__ = [
    "IdentityRefused",
    "JoinRefused",
    "build_client",
    "client_main",
    "run_client",
]
