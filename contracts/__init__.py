"""Wire models shared by the worker and the mock: the upstream API (`contracts.api`) and the message bus
(`contracts.messages`). Generated schema files live beside them; `python -m contracts.generate` rebuilds
them."""
