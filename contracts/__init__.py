"""Wire models shared by the worker and the mock: the upstream API (`contracts.api`) and the message bus
(`contracts.messages`). Generated schema files live beside them; `python -m contracts.generate` rebuilds
them."""

from pydantic import ValidationError


def validation_message(exc: ValidationError) -> str:
    """`field: problem` for each error, never echoing the input (it may be a 30 MB image or a secret)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False, include_context=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
