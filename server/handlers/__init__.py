"""Request handlers: commands (acked once durable), queries and subscriptions."""
