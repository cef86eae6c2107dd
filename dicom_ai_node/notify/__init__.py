"""notify: webhooks that announce positive findings and failures, from the event log.

- :class:`.webhooks.Notifier`: turns events into outbox rows and POSTs them, with retries
"""

from dicom_ai_node.notify.webhooks import Notifier

__all__ = ["Notifier"]
