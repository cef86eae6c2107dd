"""web: the node's operations surface.

- :class:`.server.HttpServer`: the JSON API, the dashboard, ``/healthz`` and ``/metrics``
  (:mod:`.app`, :mod:`.api`, :mod:`.dashboard`, :mod:`.auth`, :mod:`.queries`)
- :class:`.metrics.NodeMetrics`: Prometheus metrics of one node
- :class:`.notify.Notifier`: webhooks for positive findings and failures
- :class:`.settings.NotificationSettings`: a webhook's settings

Nothing is imported here: ``config`` imports :mod:`.settings`, which must not pull in the
server (and through it ``config`` again) or FastAPI at every command start.
"""
