"""web: the node's operations surface.

- :class:`.server.HttpServer`: the JSON API, the dashboard, ``/healthz`` and ``/metrics``
  (:mod:`.app`, :mod:`.api`, :mod:`.dashboard`, :mod:`.auth`, :mod:`.queries`)

Nothing below ``web`` imports it: the metrics (:mod:`dicom_ai_node.metrics`), the webhooks
(:mod:`dicom_ai_node.notify`) and their tables (:mod:`dicom_ai_node.jobs.models`) live
with the pipeline.
"""
