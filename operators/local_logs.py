"""Task logs served on loopback only, for an Airflow on one machine (``make airflow``, the live tests).

The api-server shows the log of a running or deferred task by asking the log
server of the process that runs it: the worker's (``[logging]
worker_log_server_port``) or the triggerer's (``trigger_log_server_port``).
Airflow's own log servers listen on every interface; on one machine they are
not needed beyond 127.0.0.1, and without any the log view of every deferred
sensor ends in "Could not read served logs". So the components start with
``--skip-serve-logs``, this module serves the logs folder on both ports on
127.0.0.1, and ``[core] hostname_callable`` is :func:`loopback_hostname`, so the
api-server asks there.

Example::

    AIRFLOW__CORE__HOSTNAME_CALLABLE=tf_export_pipeline.operators.local_logs.loopback_hostname \\
        python -m tf_export_pipeline.operators.local_logs
"""

from __future__ import annotations

import asyncio
import sys

LOOPBACK = "127.0.0.1"


def loopback_hostname() -> str:
    """The host the api-server asks for a task's served log: this machine's loopback."""
    return LOOPBACK


async def _serve(ports: list[int]) -> None:
    import uvicorn
    from airflow.utils.serve_logs.log_server import get_app

    app = get_app()
    servers = [uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_config=None, access_log=False))
               for port in ports]
    await asyncio.gather(*(server.serve() for server in servers))


def main(argv: list[str] | None = None) -> int:
    from airflow.configuration import conf

    args = argv if argv is not None else sys.argv[1:]
    ports = [int(p) for p in args] or sorted({conf.getint("logging", "worker_log_server_port"),
                                              conf.getint("logging", "trigger_log_server_port")})
    asyncio.run(_serve(ports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
