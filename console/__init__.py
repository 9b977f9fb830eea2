"""The operator console: server-rendered pages over the planes' gRPC APIs.

Its own process (`python -m console`, started by `triplane up` and the demo;
a Deployment in k8s/), with its own mutual TLS identity
(`spiffe://<trust domain>/console`), which each plane's permission table lets
call only the methods the console's pages use (default deny). It keeps no
money or policy state: only its operators' accounts, sessions and the audit
log (console/store.py, SQLite or PostgreSQL through triplane.runtime.db).

Layout:

- `app.py`: the Starlette app factory (`create_app`), sign-in/out routes,
  security headers, /healthz, the static files.
- `auth.py`: roles and their permissions, passwords (argon2), sessions
  (idle and absolute expiry by the injected Clock), CSRF tokens, and the
  `requires(permission)` decorator every page route wears.
- `oidc.py`: sign-in through an identity provider (code flow with PKCE).
- `store.py`: accounts, sessions, the audit log.
- `audit.py`: `record(...)`: who, when, what, before and after.
- `planes.py`: the gRPC channels and stubs (as the console identity).
- `pages/`: one module a page (how to add one: pages/__init__.py).
- `templates/`: Jinja2; `base.html` is the layout every page extends.
- `static/`: htmx (vendored, with its licence) and the stylesheet.
"""
