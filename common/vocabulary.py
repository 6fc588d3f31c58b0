"""The names every layer agrees on: event types and activation actions.

Kept apart from :mod:`common.schema` (which builds pandas dtypes from them) so that
configuration can be checked without importing pandas.
"""

#: Event types in funnel order. Their position + 1 is the id the model sees (0 pads).
EVENT_TYPES: tuple[str, ...] = ("view", "click", "cart", "favorite", "purchase")

#: Activation actions; ``none`` is the control arm and always comes first.
DEFAULT_ACTIONS: tuple[str, ...] = ("none", "recommend", "coupon", "push")
