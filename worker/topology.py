"""Exchanges and queues, declared idempotently at start-up (declaring what exists with the same
arguments is a no-op; different arguments make RabbitMQ refuse with PRECONDITION_FAILED, see README).

    seedance.jobs (topic) --job.default--> seedance.jobs.default  (quorum)
                          --job.flex-----> seedance.jobs.flex     (quorum)
    seedance.jobs.<tier> --after delivery_limit deliveries--> seedance.jobs.dead (quorum)
    seedance.tracking.<tier>.delay.<ms>ms (quorum, TTL) --expired--> seedance.tracking.<tier> (quorum)
    seedance.store.<tier>.delay.<ms>ms (quorum, TTL) --expired--> seedance.store.<tier> (quorum):
        succeeded tasks whose video is being copied (worker.storage), apart from the tasks in flight
    seedance.events (topic): the worker publishes; users bind their own queues

Every queue the worker uses is named here. The two exchanges and seedance.jobs.dead are part of the
public contract (producers publish to them and read from it), so their names live in contracts.messages,
which producers import without the worker.
"""

from __future__ import annotations

from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from contracts.api import ServiceTier
from contracts.messages import DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, JOBS_EXCHANGE, TIERS
from worker.settings import Settings


def job_queue(tier: ServiceTier) -> str:
    return f"{JOBS_EXCHANGE}.{tier}"


def tracking_queue(tier: ServiceTier) -> str:
    return f"seedance.tracking.{tier}"


def delay_queue(tier: ServiceTier, ms: int) -> str:
    return f"seedance.tracking.{tier}.delay.{ms}ms"


# Back-off steps of a failed copy; a longer wait takes several hops (as tracking waits do).
STORE_DELAYS_MS = (1000, 5000, 30000, 120000)


def store_queue(tier: ServiceTier) -> str:
    return f"seedance.store.{tier}"


def store_delay_queue(tier: ServiceTier, ms: int) -> str:
    return f"seedance.store.{tier}.delay.{ms}ms"


# The account's quotas (worker.limits): pools of free permits, named for the quota they hold.
def slot_permits(tier: ServiceTier, capacity: int | None) -> str:
    return f"seedance.permits.{tier}.slots.{capacity}"


def rpm_permits(tier: ServiceTier, rpm: int | None) -> str:
    return f"seedance.permits.{tier}.rpm.{rpm}"


def rpm_permits_used(tier: ServiceTier, rpm: int | None, ttl_ms: int) -> str:
    return f"seedance.permits.{tier}.rpm.{rpm}.used.{ttl_ms}ms"


def token_permits(tier: ServiceTier, day: str, budget: int | None) -> str:
    return f"seedance.permits.{tier}.tokens.{day}.{budget}"


# Job ids taken, ended and cancelled, and the leader's snapshots of them (worker.job_ids): streams.
IDS_STREAM = "seedance.jobs.ids"
SNAPSHOT_STREAM = "seedance.jobs.ids.snapshots"

# The replica whose consumer is the active one of this single-active-consumer queue leads (worker.leader).
LEADER_QUEUE = "seedance.leader"


def tracking_queues(tier: ServiceTier, settings: Settings) -> list[str]:
    """Every queue that can hold a tracking message of the tier, the tracking queue first: counting them
    counts tasks in flight."""
    return [tracking_queue(tier), *(delay_queue(tier, ms) for ms in settings.tracking_delays_ms)]


def dead_letter_to(queue: str) -> dict[str, Any]:
    # at-least-once: the broker keeps a message until the dead-letter target confirms it (needs
    # reject-publish overflow); the default at-most-once could drop a tracking state or a poison job.
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


async def declare(channel: AbstractChannel, settings: Settings) -> None:
    jobs = await channel.declare_exchange(JOBS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    # Dead letters are what a human must look at: replicated (quorum), never dropped.
    await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True, arguments=QUORUM)
    for tier in TIERS:
        # Jobs are money and promises: quorum queues survive a node loss, and the delivery limit stops a
        # message that crashes workers from looping forever (it lands in the dead-letter queue).
        queue = await channel.declare_queue(
            job_queue(tier),
            durable=True,
            arguments={
                **QUORUM,
                "x-delivery-limit": settings.delivery_limit,
                **dead_letter_to(DEAD_LETTER_QUEUE),
            },
        )
        await queue.bind(jobs, routing_key=f"job.{tier}")
        # A tracking message is the only record of a submitted, paid task: quorum as well.
        await channel.declare_queue(tracking_queue(tier), durable=True, arguments=QUORUM)
        for ms in settings.tracking_delays_ms:
            # Each delay level is its own queue with one TTL, so messages expire in order (see tracking.py).
            await channel.declare_queue(
                delay_queue(tier, ms),
                durable=True,
                arguments={**QUORUM, "x-message-ttl": ms, **dead_letter_to(tracking_queue(tier))},
            )
        # The copy stage: declared whether or not a store is configured, so a worker without one can still
        # finish the copies another left (see JobHandler.handle_store).
        await channel.declare_queue(store_queue(tier), durable=True, arguments=QUORUM)
        for ms in STORE_DELAYS_MS:
            await channel.declare_queue(
                store_delay_queue(tier, ms),
                durable=True,
                arguments={**QUORUM, "x-message-ttl": ms, **dead_letter_to(store_queue(tier))},
            )
