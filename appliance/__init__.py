"""Field Relay appliance: daemon, durable workflow, inference, outbox and sync."""
