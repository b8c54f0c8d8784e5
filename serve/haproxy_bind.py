"""HAProxy's stats and metrics pages on the endpoint's host, not on every interface.

Ray 2.60's HAProxy config template binds the frontend to `http_options.host` but hard-codes `bind *:{stats_port}`
and `bind :{metrics_port}` (`ray/serve/_private/haproxy_templates.py`); no variable changes the host. `raylm serve`
on one machine runs this as the local cluster's `worker_process_setup_hook`, so the `HAProxyManager` actor renders
its config with every listener on the frontend's host (loopback by default). On a cluster (cluster.yaml) the
template is Ray's own: there the stats page is meant to be scraped from other nodes.
"""
from __future__ import annotations

HOOK = "serve.haproxy_bind.bind_pages_to_frontend_host"
_STATS, _METRICS = "bind *:{{ config.stats_port }}", "bind :{{ config.metrics_port }}"


def bound_template(template: str) -> str:
    """Ray's template with the stats and metrics listeners on the frontend's host; refuses a template that no longer
    has the lines this rewrites (a Ray upgrade changed it: the pages would silently stay on all interfaces)."""
    if _STATS not in template or _METRICS not in template:
        raise RuntimeError("Ray Serve's HAProxy template changed: cannot bind its stats/metrics pages to the "
                           "endpoint's host (see serve/haproxy_bind.py)")
    return (template.replace(_STATS, "bind {{ config.frontend_host }}:{{ config.stats_port }}")
            .replace(_METRICS, "bind {{ config.frontend_host }}:{{ config.metrics_port }}"))


def bind_pages_to_frontend_host() -> None:
    from ray.serve._private import haproxy

    if "config.frontend_host }}:{{ config.stats_port" not in haproxy.HAPROXY_CONFIG_TEMPLATE:
        haproxy.HAPROXY_CONFIG_TEMPLATE = bound_template(haproxy.HAPROXY_CONFIG_TEMPLATE)
