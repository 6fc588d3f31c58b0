"""A deployment ClientApp handed one train message for the file argv[1] (canonical).

Prints ``<error code>|<error reason>|<whether TensorFlow was imported>``.
"""

import sys
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message.message import make_message

from simulations.apps import client_app

if __name__ == "__main__":
    run_config = {"experiment.preset": "quick", "experiment.seed": 0,
                  "federation.mode": "deployment"}
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=run_config,
                      node_config={"data-path": sys.argv[1], "format": "canonical"})
    meta = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                    message_type="train")
    content = RecordDict({"arrays": ArrayRecord([]),
                          "config": ConfigRecord({"server-round": 1})})
    reply = client_app(make_message(meta, content), context)
    print(reply.error.code, reply.error.reason, "tensorflow" in sys.modules, sep="|")
