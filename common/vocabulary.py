"""The names every layer agrees on: event types, activation actions, log formats.

Kept apart from :mod:`common.schema` and :mod:`common.io` (which import pandas) so that
configuration and command-line choices can be checked without importing pandas.
"""

#: Event types in funnel order. Their position + 1 is the id the model sees (0 pads).
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "favorite", "purchase")

#: Activation actions; ``none`` is the control arm and always comes first.
DEFAULT_ACTIONS: tuple[str, ...] = ("none", "recommend", "coupon", "push")

#: The event-log formats the loader reads (``auto`` tells them apart by content).
FORMATS: tuple[str, ...] = ("canonical", "taobao", "retailrocket", "completejourney")

#: How ``load_events`` treats CSV rows with the wrong number of fields (a cut last line,
#: a stray separator, an unterminated quote): raise, or drop them and count them.
BAD_ROWS: tuple[str, ...] = ("error", "skip")
