"""Read behaviour logs in their public formats and turn them into the canonical frames.

Every reader ends in the same place: a canonical event frame (see ``common.schema``)
sorted by ``(user_id, timestamp)`` with a ``RangeIndex``, an interventions frame and a
:class:`LoadReport` that accounts for every row read. Bad input raises one
:class:`~common.schema.DataError` naming the file, the column, the first offending data
rows (1-based, header excluded) with their values, and what was expected. Rows dropped
on purpose (exact duplicates, rows outside the requested window, Complete Journey
returns) are counted in the report, never lost silently.

CSV files are read in chunks of ``chunksize`` rows; each chunk is converted to compact
dtypes (pyarrow strings, categorical events, ``datetime64[ns, UTC]``) before the chunks
are concatenated, so the raw text of a large file is never held whole.

The package holds one concept per file: ``load`` (the entry point), the readers
(``csv_reader``, ``parquet_reader``, ``tables``), one file per format (``canonical``,
``taobao``, ``retailrocket``, ``completejourney``), ``sniff`` (format detection),
``files`` (opening and encodings), ``columns`` and ``validation`` (converters and the
canonical contract), ``errors`` (messages) and ``results`` (what a load returns).
"""

from common.io.canonical import write_events
from common.io.completejourney import (
    CJ_COLUMNS,
    CJ_RETURN,
    CJ_TRANSACTION_FILES,
    NO_HOME_STORE,
)
from common.io.load import load_events
from common.io.results import (
    DUPLICATE,
    MALFORMED,
    OUTSIDE_WINDOW,
    UNCLOSED_QUOTE,
    EventLog,
    LoadReport,
)
from common.io.retailrocket import RETAILROCKET_COLUMNS, RETAILROCKET_EVENTS
from common.io.sniff import FORMATS, detect_format
from common.io.taobao import TAOBAO_COLUMNS, TAOBAO_EVENTS
from common.io.validation import (
    CANONICAL_EVENTS,
    MAX_VALUE,
    validate_events,
    validate_interventions,
)
from common.vocabulary import BAD_ROWS

__all__ = [
    "BAD_ROWS",
    "CANONICAL_EVENTS",
    "CJ_COLUMNS",
    "CJ_RETURN",
    "CJ_TRANSACTION_FILES",
    "DUPLICATE",
    "FORMATS",
    "MALFORMED",
    "MAX_VALUE",
    "NO_HOME_STORE",
    "OUTSIDE_WINDOW",
    "RETAILROCKET_COLUMNS",
    "RETAILROCKET_EVENTS",
    "TAOBAO_COLUMNS",
    "TAOBAO_EVENTS",
    "UNCLOSED_QUOTE",
    "EventLog",
    "LoadReport",
    "detect_format",
    "load_events",
    "validate_events",
    "validate_interventions",
    "write_events",
]
