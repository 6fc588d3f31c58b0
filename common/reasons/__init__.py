"""Why a customer is flagged: per-customer attributions of the decay risk, grouped into
``common.feature_groups.FEATURE_GROUPS``, turned into reasons a merchant reads.

- :mod:`.ig`: integrated gradients of the LSTM's decay head, one compiled call a batch;
- :mod:`.facts`: the customer's own figures and the interest decomposition per category;
- :mod:`.text`: which reasons the attributions pick, their stable codes and words;
- :mod:`.explain`: both kinds of model (IG, or occlusion for GBDT/LR) and the score
  table's columns.
"""

from common.reasons.explain import REASON_COLUMNS, explain, group_attributions, reason_columns
from common.reasons.facts import CategoryNames, Facts, customer_facts
from common.reasons.ig import Attributions, Reference, integrated_gradients, reference_sums
from common.reasons.text import REASON_CODES, Reasons, reasons_of

__all__ = [
    "REASON_CODES", "REASON_COLUMNS", "Attributions", "CategoryNames", "Facts", "Reasons",
    "Reference", "customer_facts", "explain", "group_attributions", "integrated_gradients",
    "reason_columns", "reasons_of", "reference_sums",
]
