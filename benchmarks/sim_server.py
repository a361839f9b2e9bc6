"""The simulator with any SimConfig settings, as JSON in argv[1]: python sim_server.py '{"port": 8000}'.
With "tls": true, "ca_out" names the file that receives the test CA for clients to trust."""

import json
import sys

from batchkimi.simulator import SimConfig, serve

settings = json.loads(sys.argv[1])
ca_out = settings.pop("ca_out", None)
serve(SimConfig.from_mapping(settings), ca_out=ca_out)
