"""The HTTP routes, one module per concern: system.py (health, metrics, models, tokenize) and
openai.py (chat and text completions). A new endpoint is a route in one of them, or a new module
included by app.create_app."""
