"""One module per TTT method; each exposes ``run(ctx)`` over the shared arena, engine and guards."""
