"""The operations listener's app: ``/healthz``, ``/readyz`` and ``/metrics``, no token.

It serves the same routes as the API listener's ``app.api.routes.probes`` router, from
the same running sidecar (the state the API app's lifespan builds), and
nothing else: no ``/v1``, no documentation.
"""

from __future__ import annotations

from fastapi import FastAPI

from app.api.problems import install_problem_handlers
from app.api.routes import probes


def create_ops_app(api_app: FastAPI) -> FastAPI:
    """The operations app, reading ``api_app``'s state (set once its lifespan has run)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(probes.router)
    install_problem_handlers(app, (probes.router,))
    app.state = api_app.state
    return app
