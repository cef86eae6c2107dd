"""web: the node's operations surface.

- :class:`HttpServer`: the JSON API, the dashboard, ``/healthz`` and ``/metrics``
  (:mod:`.server`, :mod:`.app`, :mod:`.api`, :mod:`.dashboard`, :mod:`.auth`)
- :class:`NodeMetrics`: Prometheus metrics of one node (:mod:`.metrics`)
- :class:`Notifier`: webhooks for positive findings and failures (:mod:`.notify`)
- :class:`NotificationSettings`: a webhook's settings (:mod:`.settings`)
"""

from dicom_ai_node.web.metrics import NodeMetrics
from dicom_ai_node.web.notify import Notifier
from dicom_ai_node.web.server import HttpServer
from dicom_ai_node.web.settings import NotificationSettings

__all__ = ["HttpServer", "NodeMetrics", "NotificationSettings", "Notifier"]
