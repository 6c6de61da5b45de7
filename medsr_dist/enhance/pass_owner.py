"""The lifetime of a pass's model replicas, bound to the pass.

Ray Data releases an actor pool's replicas by dropping its handles; a replica that crashed and was restarted
(``max_restarts``) can outlive the pass that way, holding its CPUs/GPU while the next pass (the retry of the lost
items alone, or the next night) waits for room to start its own: seen as a 4-CPU node whose restarted 3.5-CPU
replica blocked the retry pass for good. So each pass creates a :class:`PassOwner` (a 0-CPU actor held by the
driver) and hands it to its replicas; each replica watches it (:func:`watch_pass`) and, once it is gone (the pass
ended, or the driver died), ends itself without restart.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["PassOwner", "start_pass_owner", "watch_pass"]

log = logging.getLogger(__name__)

#: Seconds between a replica's checks that its pass's owner still lives.
WATCH_EVERY_S = 1.0


class PassOwner:
    """Held by the driver for one pass; its only method answers that it is alive."""

    def alive(self) -> bool:
        return True


def start_pass_owner():
    """A :class:`PassOwner` actor (0 CPU); ``ray.kill`` it when the pass ends."""
    import ray  # lazy, as the job's: importing the job does not import Ray

    return ray.remote(num_cpus=0, max_restarts=0)(PassOwner).remote()


def watch_pass(owner, every_s: float = WATCH_EVERY_S) -> None:
    """In a replica actor: a daemon thread that kills this actor, without restart, once ``owner`` is gone.
    ``owner`` ``None``: nothing to watch (the replica is not in an owned pass, e.g. called without Ray)."""
    if owner is None:
        return
    import ray  # lazy, as the job's: importing the job does not import Ray

    me = ray.get_runtime_context().current_actor

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                ray.get(owner.alive.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                ray.kill(me, no_restart=True)
                return
            except ray.exceptions.GetTimeoutError:  # a busy owner's node: ask again
                continue
            except Exception:  # noqa: BLE001 - e.g. the GCS restarting: never end a replica on a doubt
                log.warning("cannot reach this pass's owner; asking again", exc_info=True)

    threading.Thread(target=watch, daemon=True, name="medsr-pass-watch").start()
