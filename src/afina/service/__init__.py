"""afina's HTTP service: the OpenAI-compatible inference routes (`afina.service.app.create_app`)."""
