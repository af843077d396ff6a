"""Generate the committed schema files from the models: `python -m contracts.generate [--check]`.

Writes one JSON Schema per model under `contracts/schemas/`, `contracts/openapi.json` for the two API
endpoints and `contracts/asyncapi.json` for the bus. With `--check` nothing is written and the exit
status is 1 when a committed file differs from what the models produce.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from contracts import api, messages

HERE = Path(__file__).parent
SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "submit_request": api.SubmitRequest,
    "submit_response": api.SubmitResponse,
    "task_result": api.TaskResult,
    "error_body": api.ErrorBody,
    "job_message": messages.JobMessage,
    "job_event": messages.JobEvent,
    "cancel_request": messages.CancelRequest,
}


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _components(ref_template: str) -> dict[str, Any]:
    _, top = models_json_schema([(model, "validation") for model in SCHEMA_MODELS.values()], ref_template=ref_template)
    defs: dict[str, Any] = top["$defs"]
    return defs


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


def openapi() -> dict[str, Any]:
    errors = {
        "400": _error_response("INVALID_REQUEST_BODY: the message names the offending field."),
        "401": _error_response("FAILED_TO_AUTH: no or malformed Authorization header."),
        "403": _error_response("INVALID_API_KEY, NOT_ENOUGH_BALANCE or ACCESS_DENY."),
        "429": {
            **_error_response("RATE_LIMIT_EXCEEDED or TOKEN_LIMIT_EXCEEDED; may carry Retry-After."),
            "headers": {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}},
        },
        "503": _error_response("SERVICE_NOT_AVAILABLE: transient."),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Seedance 1.5 Pro image-to-video (/v3/async)",
            "version": "1.0.0",
            "description": "The submit and task-result endpoints as the worker uses them and the bundled "
            "mock serves them.",
        },
        "servers": [{"url": "https://api.highwayapi.ai"}],
        "security": [{"bearer": []}],
        "paths": {
            api.SUBMIT_PATH: {
                "post": {
                    "operationId": "submitTask",
                    "summary": "Submit an image-to-video task; answers its task_id.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SubmitRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "Task accepted.",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/SubmitResponse"}}
                            },
                        },
                        **errors,
                        "404": _error_response("MODEL_NOT_FOUND."),
                    },
                }
            },
            api.TASK_RESULT_PATH: {
                "get": {
                    "operationId": "getTaskResult",
                    "summary": "State of a task, and its video once it succeeded.",
                    "parameters": [{"name": "task_id", "in": "query", "required": True, "schema": {"type": "string"}}],
                    "responses": {
                        "200": {
                            "description": "The task.",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/TaskResult"}}},
                        },
                        **errors,
                        "404": _error_response("TASK_NOT_FOUND: no task has this id."),
                    },
                }
            },
        },
        "components": {
            "schemas": _components("#/components/schemas/{model}"),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def asyncapi() -> dict[str, Any]:
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Seedance job bus",
            "version": "1.0.0",
            "description": "Jobs in on the topic exchange seedance.jobs, events out on seedance.events, "
            "unusable messages dead-lettered to the queue seedance.jobs.dead.",
        },
        "defaultContentType": "application/json",
        "channels": {
            "jobs": {
                "address": "job.{tier}",
                "description": "Topic exchange `seedance.jobs`; publish persistent messages: a job with "
                "routing key job.default or job.flex, a cancel with routing key job.cancel.",
                "parameters": {"tier": {"enum": [*messages.TIERS, "cancel"]}},
                "messages": {
                    "job": {"$ref": "#/components/messages/Job"},
                    "cancel": {"$ref": "#/components/messages/Cancel"},
                },
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": messages.JOBS_EXCHANGE, "type": "topic", "durable": True},
                    }
                },
            },
            "events": {
                "address": "job.{status}",
                "description": "Topic exchange `seedance.events`; every job ends in exactly one terminal "
                "status (succeeded, failed, expired, rejected, cancelled). Redelivery after a crash may repeat an "
                "event: dedupe by job_id.",
                "parameters": {"status": {"enum": list(get_args(messages.EventStatus))}},
                "messages": {"event": {"$ref": "#/components/messages/Event"}},
                "bindings": {
                    "amqp": {
                        "is": "routingKey",
                        "exchange": {"name": messages.EVENTS_EXCHANGE, "type": "topic", "durable": True},
                    }
                },
            },
            "dead": {
                "address": messages.DEAD_LETTER_QUEUE,
                "description": "Queue holding messages that could not be turned into a job, unchanged, "
                "with the reason in the `x-seedance-reason` header.",
                "messages": {"dead": {"$ref": "#/components/messages/DeadLetter"}},
                "bindings": {"amqp": {"is": "queue", "queue": {"name": messages.DEAD_LETTER_QUEUE, "durable": True}}},
            },
        },
        "operations": {
            "publishJob": {
                "action": "send",
                "channel": {"$ref": "#/channels/jobs"},
                "messages": [{"$ref": "#/channels/jobs/messages/job"}],
            },
            "cancelJob": {
                "action": "send",
                "channel": {"$ref": "#/channels/jobs"},
                "messages": [{"$ref": "#/channels/jobs/messages/cancel"}],
            },
            "receiveEvent": {"action": "receive", "channel": {"$ref": "#/channels/events"}},
            "inspectDeadLetter": {"action": "receive", "channel": {"$ref": "#/channels/dead"}},
        },
        "components": {
            "messages": {
                "Job": {"payload": {"$ref": "#/components/schemas/JobMessage"}},
                "Cancel": {"payload": {"$ref": "#/components/schemas/CancelRequest"}},
                "Event": {"payload": {"$ref": "#/components/schemas/JobEvent"}},
                "DeadLetter": {
                    "headers": {"type": "object", "properties": {"x-seedance-reason": {"type": "string"}}},
                    "payload": {},
                },
            },
            "schemas": _components("#/components/schemas/{model}"),
        },
    }


def artefacts() -> dict[Path, str]:
    """Every generated file, keyed by path, with its exact content."""
    files = {
        HERE / "schemas" / f"{name}.schema.json": _dump(model.model_json_schema())
        for name, model in SCHEMA_MODELS.items()
    }
    files[HERE / "openapi.json"] = _dump(openapi())
    files[HERE / "asyncapi.json"] = _dump(asyncapi())
    return files


def stale() -> list[Path]:
    """Committed files whose content differs from what the models produce now."""
    return [path for path, text in artefacts().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when a committed file is stale")
    args = parser.parse_args(argv)
    if args.check:
        outdated = stale()
        for path in outdated:
            print(f"stale: {path.relative_to(HERE.parent)} (run: make schemas)", file=sys.stderr)
        return 1 if outdated else 0
    for path, text in artefacts().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
