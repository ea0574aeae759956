"""The HTTP API's blueprints, models and error model."""

__all__: list[str] = []
