"""The top floor: the `triplane` command, the dev supervisor that runs the
stack on one machine (`make up`, `make demo`, the end-to-end tests), the
embedded nats-server, and the demo drivers. It may import every plane and the
simulator; nothing below imports it."""
