"""The Seedance worker: RabbitMQ jobs in, API tasks tracked through the broker, completion events out."""
