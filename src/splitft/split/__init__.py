"""The split workflow: messages, client side and server side."""
